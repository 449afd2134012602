"""The paired tables of report.py without a model: `eval compare`'s table with the interval and
the MDD, the (model, reference) rows that report.md, report.html and align print, and report.md's
paired section."""

from __future__ import annotations

import pytest

from localalign.evaluation.report import (PAIRED_HEADER, compare, default_pairs, format_comparison,
                                          format_paired_table, paired_cells, paired_rows, write_report)
from localalign.evaluation.stats import paired_difference_interval, proportion


def result(refused: int, over: int, n: int = 24, n_over: int = 100, extra: int = 0) -> dict:
    """A result on two suites: the first `refused` of n harmful prompts refused (plus `extra`
    prompts only this result was scored on), the first `over` of n_over benign ones over-refused."""
    harm = {f"h{i}": int(i < refused) for i in range(n)} | {f"x{i}": 1 for i in range(extra)}
    over_out = {f"o{i}": int(i < over) for i in range(n_over)}
    timing = {"wall_s": 1.0, "n_items": n}
    return {"model": "m.gguf", "suites": {
        "safety": {"metrics": {"harmful_refusal_rate": {**proportion(list(harm.values())), "higher_is_better": True}},
                   "outcomes": {"harmful_refusal_rate": harm}, **timing},
        "over-refusal": {"metrics": {"over_refusal_rate": {**proportion(list(over_out.values())), "higher_is_better": False}},
                         "outcomes": {"over_refusal_rate": over_out}, **timing}}}


def test_compare_carries_the_interval_the_verdict_and_unpaired_items():
    rows = {r.metric: r for r in compare(result(2, 1), result(10, 12, extra=3))}
    harm, over = rows["harmful_refusal_rate"], rows["over_refusal_rate"]
    assert (harm.paired.n, harm.paired.b_only, harm.paired.b_unpaired) == (24, 8, 3)
    assert (harm.paired.ci_low, harm.paired.ci_high) == pytest.approx(paired_difference_interval(2, 8, 0, 14))
    assert harm.verdict() == "better"  # 8 more refused, all one way: p = 0.008
    assert over.verdict() == "worse"  # over-refusal is lower-is-better: 11 more over-refused is worse
    assert compare(result(2, 1), result(4, 1))[0].verdict() == ""  # 2 flips: no verdict


def test_eval_compare_table_has_the_interval_the_mdd_and_the_power():
    table = format_comparison(compare(result(2, 1), result(10, 12, extra=3)))
    header, _, harm, over = table.splitlines()[:4]
    assert "B - A [95% CI]" in header and "| MDD |" in header and "80% power" in header
    low, high = paired_difference_interval(2, 8, 0, 14)
    assert f"+0.333 [{low:+.2f}, {high:+.2f}]" in harm and "| 24 (+3 unpaired) |" in harm
    assert "| yes, B better | 0.25 |" in harm  # MDD at n = 24: 6 / 24
    assert "| yes, B worse | 0.06 |" in over  # at n = 100: 6 / 100
    assert "Newcombe" in table and "6/n" in table


def test_paired_rows_follow_the_pairs_and_the_metrics_asked_for():
    results = {"base": result(1, 1), "round-1": result(9, 5), "round-2": result(12, 9)}
    assert default_pairs(results) == [("round-1", "base"), ("round-2", "base")]
    pairs = [("round-1", "base"), ("round-2", "base"), ("round-2", "round-1")]
    metrics = [("over-refusal", "over_refusal_rate"), ("safety", "harmful_refusal_rate")]
    rows = paired_rows(results, pairs, metrics)
    assert [(r.label, r.reference, r.row.metric) for r in rows] == [
        (label, ref, m) for label, ref in pairs for _, m in metrics]
    cells = dict(zip(PAIRED_HEADER, paired_cells(rows[-1])))  # round-2 vs round-1, harmful refusal
    assert cells["difference [95% CI]"].startswith("+0.125") and cells["0->1"] == "3" and cells["1->0"] == "0"
    assert cells["p"] == "0.250" and cells["verdict"] == "" and cells["MDD"] == "0.25"
    assert paired_rows(results, [("round-3", "base")]) == []  # a label not in the results is skipped
    table = format_paired_table(rows)
    assert table.splitlines()[0] == "| " + " | ".join(PAIRED_HEADER) + " |" and len(table.splitlines()) == 2 + len(rows)


def test_report_md_has_the_paired_section(tmp_path):
    results = {"base": result(1, 1), "round-1": result(9, 5), "round-2": result(12, 9)}
    text = write_report(results, tmp_path / "a").read_text()
    assert "## Paired comparisons" in text and "| round-2 | base | safety/harmful_refusal_rate |" in text
    assert "| round-2 | round-1 |" not in text  # the default pairs: every model against the first
    text = write_report(results, tmp_path / "b", pairs=[("round-2", "round-1")]).read_text()
    assert "| round-2 | round-1 | safety/harmful_refusal_rate |" in text and "| round-1 | base |" not in text
    assert "## Paired comparisons" not in write_report({"base": result(1, 1)}, tmp_path / "c").read_text()
