"""The alignment loop end to end on the tiny model, including kill -9 mid-run and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localalign.rundir import hash_path

REPO = Path(__file__).resolve().parents[1]

# Small everything: 2 rounds of 6 samples, generation in passes of 4 candidates (so a kill can
# land between passes), a checkpoint every optimizer step (so a kill can land mid-training).
# The tiny model's text is babble, so the quality filters that judge text are off here (they
# have their own tests); the rule filters for broken output stay on.
TINY_RUN_TOML = """
rounds = 2
samples = 6
seed = 7
eval_limit = 4

[generation]
n_ctx = 1024
parallel = 4
temperature = 0.9
max_tokens = 64

[isara]
k = 2
max_prompt_tokens = 48
max_response_tokens = 96
branches = 2
max_candidates_factor = 20.0

[filters]
min_prompt_chars = 1
min_response_chars = 1
copy_ratio = 1.0
min_distinct_trigrams = 0.0
novelty_threshold = 1.0
consistency = false

[train]
epochs = 2
batch_size = 2
grad_accum = 1
checkpoint_every = 1
progress = false
"""


def align_cmd(model: Path, run_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "localalign", "align", "--domain", "safety", "--model", str(model),
            "--run-dir", str(run_dir), "--config", str(config)]


def run_align(model, run_dir, config):
    r = subprocess.run(align_cmd(model, run_dir, config), capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "LOCALALIGN_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_when(model, run_dir, config, ready) -> None:
    """Start a run and SIGKILL it as soon as `ready(run_dir)` holds (polled)."""
    p = subprocess.Popen(align_cmd(model, run_dir, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "LOCALALIGN_THREADS": "2"})
    try:
        deadline = time.time() + 900
        while not ready(run_dir):
            assert p.poll() is None, "the run ended before the kill point"
            assert time.time() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL


def outputs(run_dir: Path) -> dict[str, str]:
    names = ["final.gguf", "round-1/samples.jsonl", "round-2/samples.jsonl", "round-1/rejected.jsonl",
             "round-2/rejected.jsonl", "round-1/train/adapter", "round-2/train/adapter", "round-2/model.gguf"]
    return {n: hash_path(run_dir / n) for n in names}


def generation_in_progress(run_dir: Path) -> bool:
    # round-2 samples written after a pass, and the stage not finished
    m = run_dir / "manifest.json"
    return (run_dir / "round-2" / "rejected.jsonl").exists() and "round-2/generate" not in (m.read_text() if m.exists() else "")


def training_in_progress(run_dir: Path) -> bool:
    ckpts = run_dir / "round-1" / "train" / "checkpoints"
    return ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())


@pytest.mark.slow
def test_two_rounds_then_kill_and_resume_give_the_same_outputs(tiny_chat_model, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN_TOML)

    # 1. uninterrupted
    clean = tmp_path / "clean"
    r = run_align(tiny_chat_model, clean, config)
    assert Path(r.stdout.strip()) == clean / "final.gguf"
    for n in (1, 2):
        assert len([1 for _ in open(clean / f"round-{n}" / "samples.jsonl")]) == 6
        assert (clean / f"round-{n}" / "eval.json").exists()
        assert json.loads((clean / f"round-{n}" / "model.gguf.parity.json").read_text())["ok"]
    manifest = json.loads((clean / "manifest.json").read_text())["stages"]
    assert {"base/export", "base/eval", "round-1/generate", "round-1/train", "round-1/export", "round-1/eval",
            "round-2/generate", "round-2/train", "round-2/export", "round-2/eval", "final"} <= set(manifest)
    assert (clean / "report.md").exists() and list(clean.glob("*.png"))
    assert "round 2: accepted 6" in r.stderr
    assert "* = shipped as" in r.stderr

    # 2. killed during round-1 training, then during round-2 generation, resumed each time
    crashed = tmp_path / "crashed"
    kill_when(tiny_chat_model, crashed, config, training_in_progress)
    assert not (crashed / "final.gguf").exists()
    kill_when(tiny_chat_model, crashed, config, generation_in_progress)
    r = run_align(tiny_chat_model, crashed, config)
    assert "done earlier, outputs verified; skipping" in r.stderr
    assert outputs(crashed) == outputs(clean)

    # 3. a finished run re-run is all skips, and changes nothing
    before = outputs(crashed)
    r = run_align(tiny_chat_model, crashed, config)
    assert "[round-2/eval] done earlier" in r.stderr
    assert outputs(crashed) == before


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_one_round_end_to_end_on_another_family(family, tmp_path, seeds_dir):
    """A round of the whole loop on a family other than llama: its chat format in the generated
    data, its targets in training, its converter in the export, parity at every crossing."""
    from localalign.gguf_header import read_gguf_header
    from tiny_families import build_tiny_family, folder_name
    from tiny_model import fit_tiny_to_chats

    pairs = [(json.loads(line)["prompt"], json.loads(line)["response"]) for line in open(seeds_dir / "safety.jsonl")]
    base = build_tiny_family(family, tmp_path / "base" / folder_name(family))
    chat = fit_tiny_to_chats(base, tmp_path / folder_name(family), pairs, steps=200)
    config = tmp_path / "run.toml"
    # Gemma's tiny SentencePiece vocabulary (512 pieces) spends about twice SmolLM2's tokens on a text.
    config.write_text(TINY_RUN_TOML.replace("rounds = 2", "rounds = 1\nrehearsal = 0")
                      .replace("max_prompt_tokens = 48", "max_prompt_tokens = 128")
                      .replace("max_response_tokens = 96", "max_response_tokens = 192"))
    run = tmp_path / "run"
    r = run_align(chat, run, config)
    assert Path(r.stdout.strip()) == run / "final.gguf"
    assert len(open(run / "round-1" / "samples.jsonl").read().splitlines()) == 6
    assert json.loads((run / "round-1" / "model.gguf.parity.json").read_text())["ok"]
    arch = {"qwen3": "qwen3", "gemma3": "gemma3"}[family]
    assert read_gguf_header(run / "final.gguf")["general.architecture"] == arch
    assert f"family:       {family}" in r.stderr


def test_a_run_directory_refuses_another_config(tiny_hf_dir, tmp_path):
    from localalign.align import AlignRun, load_config
    from localalign.errors import UserError

    run_dir = tmp_path / "run"
    AlignRun(load_config(None, {"model": str(tiny_hf_dir), "samples": 5}), run_dir).check_config(resume=False, seeds=60)
    with pytest.raises(UserError, match=r"different config \(differs in: samples\)"):
        AlignRun(load_config(None, {"model": str(tiny_hf_dir), "samples": 6}), run_dir).check_config(resume=False, seeds=60)
    with pytest.raises(UserError, match="nothing to resume"):
        AlignRun(load_config(None, {"model": str(tiny_hf_dir)}), tmp_path / "new").check_config(resume=True, seeds=60)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"export": "zip"}, "export must be 'merged' or 'adapter'"),
        ({"domain": "poetry"}, "unknown domain 'poetry'"),
        ({"train": {"r": 0}}, "r must be >= 1"),
        ({"generation": {"temperature": -1.0}}, "temperature must be >= 0"),
        ({"quant": "q3_bogus"}, "quant 'q3_bogus' is not one of"),
    ],
)
def test_invalid_config_values(values, message):
    from localalign.align import load_config
    from localalign.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(None, values)


@pytest.mark.slow
def test_baselines_and_adapter_export_mode(tiny_chat_model, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN_TOML.replace("rounds = 2", 'rounds = 1\nbaselines = true\nexport = "adapter"'))
    run_dir = tmp_path / "run"
    r = run_align(tiny_chat_model, run_dir, config)
    report = (run_dir / "report.md").read_text()
    for label in ("base", "sft-seeds", "icl-knn", "round-1"):
        assert label in report
    assert (run_dir / "round-1" / "adapter.gguf").exists() and not (run_dir / "round-1" / "model.gguf").exists()
    assert json.loads((run_dir / "round-1" / "adapter.gguf.parity.json").read_text())["ok"]
    # an adapter round still ships one self-contained file
    from localalign.gguf_header import read_gguf_header

    assert read_gguf_header(run_dir / "final.gguf")["general.architecture"] == "llama"
    assert (run_dir / "Modelfile").read_text().startswith("FROM ./final.gguf")
    assert "ADAPTER" not in (run_dir / "Modelfile").read_text()
    assert "icl-knn" in r.stderr


def test_baselines_without_the_in_context_ones_train_sft_on_the_seeds_alone(tmp_path, monkeypatch):
    """baselines_in_context = false: SFT on the seeds is trained, exported and scored; ICL-kNN and
    URIAL-style are not evaluated (their prompts carry seed pairs)."""
    from localalign.align import AlignRun, load_config
    from localalign.samples import Sample

    calls = []
    monkeypatch.setattr(AlignRun, "train", lambda self, name, *a: calls.append(name) or tmp_path / "adapter")
    monkeypatch.setattr(AlignRun, "export", lambda self, name, *a: calls.append(name) or "form")
    monkeypatch.setattr(AlignRun, "evaluate", lambda self, name, form, out, **kw: calls.append(name) or {"name": name})
    seeds = [Sample("a request", "an answer")]
    run = AlignRun(load_config(None, {"baselines": True, "baselines_in_context": False}), tmp_path / "run")
    assert set(run.baselines(tmp_path, "base-form", seeds)) == {"sft-seeds"}
    assert calls == ["baselines/sft-seeds/train", "baselines/sft-seeds/export", "baselines/sft-seeds/eval"]
    calls.clear()
    run = AlignRun(load_config(None, {"baselines": True}), tmp_path / "run2")
    assert set(run.baselines(tmp_path, "base-form", seeds)) == {"sft-seeds", "icl-knn", "urial"}
    assert calls[-2:] == ["baselines/icl-knn/eval", "baselines/urial/eval"]


def test_the_printed_table_shows_every_suite_the_run_scored(tmp_path):
    """A gain bought with another metric must show: over-refusal sits beside the score's metrics."""
    from localalign.align import format_summary, load_config

    rec = lambda v, n: {"value": v, "ci_low": 0.0, "ci_high": 1.0, "n": n}  # noqa: E731

    def result(harmful, benign, over):
        return {"suites": {"safety": {"metrics": {"harmful_refusal_rate": rec(harmful, 24),
                                                  "benign_helpfulness_rate": rec(benign, 20)}},
                           "over-refusal": {"metrics": {"over_refusal_rate": rec(over, 100)}}}}

    config = load_config(None, {"eval_suites": ["safety", "over-refusal"]})
    results = {"base": result(0.0, 1.0, 0.01), "round-1": result(0.5, 0.9, 0.23)}
    table = format_summary(results, config, tmp_path, "round-1", 0.5, {}, {"round-1": {"accepted": 7}})
    header, _, base, round1 = table.strip().splitlines()[:4]
    assert "over-refusal/over_refusal_rate" in header
    assert "0.010" in base and "0.230" in round1 and round1.startswith("round-1 *")
    assert "over-refusal" not in format_summary(results, load_config(None, {}), tmp_path, "round-1", 0.5, {})

    # every metric of another suite, both halves of the contrast suite, but no per-area breakdown
    for r, (safe, unsafe) in zip(results.values(), ((0.01, 0.05), (0.26, 0.47))):
        r["suites"]["contrast"] = {"metrics": {"safe_twin_refusal_rate": rec(safe, 174),
                                               "unsafe_twin_refusal_rate": rec(unsafe, 174),
                                               "safe_twin_refusal_rate/homonym": rec(0.5, 30)}}
    config = load_config(None, {"eval_suites": ["safety", "over-refusal", "contrast"]})
    header = format_summary(results, config, tmp_path, "round-1", 0.5, {}).strip().splitlines()[0]
    assert "contrast/safe_twin_refusal_rate" in header and "contrast/unsafe_twin_refusal_rate" in header
    assert "homonym" not in header
