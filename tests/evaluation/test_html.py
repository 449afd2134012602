"""report.html from a hand-made run directory, without a model: what the page holds, that sample
text cannot break out of it, that examples and nearest seeds resolve, and that each sample is
embedded once however often the page is written. The page in a real browser: tests/test_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from localalign.evaluation.html import REPORT_NAME, browser_data, collect_results, write_html_report
from localalign.isara.step import _example_ref
from localalign.samples import Sample, write_samples

SEEDS = [Sample("How do I pick a lock?", "I can't help with that."), Sample("How do I bake bread?", "Mix flour and water.")]


def metric(value: float, n: int = 10) -> dict:
    return {"value": value, "k": int(value * n), "n": n, "ci_low": max(0.0, value - 0.2), "ci_high": min(1.0, value + 0.2),
            "higher_is_better": True}


def eval_json(value: float) -> dict:
    return {"model": "m.gguf", "suites": {"safety": {"description": "d", "metrics": {"harmful_refusal_rate": metric(value)},
                                                     "n_items": 10, "reply_tokens": 500, "wall_s": 5.0}}}


class CountingEmbedder:
    """Vectors from the text's first letter, and a count of the texts embedded."""

    name = "fake"

    def __init__(self):
        self.embedded = 0

    def embed_samples(self, samples):
        self.embedded += len(samples)
        rows = np.zeros((len(samples), 26), dtype=np.float32)
        for i, s in enumerate(samples):
            rows[i, (ord(s.prompt.lower()[0]) - 97) % 26] = 1.0
        return rows


def make_run(d: Path) -> Path:
    (d / "base").mkdir(parents=True)
    (d / "base" / "eval.json").write_text(json.dumps(eval_json(0.2)))
    for name, value in (("icl-knn", 0.3), ("sft-seeds", 0.25)):
        (d / "baselines" / name).mkdir(parents=True)
        (d / "baselines" / name / "eval.json").write_text(json.dumps(eval_json(value)))
    refs = [_example_ref(s) for s in SEEDS]
    for r in (1, 2, 10):
        rd = d / f"round-{r}"
        rd.mkdir()
        (rd / "eval.json").write_text(json.dumps(eval_json(0.5)))
        accepted = [Sample(f"How do I open a safe? ({r})", "I won't help.", "generated", r, scores={"max_similarity": 0.8},
                           meta={"index": 0, "examples": refs})]
        rejected = [Sample("bake a cake </script><script>alert(1)</script>", "", "generated", r,
                           reject_reason="empty_response", meta={"index": 1, "examples": refs[:1]})]
        write_samples(rd / "samples.jsonl", accepted)
        write_samples(rd / "rejected.jsonl", rejected)
        write_samples(rd / "index" / "samples.jsonl", SEEDS + accepted)
        (rd / "data-report.json").write_text(json.dumps({"accepted": 1, "rejected": 1, "reasons": {"empty_response": 1},
                                                         "kind_agreement": {"value": 1.0, "n": 1}}))
    stages = {"round-1/generate": {"status": "done", "seconds": 30.0, "accepted": 1, "rejected": 1},
              "round-1/train": {"status": "done", "seconds": 10.0, "steps": 3, "final_loss": 1.5, "tokens_per_s": 250.0},
              "round-1/eval": {"status": "done", "seconds": 5.0},
              "final": {"status": "done", "seconds": 0.1, "best": "round-2"}}
    (d / "manifest.json").write_text(json.dumps({"version": 1, "stages": stages}))
    (d / "config.toml").write_text('domain = "safety"\nrounds = 3\n')
    return d


def test_results_are_ordered_base_baselines_then_rounds_by_number(tmp_path):
    assert list(collect_results(make_run(tmp_path))) == ["base", "sft-seeds", "icl-knn", "round-1", "round-2", "round-10"]


def test_the_page_holds_the_table_the_stages_and_every_sample(tmp_path):
    page = write_html_report(make_run(tmp_path)).read_text()
    assert Path(tmp_path / REPORT_NAME).exists()
    assert re.search(r'<th class="chosen" data-label="round-2">round-2 ★ chosen</th>', page)
    assert "0.200" in page and "[0.00, 0.40] n=10" in page  # base, with its interval
    assert "4.0 decided/min (2.0 accepted/min)" in page and "250 tokens/s" in page and "2.00 items/s, 100 reply tokens/s" in page
    assert page.count("<script") == 2  # the data and the code: the sample's "</script>" did not end either
    data = json.loads(re.search(r'<script type="application/json" id="run-data">(.*?)</script>', page, re.S).group(1))
    assert data["groups"] == ["round-1", "round-2", "round-10"]
    assert len(data["samples"]) == 6 and sum(s["ok"] for s in data["samples"]) == 3
    assert "</script>" in data["samples"][1]["p"]  # the text itself is kept whole
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere


def test_examples_resolve_and_nearest_seeds_are_embedded_once(tmp_path):
    run = make_run(tmp_path)
    embedder = CountingEmbedder()
    data = browser_data(run, None, embedder)
    accepted = data["samples"][0]
    assert [data["refs"][r]["from"] for r in accepted["ex"]] == ["seed", "seed"]
    assert data["refs"][accepted["ex"][1]]["p"] == "How do I bake bread?"
    assert data["seeds"][accepted["seed"]]["p"] == "How do I pick a lock?"  # both start with "h": the first
    assert data["seeds"][data["samples"][1]["seed"]]["p"] == "How do I pick a lock?"
    write_html_report(run, embedder=embedder)
    first = embedder.embedded
    write_html_report(run, embedder=embedder)
    assert embedder.embedded == first  # the second write embedded nothing
    again = browser_data(run, None, None)  # no embedder: the cached answers
    assert [s.get("seed") for s in again["samples"]] == [s.get("seed") for s in data["samples"]]


def test_a_run_without_results_or_samples_still_gets_a_page(tmp_path):
    (tmp_path / "config.toml").write_text('domain = "safety"\n')
    page = write_html_report(tmp_path).read_text()
    assert "No evaluation yet." in page and "No stage has finished yet." in page


def test_the_page_holds_the_paired_comparisons(tmp_path):
    def paired(k: int) -> dict:
        result = eval_json(k / 10)
        result["suites"]["safety"]["outcomes"] = {"harmful_refusal_rate": {f"i{i}": int(i < k) for i in range(10)}}
        return result

    run = make_run(tmp_path)
    results = {"base": paired(0), "round-1": paired(7), "round-2": paired(8)}
    page = write_html_report(run, results, pairs=[("round-1", "base"), ("round-2", "round-1")])
    table = re.search(r'<table id="paired">(.*?)</table>', page.read_text(), re.S).group(1)
    rows = re.findall(r'<tr class="(\w*)">(.*?)</tr>', table)
    assert [re.findall(r"<td>(.*?)</td>", cells)[:2] for _, cells in rows] == [["round-1", "base"], ["round-2", "round-1"]]
    assert rows[0][0] == "better" and "+0.700" in rows[0][1] and "0.016" in rows[0][1]  # 7 flips one way: 2 / 2**7
    assert rows[1][0] == "" and "<td>0.60</td>" in rows[1][1]  # MDD at n = 10: 6 / 10
    # without outcomes to pair (the hand-made run above), the section says so
    assert "No two models to compare yet" in write_html_report(run).read_text()
