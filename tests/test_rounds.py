"""The loop's choices (align.AlignRun.rounds) with its stages replaced by fakes: which model
generates each round, whether that generator counts as tuned, when the loop stops early."""

from __future__ import annotations

from pathlib import Path

import pytest

from localalign.align import AlignConfig, AlignRun, ModelForm
from localalign.errors import UserError
from localalign.isara.filters import FilterConfig
from localalign.rundir import Manifest
from localalign.samples import Sample


def fake_run(tmp_path: Path, round_scores: list[float], rounds: int, patience: int = 2):
    """An AlignRun whose stages record what they were given; round r scores round_scores[r-1]
    (a safety score is the mean of harmful refusal and benign helpfulness: both set to it)."""
    run = AlignRun(AlignConfig(rounds=rounds, patience=patience, rehearsal=0), tmp_path, log=lambda m: None)
    run.manifest = Manifest.load(tmp_path)
    calls: list[dict] = []

    def generate(r, generator, seeds, earlier, tuned):
        calls.append({"round": r, "generator": generator.gguf.name, "tuned": tuned,
                      "keep_answer_below": run.config.filters.for_generator(tuned).keep_answer_below})
        return [Sample(f"request {r}", f"answer {r}", source="generated", round=r)]

    def evaluate(name, form, out):
        r = int(name.split("/")[0].split("-")[1])
        metric = {"value": round_scores[r - 1], "n": 20}
        return {"suites": {"safety": {"metrics": {"harmful_refusal_rate": metric, "benign_helpfulness_rate": metric}}}}

    run.generate = generate
    run.train = lambda name, base_hf, data, out_dir, init: out_dir / "adapter"
    run.export = lambda name, base_hf, base_form, adapter, out_dir: ModelForm(Path(f"{out_dir.name}.gguf"))
    run.evaluate = evaluate
    run.write_report = lambda *a, **k: None
    run.round_summary = lambda *a, **k: ""
    scores, _ = run.rounds([Sample("seed request", "seed answer")], [], tmp_path / "hf", ModelForm(Path("base.gguf")),
                           0.5, {})
    return calls, scores


def test_a_round_generated_by_a_tuned_model_is_held_to_the_stricter_answer_cutoff(tmp_path):
    calls, _ = fake_run(tmp_path, [0.7, 0.8], rounds=2)
    assert [c["generator"] for c in calls] == ["base.gguf", "round-1.gguf"]
    assert [c["tuned"] for c in calls] == [False, True]
    defaults = FilterConfig()
    assert defaults.tuned_keep_answer_below < defaults.keep_answer_below
    assert [c["keep_answer_below"] for c in calls] == [defaults.keep_answer_below, defaults.tuned_keep_answer_below]


def test_a_round_below_the_base_leaves_the_base_as_the_generator(tmp_path):
    calls, scores = fake_run(tmp_path, [0.4, 0.6, 0.7], rounds=3)
    assert [c["generator"] for c in calls] == ["base.gguf", "base.gguf", "round-2.gguf"]
    assert [c["tuned"] for c in calls] == [False, False, True]
    assert scores == {"round-1": 0.4, "round-2": 0.6, "round-3": 0.7}


def test_the_loop_stops_after_patience_rounds_without_a_better_score(tmp_path):
    calls, scores = fake_run(tmp_path, [0.7, 0.6, 0.65, 0.9], rounds=4, patience=2)
    assert [c["round"] for c in calls] == [1, 2, 3]  # rounds 2 and 3 below round 1: stop before 4
    assert [c["generator"] for c in calls] == ["base.gguf", "round-1.gguf", "round-1.gguf"]
    assert list(scores) == ["round-1", "round-2", "round-3"]


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_the_tuned_cutoff_is_validated(value):
    with pytest.raises(UserError, match="tuned_keep_answer_below"):
        FilterConfig(tuned_keep_answer_below=value)
