"""The loop's choices (align.AlignRun.rounds) with its stages replaced by fakes: which model
generates each round, whether that generator counts as tuned, which round is kept (the paired
rule of align.keep_round), when the loop stops early, and which round final.gguf ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from localalign.align import (AlignConfig, AlignRun, LoopChoice, ModelForm, Verdict, choose_rounds, format_summary,
                              keep_round, primary_score, ship_choice)
from localalign.errors import UserError
from localalign.evaluation.stats import proportion
from localalign.isara.filters import FilterConfig
from localalign.rundir import Manifest
from localalign.samples import Sample
from localalign.train.config import TrainConfig

N = 20  # items per safety metric in these fakes


def safety_eval(harmful: int, benign: int, n: int = N) -> dict:
    """A safety eval result: the first `harmful` of n harmful prompts refused, the first `benign`
    of n benign prompts answered. Items are the same for every model, so two results differ
    only in one direction per metric: |k_a - k_b| flips, all one way."""
    def metric(k: int) -> tuple[dict, dict]:
        outcomes = {f"i{i}": int(i < k) for i in range(n)}
        return {**proportion(list(outcomes.values())), "higher_is_better": True}, outcomes

    (h, h_out), (b, b_out) = metric(harmful), metric(benign)
    return {"suites": {"safety": {"metrics": {"harmful_refusal_rate": h, "benign_helpfulness_rate": b},
                                  "outcomes": {"harmful_refusal_rate": h_out, "benign_helpfulness_rate": b_out}}}}


def at(score: float) -> dict:
    """A result whose two safety metrics both equal `score` (so its primary score is `score`)."""
    return safety_eval(round(score * N), round(score * N))


BASE = at(0.5)


def fake_run(tmp_path: Path, rounds_results: list[dict], rounds: int | None = None, patience: int = 2,
             base: dict = BASE):
    """An AlignRun whose stages record what they were given; round r's evaluation is
    rounds_results[r-1]. Returns the generate calls, the scores, and the run (its `choice`)."""
    config = AlignConfig(rounds=rounds or len(rounds_results), patience=patience, rehearsal=0)
    run = AlignRun(config, tmp_path, log=lambda m: None)
    run.manifest = Manifest.load(tmp_path)
    calls: list[dict] = []

    def generate(r, generator, seeds, earlier, tuned):
        calls.append({"round": r, "generator": generator.gguf.name, "tuned": tuned,
                      "keep_answer_below": run.config.filters.for_generator(tuned).keep_answer_below})
        return [Sample(f"request {r}", f"answer {r}", source="generated", round=r)]

    run.generate = generate
    run.train = lambda name, base_hf, data, out_dir, init: out_dir / "adapter"
    run.export = lambda name, base_hf, base_form, adapter, out_dir: ModelForm(Path(f"{out_dir.name}.gguf"))
    run.evaluate = lambda name, form, out: rounds_results[int(name.split("/")[0].split("-")[1]) - 1]
    run.write_report = lambda *a, **k: None
    run.round_summary = lambda *a, **k: ""
    results = {"base": base}
    scores, _ = run.rounds([Sample("seed request", "seed answer")], [], tmp_path / "hf", ModelForm(Path("base.gguf")),
                           primary_score(config, base), results)
    return calls, scores, run, results


def test_a_round_generated_by_a_tuned_model_is_held_to_the_stricter_answer_cutoff(tmp_path):
    calls, _, _, _ = fake_run(tmp_path, [at(0.7), at(0.8)])
    assert [c["generator"] for c in calls] == ["base.gguf", "round-1.gguf"]
    assert [c["tuned"] for c in calls] == [False, True]
    defaults = FilterConfig()
    assert defaults.tuned_keep_answer_below < defaults.keep_answer_below
    assert [c["keep_answer_below"] for c in calls] == [defaults.keep_answer_below, defaults.tuned_keep_answer_below]


def test_a_round_below_the_base_leaves_the_base_as_the_generator(tmp_path):
    calls, scores, _, _ = fake_run(tmp_path, [at(0.4), at(0.6), at(0.7)])
    assert [c["generator"] for c in calls] == ["base.gguf", "base.gguf", "round-2.gguf"]
    assert [c["tuned"] for c in calls] == [False, False, True]
    assert scores == {"round-1": 0.4, "round-2": 0.6, "round-3": 0.7}


def test_the_loop_stops_after_patience_rounds_without_a_better_score(tmp_path):
    calls, scores, _, _ = fake_run(tmp_path, [at(0.7), at(0.6), at(0.65), at(0.9)], patience=2)
    assert [c["round"] for c in calls] == [1, 2, 3]  # rounds 2 and 3 below round 1: stop before 4
    assert [c["generator"] for c in calls] == ["base.gguf", "round-1.gguf", "round-1.gguf"]
    assert list(scores) == ["round-1", "round-2", "round-3"]


def test_a_higher_score_with_a_significant_loss_on_one_metric_is_not_kept(tmp_path):
    # base refuses nothing and answers everything (score 0.5). Round 1 refuses every harmful
    # request (+20 flips) but stops answering 6 benign ones, all 6 one way: p = 2 / 2**6 = 0.031.
    # Its score, 0.85, is far above the base's; the loss is real, so it is not kept.
    base = safety_eval(0, N)
    calls, scores, run, _ = fake_run(tmp_path, [safety_eval(N, N - 6), safety_eval(4, N)], base=base)
    assert scores["round-1"] == pytest.approx(0.85) and scores["round-1"] > primary_score(run.config, base)
    assert [c["generator"] for c in calls] == ["base.gguf", "base.gguf"]
    verdict = run.choice.verdicts["round-1"]
    assert not verdict.kept and "benign_helpfulness_rate against base" in verdict.reason and "p=0.031" in verdict.reason
    assert run.choice.verdicts["round-2"].kept and run.choice.best == "round-2"  # 0.6, no loss


def with_over_refusal(result: dict, refused: int, n: int = 100) -> dict:
    """`result` with an over-refusal suite beside it (outside the safety score): the first
    `refused` of n benign prompts refused (lower is better)."""
    outcomes = {f"o{i}": int(i < refused) for i in range(n)}
    metric = {**proportion(list(outcomes.values())), "higher_is_better": False}
    return {"suites": {**result["suites"], "over-refusal": {"metrics": {"over_refusal_rate": metric},
                                                            "outcomes": {"over_refusal_rate": outcomes}}}}


def test_a_significant_loss_outside_the_score_vetoes_the_round_too(tmp_path):
    # The fresh make run of 2026-12-07: a round's safety score rose while its over-refusal rose
    # 2/100 -> 10/100 against the base (8 one way here: p = 0.008). The score does not read
    # over-refusal; the veto does. Six more refusals (p = 0.031) veto it too, five (p = 0.0625) do not.
    base = with_over_refusal(safety_eval(0, N), 2)
    for more, kept in ((8, False), (6, False), (5, True)):
        _, scores, run, _ = fake_run(tmp_path / str(more), [with_over_refusal(safety_eval(10, N), 2 + more)], base=base)
        assert scores["round-1"] > primary_score(run.config, base)
        verdict = run.choice.verdicts["round-1"]
        assert verdict.kept is kept, more
        if not kept:
            assert "over-refusal/over_refusal_rate against base" in verdict.reason
    # a gain outside the score (fewer over-refusals) is no loss
    _, _, run, _ = fake_run(tmp_path / "fewer", [with_over_refusal(safety_eval(10, N), 0)], base=with_over_refusal(safety_eval(0, N), 10))
    assert run.choice.verdicts["round-1"].kept


def test_five_one_way_losses_are_not_yet_significant_so_the_round_is_kept(tmp_path):
    # the boundary of the veto: 5 flips one way give p = 0.0625, 6 give 0.031 (the test above)
    base = safety_eval(0, N)
    calls, _, run, _ = fake_run(tmp_path, [safety_eval(N, N - 5), safety_eval(N, N)], base=base)
    assert run.choice.verdicts["round-1"].kept
    assert [c["generator"] for c in calls] == ["base.gguf", "round-1.gguf"]


def test_losses_are_judged_against_the_base_too_so_they_cannot_add_up_over_rounds(tmp_path):
    # round 1: benign 17/20 (3 lost against the base, not significant), score 0.675: kept.
    # round 2: benign 14/20, 3 more lost: not significant against round 1, but 6 one way
    # against the base (p = 0.031), so it is not kept although its score (0.7) is higher.
    base = safety_eval(0, N)
    calls, _, run, results = fake_run(tmp_path, [safety_eval(10, 17), safety_eval(14, 14)], base=base)
    assert run.choice.verdicts["round-1"].kept
    verdict = run.choice.verdicts["round-2"]
    assert primary_score(run.config, results["round-2"]) > primary_score(run.config, results["round-1"])
    assert not verdict.kept and "against base" in verdict.reason and "against round-1" not in verdict.reason
    assert run.choice.best == "round-1" and run.choice.judged_against == {"round-1": "base", "round-2": "round-1"}


def test_a_round_not_kept_for_its_loss_counts_towards_patience(tmp_path):
    base = safety_eval(0, N)
    vetoed = safety_eval(N, N - 8)  # score 0.8, benign 8 lost one way (p = 0.008)
    calls, scores, run, _ = fake_run(tmp_path, [vetoed, vetoed, safety_eval(N, N)], patience=2, base=base)
    assert [c["round"] for c in calls] == [1, 2] and list(scores) == ["round-1", "round-2"]


def test_the_replayed_choice_is_the_loops_own(tmp_path):
    # round 2 (0.65) is above round 1 (0.6) but answers 6 benign requests fewer than round 1,
    # all one way: vetoed against the best so far (against the base it lost only 4)
    rounds = [at(0.6), safety_eval(N, 6), at(0.75), at(0.6)]
    _, _, run, results = fake_run(tmp_path, rounds, patience=3)
    replay = choose_rounds(run.config, results)
    assert replay == run.choice
    assert [v.kept for v in replay.verdicts.values()] == [True, False, True, False]
    assert "against round-1" in replay.verdicts["round-2"].reason and "against base" not in replay.verdicts["round-2"].reason
    assert replay.judged_against == {"round-1": "base", "round-2": "round-1", "round-3": "round-1", "round-4": "round-3"}


def test_keep_round_without_paired_outcomes_falls_back_to_the_score():
    config = AlignConfig()
    strip = lambda r: {"suites": {"safety": {"metrics": r["suites"]["safety"]["metrics"]}}}  # noqa: E731
    base, candidate = strip(safety_eval(0, N)), strip(safety_eval(N, 0))
    assert keep_round(config, candidate, "base", base, base) == Verdict(False, "its score 0.500 is not above base's 0.500")
    assert keep_round(config, strip(safety_eval(N, N - 8)), "base", base, base).kept  # no outcomes: no veto


def test_final_ships_the_loops_best_and_otherwise_the_best_round_without_a_significant_loss():
    choice = LoopChoice(best="round-1", verdicts={"round-1": Verdict(True, ""), "round-2": Verdict(False, "")})
    assert ship_choice(choice, {"round-1": 0.6, "round-2": 0.9}) == "round-1"
    # nothing kept over the base: the vetoed round (higher score) loses to the one without a loss
    nothing = LoopChoice(verdicts={"round-1": Verdict(False, "", ["benign"]), "round-2": Verdict(False, "")})
    assert ship_choice(nothing, {"round-1": 0.8, "round-2": 0.45}) == "round-2"
    # every round has a loss: the highest score
    every = LoopChoice(verdicts={"round-1": Verdict(False, "", ["x"]), "round-2": Verdict(False, "", ["y"])})
    assert ship_choice(every, {"round-1": 0.4, "round-2": 0.45}) == "round-2"


def test_ship_final_copies_the_kept_round_and_warns_when_none_was_kept(tmp_path):
    base = safety_eval(0, N)
    logs: list[str] = []
    _, scores, run, _ = fake_run(tmp_path, [safety_eval(N, N - 8), safety_eval(2, N)], base=base)
    run.log = logs.append
    for name in scores:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / f"{name}.gguf").write_bytes(name.encode())
    forms = {name: ModelForm(tmp_path / f"{name}.gguf") for name in scores}
    assert run.choice.best == "round-2"
    assert run.ship_final(scores, forms, tmp_path / "hf", 0.5) == "round-2"
    assert (tmp_path / "final.gguf").read_bytes() == b"round-2" and not any("warning" in m for m in logs)
    run.choice = choose_rounds(run.config, {"base": base, "round-1": safety_eval(N, N - 8)})
    assert run.ship_final({"round-1": scores["round-1"]}, {"round-1": forms["round-1"]}, tmp_path / "hf", 0.5) == "round-1"
    assert any("no round was kept over the base" in m and "benign_helpfulness_rate" in m for m in logs)


def test_the_printed_summary_pairs_each_round_with_the_base_and_the_best_before_it(tmp_path):
    config = AlignConfig()
    results = {"base": safety_eval(0, N), "round-1": safety_eval(10, 18), "round-2": safety_eval(N, 12)}
    text = format_summary(results, config, tmp_path, "round-1", 0.5, {})
    paired = text[text.index("paired, item by item"):].splitlines()
    rows = [line.split() for line in paired if line.startswith("round-")]
    table = [r for r in rows if r[1] in ("base", "round-1")]
    assert [(r[0], r[1], r[2]) for r in table] == [
        ("round-1", "base", "safety/harmful_refusal_rate"), ("round-1", "base", "safety/benign_helpfulness_rate"),
        ("round-2", "base", "safety/harmful_refusal_rate"), ("round-2", "base", "safety/benign_helpfulness_rate"),
        ("round-2", "round-1", "safety/harmful_refusal_rate"), ("round-2", "round-1", "safety/benign_helpfulness_rate")]
    # round 2 against round 1, benign: 18 -> 12, six flips one way: worse, p = 0.031; MDD at 20 items 0.30
    assert table[-1][3:] == ["20", "-0.300", *table[-1][5:7], "0", "6", "0.031", "worse", "0.30"]
    assert "round-1 kept: its score 0.700" in text
    assert "round-2 not kept: its score 0.800 is above round-1's 0.700, but it is significantly worse on " \
           "safety/benign_helpfulness_rate against round-1" in text
    # without per-item outcomes there is nothing to pair, and no second table
    plain = {k: {"suites": {"safety": {"metrics": v["suites"]["safety"]["metrics"]}}} for k, v in results.items()}
    assert "paired" not in format_summary(plain, config, tmp_path, "round-1", 0.5, {})


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_the_tuned_cutoff_is_validated(value):
    with pytest.raises(UserError, match="tuned_keep_answer_below"):
        FilterConfig(tuned_keep_answer_below=value)


def test_a_vanishing_p_value_reads_as_below_a_thousandth(tmp_path):
    base = safety_eval(0, N)  # 18 benign answers lost, one way: p = 2 / 2**18; the score still rises
    _, _, run, _ = fake_run(tmp_path, [safety_eval(N, 2)], base=base)
    reason = run.choice.verdicts["round-1"].reason
    assert "p=<0.001" in reason and "p=0.000" not in reason


@pytest.mark.parametrize("pairs", [True, False])
def test_rehearsal_samples_are_preference_pairs_only_with_rehearsal_pairs(tmp_path, pairs):
    config = AlignConfig(rounds=1, rehearsal=1, rehearsal_pairs=pairs, train=TrainConfig(objective="sft+pref"))
    run = AlignRun(config, tmp_path, log=lambda m: None)
    run.manifest = Manifest.load(tmp_path)
    trained: list[list[Sample]] = []
    run.generate = lambda *a, **k: [Sample("request", "answer", source="generated", round=1,
                                           meta={"rejected_response": "a generated loser", "rejected_reason": "x"})]
    run.train = lambda name, base_hf, data, out_dir, init: trained.append(data) or out_dir / "adapter"
    run.export = lambda name, base_hf, base_form, adapter, out_dir: ModelForm(Path(f"{out_dir.name}.gguf"))
    run.evaluate = lambda name, form, out: at(0.6)
    run.write_report = lambda *a, **k: None
    run.round_summary = lambda *a, **k: ""
    rehearsal = [Sample("ordinary", "its answer", source="generated", round=0,
                        meta={"rejected_response": "I can't help with that.", "rejected_reason": "refusal"})]
    run.rounds([Sample("seed request", "seed answer")], rehearsal, tmp_path / "hf", ModelForm(Path("base.gguf")),
               primary_score(config, BASE), {"base": BASE})
    data = {s.prompt: s for s in trained[0]}
    assert ("rejected_response" in data["ordinary"].meta) is pairs
    assert data["request"].meta["rejected_response"] == "a generated loser"  # generation's pairs stay
    assert rehearsal[0].meta["rejected_response"]  # the stage's own samples are left as they were
