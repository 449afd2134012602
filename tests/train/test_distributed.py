"""Data-parallel training (torchrun, gloo on CPU) and the device/precision choices.

The end-to-end tests start `python -m torch.distributed.run --standalone --nproc_per_node 2
-m localalign train` on the tiny model and compare its adapter with a single-process run of
the same config: `batch_size * grad_accum` is the global step size, so both must learn the
same weights. In fp32 (`--fp32`) the only differences are the order of floating-point sums
(two partial gradients added by the all-reduce, other padding widths): measured 1e-5 at
most after 4 steps, against updates of lr=3e-3 per step. Without the gradient all-reduce
each process would learn from its half of the data alone: weights off by about a step's
update, far outside atol=1e-4 (and the trainer itself stops when the processes' weights differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localalign.engine.runtime import gpu_layers
from localalign.errors import UserError
from localalign.samples import Sample, write_samples
from localalign.train.checkpoint import latest_checkpoint
from localalign.train.config import TrainConfig
from localalign.train.distributed import (
    World,
    backend_for,
    refuse_under_launcher,
    shard,
    threads_per_process,
    world_from_env,
)
from localalign.train.lora import train
from localalign.train.model import choose_precision

REPO = Path(__file__).resolve().parents[2]
SAMPLES = [
    Sample(f"What is {i} plus {i}?", f"The answer is {2 * i}. Water boils at 100 degrees.") for i in range(10)
] + [Sample("Say hi.", "Hi! I can help with that.", system="Be brief.")]
# 11 samples, 4 per micro-batch, 2 micro-batches per step: 2 steps per epoch, the second
# with one micro-batch of 3 samples (split 2 + 1 between the processes).
SETTINGS = dict(epochs=2, batch_size=4, grad_accum=2, learning_rate=3e-3, seed=0, checkpoint_every=1)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- pure choices


def test_world_from_env_reads_the_launcher_variables():
    assert world_from_env({}) == World()
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    w = world_from_env(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.is_main, w.distributed) == (3, 4, 1, 2, False, True)
    assert world_from_env({"RANK": "0", "WORLD_SIZE": "2"}).is_main
    for bad in ({"WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(UserError):
            world_from_env(bad)


def test_shards_cover_a_micro_batch_once_and_stay_balanced():
    items = list(range(7))
    parts = [shard(items, World(r, 3, r, 3)) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert [len(p) for p in parts] == [3, 2, 2]
    assert shard(items, World()) == items


def test_threads_and_backend_choices():
    assert threads_per_process(None, cores=2, local_size=2) == 1
    assert threads_per_process(None, cores=16, local_size=4) == 4
    assert threads_per_process(None, cores=2, local_size=4) == 1
    assert threads_per_process(3, cores=2, local_size=2) == 3
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"


def test_precision_choice():
    assert choose_precision("cuda", cpu_bf16=False, cuda_bf16_supported=True) == "bf16"
    assert choose_precision("cuda", cpu_bf16=True, cuda_bf16_supported=False) == "fp32"
    assert choose_precision("cpu", cpu_bf16=True, cuda_bf16_supported=False) == "bf16"
    assert choose_precision("cpu", cpu_bf16=False, cuda_bf16_supported=True) == "fp32"
    # a CPU without native bf16 (AVX2 only) is given fp32 whatever cpu_bf16 says: torch emulates bf16 there
    assert choose_precision("cpu", cpu_bf16=True, cuda_bf16_supported=False, cpu_native_bf16=False) == "fp32"
    from localalign.train.model import cpu_has_native_bf16

    assert cpu_has_native_bf16(["avx2", "avx512_bf16"]) and not cpu_has_native_bf16(["avx2", "fma", "f16c"])


def test_device_choice_with_a_pretend_gpu(monkeypatch):
    """The CUDA branch of pick_device/precision_for, with torch.cuda faked (no GPU here)."""
    from localalign.train.model import pick_device, precision_for

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1) and chosen == [1]
    assert pick_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(UserError, match="no GPU of its own"):
        pick_device("cuda", local_rank=2)
    assert precision_for(torch.device("cuda", 0), TrainConfig()) == "fp32"  # pre-Ampere: no bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision_for(torch.device("cuda", 0), TrainConfig(cpu_bf16=False)) == "bf16"


def test_llama_gpu_layers_choice():
    assert gpu_layers("auto", supports_offload=True) == -1
    assert gpu_layers("auto", supports_offload=False) == 0
    assert gpu_layers("auto", supports_offload=True, env="12") == 12
    assert gpu_layers("auto", supports_offload=True, env="auto") == -1
    assert gpu_layers(8, supports_offload=True, env="0") == 8  # an explicit setting wins over the env
    assert gpu_layers(0, supports_offload=False) == 0
    with pytest.raises(UserError, match="no GPU offload"):
        gpu_layers(-1, supports_offload=False)
    with pytest.raises(UserError, match="no GPU offload"):
        gpu_layers("auto", supports_offload=False, env="4")
    for bad in ("many", -2):
        with pytest.raises(UserError):
            gpu_layers(bad, supports_offload=True)


def test_align_and_small_batches_refuse_a_launcher(monkeypatch, tiny_hf_dir, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(UserError, match="torchrun --nproc_per_node N -m localalign train"):
        refuse_under_launcher("align", env)
    refuse_under_launcher("align", {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="batch_size=1 is smaller than the 2 processes"):
        train(tiny_hf_dir, SAMPLES, tmp_path, TrainConfig(batch_size=1, progress=False), log=lambda m: None)


# --------------------------------------------------------------------------- two processes


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-4)


def torchrun_train(data: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), LOCALALIGN_THREADS="1")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "learning_rate"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "localalign", "train", "--model", str(model), "--data", str(data), "--out", str(out),
           f"--lr={SETTINGS['learning_rate']}", "--fp32", "--no-progress", *flags, *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def single(**kw) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, "progress": False, "threads": 1, "cpu_bf16": False, **kw})


@pytest.mark.slow
def test_two_gloo_processes_learn_the_single_process_adapter(tiny_hf_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    write_samples(data, SAMPLES)
    one = train(tiny_hf_dir, SAMPLES, tmp_path / "one", single(), log=lambda m: None)
    proc = torchrun_train(data, tiny_hf_dir, tmp_path / "two")
    two = tmp_path / "two"
    assert_same_adapter(tmp_path / "one", two)
    log = [json.loads(x) for x in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, one.steps + 1))  # one writer: no duplicate lines
    assert [r["loss"] for r in log] == pytest.approx(one.losses, rel=1e-5)
    assert proc.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    assert proc.stderr.count("2 processes (gloo)") == 1
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoints", "train_config.json", "train_log.jsonl"]
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-000004"]


class Stop(Exception):
    pass


def stop_at(n: int):
    def on_step(rec):
        if rec.step == n:
            raise Stop

    return on_step


@pytest.mark.slow
def test_two_processes_resume_a_single_process_checkpoint(tiny_hf_dir, tmp_path):
    """Every process loads the checkpoint; the config means the same with 1 or 2 processes."""
    data = tmp_path / "data.jsonl"
    write_samples(data, SAMPLES)
    train(tiny_hf_dir, SAMPLES, tmp_path / "one", single(), log=lambda m: None)
    with pytest.raises(Stop):
        train(tiny_hf_dir, SAMPLES, tmp_path / "cut", single(), log=lambda m: None, on_step=stop_at(2))
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-000002"
    proc = torchrun_train(data, tiny_hf_dir, tmp_path / "cut", "--resume")
    assert "resuming from" in proc.stderr and proc.stderr.count("resuming from") == 1
    assert_same_adapter(tmp_path / "one", tmp_path / "cut")
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
