"""Crash and fault tests: real `localalign` processes killed or starved of disk at chosen points.

A kill at a moment that polling cannot hit (a temp file finished and fsynced, not yet renamed
over its final name) comes from the test-only hook in localalign/fsutil.py:
LOCALALIGN_FAULT="rename:<name glob>[#N][=KILL|INT|ENOSPC]". After every fault the test checks
that nothing at a final name is partial (every JSONL, JSON, GGUF and safetensors file parses
whole; the manifest's recorded hashes verify), and then that the same command, run again,
finishes, with the same result as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from localalign.checks.hf_files import check_safetensors_header
from localalign.gguf_header import check_gguf_file, read_gguf_header
from localalign.rundir import Manifest, hash_path
from localalign.samples import iter_jsonl
from test_align import TINY_RUN_TOML

ENV = {"LOCALALIGN_THREADS": "2", "HF_HUB_OFFLINE": "1"}


def localalign(*args, fault: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOCALALIGN_FAULT"}
    env.update(ENV, **({"LOCALALIGN_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "localalign", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=_sigint_default)


def _sigint_default() -> None:
    """Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &`, nohup, some CI
    runners) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_ok(r) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def assert_killed(r) -> None:
    assert r.returncode == -signal.SIGKILL, f"rc {r.returncode}: {r.stderr[-3000:]}"


def assert_interrupted(r) -> None:
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "interrupted; everything written so far is kept"


def assert_disk_full(r) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "disk full" in errors[0], r.stderr[-3000:]


def assert_sound(root: Path) -> None:
    """No file at a final name is partial, and the manifest's recorded hashes still hold."""
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # temp files are hidden, and never read
        if p.suffix == ".jsonl":
            list(iter_jsonl(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".gguf":
            check_gguf_file(p)
        elif p.suffix == ".safetensors":
            check_safetensors_header(p)
    if (root / "manifest.json").exists():
        for stage, entry in Manifest.load(root).stages.items():
            for rel, digest in entry["outputs"].items():
                assert hash_path(root / rel) == digest, f"{stage}: {rel} no longer matches the manifest"


def hidden(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob(".*")}


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def seeds8(seeds_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seeds.jsonl"
    path.write_text("".join(open(seeds_dir / "safety.jsonl").readlines()[:8]))
    return path


def train_args(model: Path, data: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--out", out, "--epochs", 2, "--batch-size", 2,
            "--checkpoint-every", 1, "--no-progress", *extra]


@pytest.mark.slow
def test_training_killed_at_a_checkpoint_and_at_the_adapter_resumes_to_the_same_adapter(tiny_hf_dir, seeds8, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert_ok(localalign(*train_args(tiny_hf_dir, seeds8, clean)))

    # SIGKILL with the third checkpoint written in full but not yet renamed into place
    assert_killed(localalign(*train_args(tiny_hf_dir, seeds8, crashed), fault="rename:step-*#3"))
    steps = sorted(p.name for p in (crashed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert steps == ["step-000002"]
    assert not (crashed / "adapter").exists()
    assert_sound(crashed)

    # SIGKILL again, with the final adapter written but not renamed
    assert_killed(localalign(*train_args(tiny_hf_dir, seeds8, crashed, "--resume"), fault="rename:adapter"))
    assert not (crashed / "adapter").exists()
    assert_sound(crashed)

    assert_ok(localalign(*train_args(tiny_hf_dir, seeds8, crashed, "--resume")))
    assert hash_path(crashed / "adapter") == hash_path(clean / "adapter")
    assert [json.loads(x)["loss"] for x in open(crashed / "train_log.jsonl")] == \
           [json.loads(x)["loss"] for x in open(clean / "train_log.jsonl")]


# ---------------------------------------------------------------------------- export and quantization


@pytest.mark.slow
def test_export_and_quantization_interrupted_keep_the_earlier_file(tiny_hf_dir, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    export = ["export", "--model", tiny_hf_dir, "--out", out]
    assert_ok(localalign(*export))  # an earlier f16 export, which no failure below may touch
    earlier = hash_path(out)

    # SIGKILL with the float GGUF (the quantizer's input) finished but not renamed
    assert_killed(localalign(*export, "--quant", "q8_0", fault="rename:.model.gguf.f16"))
    assert hash_path(out) == earlier
    assert_sound(out.parent)

    # Ctrl-C with the quantized file finished but not renamed: one line, exit 130, temps gone
    before = hidden(out.parent)
    assert_interrupted(localalign(*export, "--quant", "q8_0", fault="rename:.model.gguf.unchecked=INT"))
    assert hash_path(out) == earlier
    assert hidden(out.parent) <= before
    assert_sound(out.parent)

    assert_ok(localalign(*export, "--quant", "q8_0"))
    assert read_gguf_header(out)["general.file_type"] == 7  # q8_0 (llama_ftype MOSTLY_Q8_0)
    assert json.loads((out.parent / "model.gguf.parity.json").read_text())["ok"]


# ---------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_disk(d: Path, size: str):
    """A tmpfs of `size` at `d`, resizable with `grow(d)`; None if this system refuses mounts."""
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True)
    if r.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", d], capture_output=True)


def grow(d: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", d], check=True)


@pytest.mark.slow
def test_disk_full_during_export_is_one_line_and_a_rerun_finishes(tiny_hf_dir, tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "96k") as mounted:  # the tiny model's f16 GGUF is ~220 KB
        fault = None if mounted else "rename:.model.gguf.unchecked=ENOSPC"
        export = ["export", "--model", tiny_hf_dir, "--out", disk / "model.gguf"]
        assert_disk_full(localalign(*export, fault=fault))
        assert list(disk.iterdir()) == []  # no partial file, no temp file left behind
        if mounted:
            grow(disk)  # "free some space"
        assert_ok(localalign(*export))
        check_gguf_file(disk / "model.gguf")


@pytest.mark.slow
def test_disk_full_during_a_training_checkpoint(tiny_hf_dir, seeds8, tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, "64k") as mounted:  # a checkpoint of the tiny model's LoRA is ~300 KB
        fault = None if mounted else "rename:step-*=ENOSPC"
        args = train_args(tiny_hf_dir, seeds8, disk / "train")
        assert_disk_full(localalign(*args, fault=fault))
        assert_sound(disk)
        if mounted:
            grow(disk)
        r = localalign(*args, "--resume")
        assert_ok(r)
        assert (disk / "train" / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------- the whole loop


def align_args(model: Path, run_dir: Path, config: Path) -> list:
    return ["align", "--domain", "safety", "--model", model, "--run-dir", run_dir, "--config", config]


# What must come out byte-identical. Not eval.json (it records wall times) nor the usearch
# graph file (HNSW levels are drawn at random per process; its vectors and samples are compared).
ROUND_OUTPUTS = ["round-1/samples.jsonl", "round-1/rejected.jsonl", "round-1/index/samples.jsonl",
                 "round-1/index/index.json", "round-1/train/adapter", "round-1/model.gguf", "base/model.gguf",
                 "final.gguf"]


def scores(run_dir: Path) -> dict:
    result = json.loads((run_dir / "round-1" / "eval.json").read_text())
    return {s: {m: r["value"] for m, r in d["metrics"].items()} for s, d in result["suites"].items()}

# (fault, how the process must end): one per stage, in the order the run reaches them. Each
# run picks up where the one before it stopped.
ALIGN_FAULTS = [
    ("rename:manifest.json#2", assert_killed),  # mid-manifest update (base/eval being recorded)
    ("rename:rejected.jsonl#2", assert_killed),  # generation: pass 2's accepted file written, its rejects not
    ("rename:index.json", assert_killed),  # the sample index: vectors and sidecar written, metadata not
    ("rename:step-*#2=ENOSPC", assert_disk_full),  # training: the disk fills at the second checkpoint
    ("rename:.model.gguf.unchecked=INT", assert_interrupted),  # Ctrl-C as round 1's quantized GGUF is done
    ("rename:final.gguf", assert_killed),  # the last copy
]


@pytest.mark.slow
def test_align_faulted_at_every_stage_resumes_to_the_uninterrupted_result(tiny_chat_model, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN_TOML.replace("rounds = 2", "rounds = 1"))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert_ok(localalign(*align_args(tiny_chat_model, clean, config)))
    expected = {name: hash_path(clean / name) for name in ROUND_OUTPUTS}

    for fault, ended in ALIGN_FAULTS:
        r = localalign(*align_args(tiny_chat_model, crashed, config), fault=fault)
        ended(r)
        assert_sound(crashed)
        assert not (crashed / "final.gguf").exists()
    r = localalign(*align_args(tiny_chat_model, crashed, config))
    assert_ok(r)
    assert "done earlier, outputs verified; skipping" in r.stderr
    assert {name: hash_path(crashed / name) for name in ROUND_OUTPUTS} == expected
    assert scores(crashed) == scores(clean)
    assert not [p for p in crashed.rglob(".*.tmp")]  # the killed runs' temp files were cleared

    # A file damaged after the fact is not taken as valid: its stage runs again.
    model = crashed / "round-1" / "model.gguf"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    r = localalign(*align_args(tiny_chat_model, crashed, config))
    assert_ok(r)
    assert "[round-1/export] ..." in r.stderr and "[round-1/train] done earlier" in r.stderr
    assert {name: hash_path(crashed / name) for name in ROUND_OUTPUTS} == expected


def test_a_resumed_generation_keeps_only_unbroken_decisions_so_no_reject_is_lost(embedder):
    """The accepted and rejected files are written one after the other; a kill between the two
    (ALIGN_FAULTS' "rename:rejected.jsonl#2") leaves the latest rejects out. A resume keeps the
    unbroken run of decided indices and decides the rest again."""
    from localalign.isara.step import IsaraConfig, generate_samples
    from scripted_model import SEEDS, ScriptedGenerator, distinct

    def script(i):  # every third candidate is cut off and rejected
        return ("a question cut", "length", "", "stop") if i % 3 == 2 else distinct(i)

    isara = IsaraConfig(branches=1)
    full_acc, full_rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=4, isara=isara)
    assert [s.meta["index"] for s in full_acc] == [0, 1, 3, 4] and [s.meta["index"] for s in full_rej] == [2]
    # the files as a kill between the two writes leaves them: every accepted sample, no reject yet
    on_disk = ([s for s in full_acc], [])
    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=4, isara=isara, resume=on_disk)
    assert acc == full_acc and rej == full_rej
