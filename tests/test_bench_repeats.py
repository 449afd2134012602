"""bench/bench_ablation.py and bench/bench_round.py with --repeats, without running an alignment:
the argument handling, the aggregation over seeds (benchdoc), and the tables built from faked
run directories."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from localalign.evaluation.stats import proportion

REPO = Path(__file__).resolve().parents[1]
METRICS = {"safety": ["harmful_refusal_rate", "benign_helpfulness_rate"], "over-refusal": ["over_refusal_rate"],
           "truthfulness": ["mc1"]}
SIZES = {"harmful_refusal_rate": 24, "benign_helpfulness_rate": 20, "over_refusal_rate": 100, "mc1": 43}


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the scripts import benchdoc from beside them
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchdoc(monkeypatch):
    return load("benchdoc", monkeypatch)


def eval_result(**ks: int) -> dict:
    """An eval.json: metric -> the first k of its items are 1 (items shared by every result)."""
    suites = {}
    for suite, names in METRICS.items():
        metrics, outcomes = {}, {}
        for name in names:
            out = {f"{name}-{i}": int(i < ks.get(name, 0)) for i in range(SIZES[name])}
            metrics[name] = {**proportion(list(out.values())), "higher_is_better": name != "over_refusal_rate"}
            outcomes[name] = out
        suites[suite] = {"metrics": metrics, "outcomes": outcomes}
    return {"model": "m.gguf", "suites": suites}


def test_spread_is_mean_sample_sd_and_range(benchdoc):
    s = benchdoc.spread([0.25, 0.5, None, 0.75])
    assert (s.mean, s.low, s.high, s.k) == (0.5, 0.25, 0.75, 3)
    assert s.sd == pytest.approx(0.25)  # sample sd: sqrt((0.0625 + 0 + 0.0625) / 2)
    assert benchdoc.spread([0.4]).sd == 0.0
    assert benchdoc.spread([None]) is None and benchdoc.spread([]) is None


def test_aggregate_and_cells_over_seeds(benchdoc):
    runs = [eval_result(harmful_refusal_rate=k) for k in (6, 12, 18)]
    assert benchdoc.metric_values(runs, "safety", "harmful_refusal_rate") == [0.25, 0.5, 0.75]
    assert benchdoc.metric_values(runs + [{"suites": {}}], "safety", "nope") == [None] * 4  # a failed or partial run
    assert benchdoc.spread_cell(runs, "safety", "nope") == "n/a"
    assert benchdoc.spread_cell(runs, "safety", "harmful_refusal_rate") == "0.500 ± 0.250 (0.25-0.75, 3 seeds)"
    # one run: the value with its Wilson interval, as the tables had before repeats
    assert benchdoc.spread_cell(runs[:1], "safety", "harmful_refusal_rate") == "0.250 [0.12, 0.45]"
    assert benchdoc.range_text([24, 24]) == "24" and benchdoc.range_text([19, 31, 22]) == "19-31"


def test_ablation_takes_repeats_and_refuses_fewer_than_one(monkeypatch, capsys):
    ablation = load("bench_ablation", monkeypatch)
    args, seeds = ablation.parse_args(["--repeats", "3", "--seed", "5", "--no-docs"])
    assert seeds == [5, 6, 7] and args.no_docs
    assert ablation.parse_args([])[1] == [0]
    with pytest.raises(SystemExit) as e:
        ablation.parse_args(["--repeats", "0"])
    assert e.value.code == 2 and "--repeats must be at least 1" in capsys.readouterr().err
    assert ablation.overrides({}, 24, seed=7)["seed"] == 7 and ablation.overrides(None, 24, seed=2)["seed"] == 2


def fake_ablation_run(scores: dict[tuple[int, int], int], fail: set[tuple[int, int]], calls: list):
    """A stand-in for run_row: writes what a finished row leaves (the round's eval.json and its
    manifest, and the baselines' evaluations for row 0); harmful refusals of row i, seed s:
    scores[(i, s)]."""
    def run(run_dir: Path, values: dict, baselines: bool):
        i, seed = int(run_dir.name.split("-")[1]), values["seed"]
        calls.append((run_dir.name, seed, baselines))
        if baselines:
            for sub in ("base", "baselines/sft-seeds", "baselines/icl-knn", "baselines/urial"):
                (run_dir / sub).mkdir(parents=True, exist_ok=True)
                (run_dir / sub / "eval.json").write_text(json.dumps(eval_result(harmful_refusal_rate=1 + seed)))
        if (i, seed) in fail:
            raise ablation_error("parity check failed")
        (run_dir / "round-1").mkdir(parents=True, exist_ok=True)
        (run_dir / "round-1" / "eval.json").write_text(json.dumps(eval_result(harmful_refusal_rate=scores[i, seed],
                                                                              benign_helpfulness_rate=20)))
        stages = {"round-1/generate": {"accepted": 24, "rejected": 10 + seed}, "round-1/eval": {"status": "done"}}
        (run_dir / "manifest.json").write_text(json.dumps({"stages": stages}))
        return run_dir
    return run


def ablation_error(message: str):
    from localalign.errors import UserError

    return UserError(message)


def test_ablation_collects_every_seed_and_reports_mean_spread_and_pairs(monkeypatch, tmp_path):
    ablation = load("bench_ablation", monkeypatch)
    seeds = [0, 1, 2]
    scores = {(i, s): 4 + 2 * i + 3 * s for i in range(len(ablation.ROWS)) for s in seeds}
    calls: list = []
    rows = ablation.collect(tmp_path, 24, seeds, run=fake_ablation_run(scores, {(2, 1)}, calls))
    # seed 0 keeps the directories of the runs made before repeats, so they resume
    assert [c for c in calls if c[0].startswith("row-0")] == [("row-0", 0, True), ("row-0-seed-1", 1, True),
                                                               ("row-0-seed-2", 2, True)]
    assert all(not b for name, _, b in calls if not name.startswith("row-0"))
    by_label = {r.label: r for r in rows}
    assert [r.label for r in rows[:4]] == ["base", "sft-seeds", "icl-knn", "urial"] and len(by_label["base"].results) == 3
    assert by_label["+best-of-2"].seeds == [0, 2] and "seed 1 failed: parity check failed" in by_label["+best-of-2"].note()
    assert by_label["before"].note() == "seeds 0, 1, 2; 24 accepted, 10-12 rejected"
    table = ablation.table_lines(rows)
    before = next(line for line in table if line.startswith("| ISARA before issue 15"))
    mean = sum(scores[0, s] for s in seeds) / 3 / 24
    assert f"{mean:.3f} ± " in before and "3 seeds" in before
    paired = "\n".join(ablation.paired_lines(rows))
    assert "on the runs of seed 0" in paired
    assert "| +consistency | before | safety/harmful_refusal_rate |" in paired  # the row above
    assert "| shipped | base | safety/harmful_refusal_rate |" in paired
    assert "| before | base | over-refusal/over_refusal_rate |" in paired


def test_powered_ablation_runs_twins_on_the_shipped_defaults_and_pairs_them_with_sft_on_the_seeds(monkeypatch, tmp_path):
    ablation = load("bench_ablation", monkeypatch)
    plan = ablation.POWERED
    twins = ablation.overrides(plan.rows[1][2], 64, seed=1, plan=plan)
    assert twins["isara"] == {"twins": True} and twins["baselines_in_context"] is False
    assert "filters" not in twins and "contrast" in twins["eval_suites"] and "donotanswer-300" in twins["eval_suites"]
    assert ablation.overrides(plan.rows[0][2], 64, plan=plan).get("isara") is None  # the shipped defaults as they are
    scores = {(i, s): 4 + 2 * i for i in range(len(plan.rows)) for s in (0,)}
    rows = ablation.collect(tmp_path, 64, [0], run=fake_ablation_run(scores, set(), []), plan=plan)
    assert [r.label for r in rows] == ["base", "sft-seeds", "shipped", "+twins", "+twins+pref", "+twin-pairs"]
    table = ablation.table_lines(rows, plan)
    assert "safe-twin refusal (lower is better)" in table[0] and all(line.count("|") == 10 for line in table)
    paired = "\n".join(ablation.paired_lines(rows, plan))
    assert "against base and sft-seeds" in paired
    assert "| +twins | sft-seeds | safety/harmful_refusal_rate |" in paired
    assert "| +twins+pref | +twins | safety/harmful_refusal_rate |" in paired
    # the twin pairs change the twins row, not the row above them
    assert "| +twin-pairs | +twins | safety/harmful_refusal_rate |" in paired
    assert "| +twin-pairs | +twins+pref |" not in paired
    pairs = ablation.overrides(plan.rows[3][2], 64, plan=plan)
    assert pairs["rehearsal_pairs"] is False and pairs["isara"] == {"twins": True, "answers": 2}


def test_rows_runs_only_the_named_rows_and_reads_the_others_finished_runs(monkeypatch, tmp_path, capsys):
    ablation = load("bench_ablation", monkeypatch)
    plan = ablation.POWERED
    scores = {(i, s): 4 + 2 * i + s for i in range(len(plan.rows)) for s in (0, 1)}
    calls: list = []
    ablation.collect(tmp_path, 64, [0], run=fake_ablation_run(scores, set(), calls), plan=plan)
    calls.clear()
    rows = ablation.collect(tmp_path, 64, [0, 1], run=fake_ablation_run(scores, set(), calls), plan=plan, only={0, 3})
    assert sorted(name for name, _, _ in calls) == ["row-0", "row-0-seed-1", "row-3", "row-3-seed-1"]
    by_label = {r.label: r for r in rows}
    assert by_label["shipped"].seeds == [0, 1] and by_label["+twins"].seeds == [0]  # read, not run, for seed 0
    assert "seed 0;" in by_label["+twins"].note() and "seeds 0, 1;" in by_label["shipped"].note()
    seeded = "\n".join(ablation.seed_lines(rows, plan))
    # shipped: 4 + 0 + s refusals of 24, twins 6 (seed 0 only: not paired over seeds), twin pairs 10 + s
    assert "| shipped | sft-seeds | +0.125 (" in seeded and "| +twin-pairs | +twins |" not in seeded
    assert "| +twin-pairs | shipped |" not in seeded  # it changes the twins row, which has one seed here
    assert "| +twin-pairs | sft-seeds | +0.375 (0.0039)* / +0.375 (" in seeded
    args, _ = ablation.parse_args(["--powered", "--rows", "0,3"])
    assert args.only == {0, 3}
    for bad in ("0,9", "one"):
        with pytest.raises(SystemExit) as e:
            ablation.parse_args(["--powered", "--rows", bad])
        assert e.value.code == 2 and "--rows" in capsys.readouterr().err


def test_a_new_run_gets_the_base_evaluation_of_an_earlier_one(monkeypatch, tmp_path):
    from localalign.rundir import Manifest

    ablation = load("bench_ablation", monkeypatch)
    earlier = tmp_path / "row-0"
    (earlier / "base").mkdir(parents=True)
    (earlier / "base" / "eval.json").write_text('{"suites": {}}')
    inputs = {"gguf": "abc", "suites": "safety"}
    Manifest(earlier / "manifest.json").record("base/eval", inputs, [earlier / "base" / "eval.json"], 1.0)
    new = tmp_path / "row-1-seed-2"  # a run stopped after its first stage
    (new / "base").mkdir(parents=True)
    (new / "base" / "model.gguf").write_text("gguf")
    Manifest(new / "manifest.json").record("base/export", {"hf": "h"}, [new / "base" / "model.gguf"], 1.0)
    ablation.share_base_eval(tmp_path, new)
    manifest = Manifest.load(new)
    assert manifest.is_done("base/eval", inputs)  # align skips the stage: same inputs, intact output
    assert not manifest.is_done("base/eval", {**inputs, "gguf": "another model"})  # and runs it else
    (new / "base" / "eval.json").write_text('{"suites": {"x": 1}}')
    assert "base/export" in manifest.stages  # what the run had done stays recorded
    ablation.share_base_eval(tmp_path, new)  # a run that has the stage already is left alone
    assert (new / "base" / "eval.json").read_text() == '{"suites": {"x": 1}}'


def test_round_bench_takes_repeats_and_refuses_a_used_run_dir(monkeypatch, tmp_path, capsys):
    bench = load("bench_round", monkeypatch)
    run_dir = tmp_path / "round"
    args, seeds = bench.parse_args(["--run-dir", str(run_dir), "--repeats", "2", "--seed", "0"])
    assert seeds == [0, 1]
    assert [bench.run_dir_for(run_dir, s) for s in seeds] == [run_dir, tmp_path / "round-seed-1"]
    (tmp_path / "round-seed-1").mkdir()
    (tmp_path / "round-seed-1" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--run-dir", str(run_dir), "--repeats", "2"])
    assert e.value.code == 2 and "round-seed-1 holds an earlier run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "-1"])


def fake_round_dir(d: Path, seed: int) -> Path:
    stages = {"round-1/generate": {"seconds": 300.0 + 100 * seed, "accepted": 256, "rejected": 200 + seed,
                                   "reasons": {"truncated_response": 150}, "tokens_read": 74000, "tokens_written": 1e5},
              "round-1/train": {"seconds": 400.0, "steps": 132, "tokens_per_s": 230.0 + seed},
              "round-1/export": {"seconds": 20.0}, "round-1/eval": {"seconds": 20.0}}
    for sub, result in (("base", eval_result(harmful_refusal_rate=1, benign_helpfulness_rate=20)),
                        ("round-1", eval_result(harmful_refusal_rate=8 + 4 * seed, benign_helpfulness_rate=17))):
        (d / sub).mkdir(parents=True)
        (d / sub / "eval.json").write_text(json.dumps(result))
    (d / "manifest.json").write_text(json.dumps({"stages": stages}))
    return d


def test_round_bench_reports_spread_over_seeds_and_pairs_each_seed_with_the_base(monkeypatch, tmp_path):
    bench = load("bench_round", monkeypatch)
    runs = [bench.measure(fake_round_dir(tmp_path / f"r{s}", s)) for s in (0, 1, 2)]
    assert runs[1]["stages"] == {"generate": 400.0, "train": 400.0, "export+eval": 40.0, "round": 840.0}
    stages = bench.stage_lines(runs)
    assert "| generate | 400 | 300-500 | 360 | 1 of 3 runs |" in stages and "| round | 840 | 740-940 | 900 | 2 of 3 runs |" in stages
    assert bench.stage_lines(runs[:1])[2] == "| generate | 300 | 360 | yes |"  # one run: the table as before
    assert "200-202 rejected" in bench.generation_lines(runs)[0]
    scores = "\n".join(bench.score_lines(runs, [0, 1, 2]))
    assert "| round 1, 3 seeds | 0.500 ± 0.167 (0.33-0.67, 3 seeds) n=24" not in scores  # no n in a spread
    assert "| round 1, 3 seeds | 0.500 ± 0.167 (0.33-0.67, 3 seeds) |" in scores
    assert "| base | base |" not in scores
    for seed in (0, 1, 2):
        assert f"| round 1 (seed {seed}) | base | safety/harmful_refusal_rate |" in scores
