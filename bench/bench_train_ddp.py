"""Data-parallel training benchmark: `localalign train` as 1 process vs 2 torchrun processes (gloo).

Same data, same config, same global batch (batch_size x grad_accum samples per optimizer
step, split across the processes), so both runs learn the same adapter; the table shows the
time and how far apart the adapters end. The 1-process run gets every core as torch
threads; each of the 2 processes gets its share (localalign.train.distributed.threads_per_process).

    .venv/bin/python bench/bench_train_ddp.py              # tiny model + default model, ~3-5 min on 2 cores
    .venv/bin/python bench/bench_train_ddp.py --only tiny --no-docs

Writes its part of docs/scaling.md (between the bench_train_ddp markers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchdoc import DEFAULT_MODEL, load_average, update_section  # noqa: E402

from localalign.models import model_dir  # noqa: E402
from localalign.paths import SEEDS_DIR  # noqa: E402

DOCS = REPO / "docs" / "scaling.md"
DEFAULT_HF = model_dir(DEFAULT_MODEL) / "hf"
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


def run_train(procs: int, model: Path, data: Path, out: Path, flags: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = str(REPO)
    head = [sys.executable, "-m", "localalign"]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "localalign"]
    cmd = head + ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    tokens, seconds = sum(r["tokens"] for r in log), sum(r["seconds"] for r in log)
    return {"wall": wall, "loop": seconds, "tokens": tokens, "tok_s": tokens / seconds, "steps": len(log),
            "loss": log[-1]["loss"], "out": out}


def max_adapter_diff(a: Path, b: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    ta, tb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    scale = max(float(ta[k].abs().max()) for k in ta)
    return diff, scale


def case(name: str, model: Path, data: Path, flags: list[str], tmp: Path) -> list[str]:
    print(f"{name}: 1 process ...", flush=True)
    one = run_train(1, model, data, tmp / f"{name}-1", flags)
    print(f"{name}: 2 processes ...", flush=True)
    two = run_train(2, model, data, tmp / f"{name}-2", flags)
    diff, scale = max_adapter_diff(one["out"], two["out"])
    rows = []
    for procs, r in ((1, one), (2, two)):
        rows.append(
            f"| {name} | {procs} | {r['steps']} | {r['tokens']} | {r['wall']:.1f} | {r['loop']:.1f} | {r['tok_s']:.0f} "
            f"| {r['loss']:.4f} | {'-' if procs == 1 else f'{diff:.1e} (of {scale:.2f})'} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tiny", "default"], help="run one case")
    ap.add_argument("--samples", type=int, default=24, help="seed samples for the default model")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    from localalign.samples import Sample, read_samples, write_samples
    from tiny_model import build_tiny_llama

    started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as t:
        tmp = Path(t)
        if args.only in (None, "tiny"):
            hf = build_tiny_llama(tmp / "tiny")
            data = tmp / "tiny.jsonl"
            write_samples(data, [Sample(f"What is {i} plus {i}?", f"The answer is {2 * i}. " * (1 + i % 5)) for i in range(64)])
            rows += case("tiny, fp32", hf, data, ["--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--fp32"], tmp)
        if args.only in (None, "default"):
            if not (DEFAULT_HF / "config.json").exists():
                print("default model not materialized (make models): skipped")
            else:
                data = tmp / "seeds.jsonl"
                write_samples(data, read_samples(SEEDS_DIR / "safety.jsonl")[: args.samples])
                rows += case("SmolLM2-135M, bf16", DEFAULT_HF, data, ["--epochs", "1", "--batch-size", "4", "--grad-accum", "2"], tmp)
    load_after = load_average()
    body = f"""<!-- measured by bench/bench_train_ddp.py: do not edit by hand -->
Run: `.venv/bin/python bench/bench_train_ddp.py` on {started}, {os.cpu_count()} CPUs;
load average (1/5/15 min) before {load_before}, after {load_after}.
Both runs: the same samples and config, {4 * 2} samples per optimizer step in all (batch 4 x accumulation 2;
with 2 processes each takes half of every micro-batch). Wall = the whole command (imports, model
load, training, writing); loop = the training steps only; tokens/s = real tokens / loop time.

| model | processes | steps | tokens | wall s | loop s | tokens/s | last loss | adapter max abs diff vs 1 process |
|---|---:|---:|---:|---:|---:|---:|---:|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_docs:
        if not DOCS.exists():
            DOCS.write_text("# Scaling localalign\n")
        DOCS.write_text(update_section(DOCS.read_text(), body, "<!-- bench_train_ddp -->", "<!-- /bench_train_ddp -->"))
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
