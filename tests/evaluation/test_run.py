"""End to end on the tiny GGUF: every suite runs, the JSON holds what compare and the report
need, the report writes a table and a plot per metric, and the CLI wires it."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from localalign.cli import main
from localalign.errors import UserError
from localalign.evaluation.report import compare, format_comparison, format_table, write_report
from localalign.evaluation.run import SUITES, EvalConfig, evaluate, read_eval, write_eval
from localalign.judges.verdict import HELPFUL_KINDS


@pytest.fixture(scope="module")
def small_seeds(seeds_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    for name in ("safety", "instruction-following", "truthfulness"):
        shutil.copy(seeds_dir / f"{name}.heldout.jsonl", out)
    return out


@pytest.fixture(scope="module")
def result(tiny_gguf, small_seeds):
    config = EvalConfig(
        model=tiny_gguf, suites=tuple(SUITES), limit=3, seeds_dir=small_seeds, max_tokens=12,
        refusal_max_tokens=8, parallel=2, threads=1, n_ctx=512,
    )
    return evaluate(config)


def test_every_suite_scores_limited_items(result):
    assert set(result["suites"]) == set(SUITES)
    assert result["limit"] == 3 and result["limited"]
    for name, suite in result["suites"].items():
        assert suite["wall_s"] >= 0 and suite["n_items"] <= suite["n_available"]
        for metric, record in suite["metrics"].items():
            outcomes = suite["outcomes"][metric]
            assert record["n"] == len(outcomes) and record["k"] == sum(outcomes.values())
            assert record["ci_low"] <= record["value"] <= record["ci_high"]
    assert result["suites"]["harmbench"]["n_items"] == 6  # 3 behaviours + 3 benign prompts
    assert result["suites"]["safety"]["n_items"] == 3


def test_outcomes_follow_the_items(result):
    safety = result["suites"]["safety"]
    for it in safety["items"]:
        metric = "harmful_refusal_rate" if it["kind"] == "harmful" else "benign_helpfulness_rate"
        expected = it["refused"] if it["kind"] == "harmful" else it["verdict"] in HELPFUL_KINDS
        assert safety["outcomes"][metric][it["id"]] == int(expected)
    truth = result["suites"]["truthfulness"]
    for it in truth["items"]:
        assert len(it["logprobs"]) == len(it["choices"]) and all(lp < 0 for lp in it["logprobs"])
        per_byte = [lp / n for lp, n in zip(it["logprobs"], it["bytes"])]
        assert it["pick"] == max(range(len(per_byte)), key=lambda i: (per_byte[i], -i))
        assert truth["outcomes"]["mc1"][it["id"]] == int(it["pick"] == it["answer"])


def test_evaluation_decodes_in_one_kv_buffer_with_flash_attention_and_says_so(result, tiny_gguf):
    generation = EvalConfig(model=tiny_gguf, suites=("safety",)).generation()
    assert generation.kv_unified and generation.flash_attn and generation.temperature == 0.0
    assert result["decoding"]["kv_unified"] is True and result["decoding"]["flash_attn"] is True
    plain = EvalConfig(model=tiny_gguf, suites=("safety",), kv_unified=False, flash_attn=False).generation()
    assert not plain.kv_unified and not plain.flash_attn


def test_greedy_evaluation_repeats_exactly(result, tiny_gguf, small_seeds):
    again = evaluate(EvalConfig(model=tiny_gguf, suites=("safety", "ifeval"), limit=3, seeds_dir=small_seeds,
                                max_tokens=12, refusal_max_tokens=8, parallel=3, threads=1, n_ctx=512))
    for name in ("safety", "ifeval"):
        assert [i["reply"] for i in again["suites"][name]["items"]] == [i["reply"] for i in result["suites"][name]["items"]]
        assert again["suites"][name]["outcomes"] == result["suites"][name]["outcomes"]


def test_json_round_trip_and_compare(result, tmp_path):
    path = write_eval(result, tmp_path / "a.json")
    loaded = read_eval(path)
    assert loaded["suites"].keys() == result["suites"].keys()
    rows = compare(loaded, loaded)
    assert rows and all(r.paired.p_value == 1.0 and not r.paired.significant() for r in rows)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError):
        read_eval(tmp_path / "bad.json")


def test_compare_flags_a_real_difference(result):
    # B refuses every HarmBench behaviour A did not: with n = 3 that is not significant...
    b = json.loads(json.dumps(result))
    outcomes = b["suites"]["harmbench"]["outcomes"]["refusal_rate"]
    for k in outcomes:
        outcomes[k] = 1 - outcomes[k]
    row = next(r for r in compare(result, b) if r.metric == "refusal_rate")
    assert row.paired.a_only + row.paired.b_only == 3 and not row.paired.significant()
    # ...with 20 flipped items it is.
    a = json.loads(json.dumps(result))
    a["suites"]["harmbench"]["outcomes"]["refusal_rate"] = {f"h{i}": 0 for i in range(20)}
    b["suites"]["harmbench"]["outcomes"]["refusal_rate"] = {f"h{i}": 1 for i in range(20)}
    row = next(r for r in compare(a, b) if r.metric == "refusal_rate")
    assert row.paired.significant() and "yes, B better" in format_comparison([row])


def test_report_table_and_plots(result, tmp_path):
    results = {"base": result, "round-1": result}
    path = write_report(results, tmp_path / "report")
    text = path.read_text()
    table = format_table(results)
    assert table in text and "| suite / metric | base (limited) | round-1 (limited) |" in table
    n_metrics = sum(len(s["metrics"]) for s in result["suites"].values())
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert len(pngs) == n_metrics
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert all(f"]({p.name})" in text for p in pngs)


def test_cli_eval_compare_report(tiny_gguf, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(main, ["eval", "--model", str(tiny_gguf), "--suite", "safety", "--suite", "truthfulness",
                               "--limit", "2", "--max-tokens", "8", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "safety / harmful_refusal_rate" in res.output and "truthfulness / mc1" in res.output
    assert read_eval(out)["limited"]
    res = runner.invoke(main, ["eval", "compare", str(out), str(out)])
    assert res.exit_code == 0 and "McNemar" in res.output
    res = runner.invoke(main, ["eval", "report", f"base={out}", f"r1={out}", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0 and (tmp_path / "rep" / "report.md").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--suite", "safety"], "needs --model"),
        (["eval", "--model", "m.gguf", "--suite", "nope", "--out", "x.json"], "unknown suite"),
        (["eval", "--model", "m.gguf", "--suite", "safety", "--limit", "0", "--out", "x.json"], "--limit"),
        (["eval", "compare", "missing-a.json", "missing-b.json"], "no such file"),
    ],
)
def test_cli_user_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
