"""Benchmark: batched generation against one create_completion call per sample.

    .venv/bin/python bench/bench_generate.py [--prompts 32] [--max-tokens 128] [--parallel 8] [--threads 2] [--no-docs]

Same model (the default GGUF), same prompts (the safety seeds' requests in the model's chat
template), same max tokens and sampling settings (temperature 0.8, top-p 0.95, top-k 40,
a seed per prompt), same thread count, in one run:

- baseline: llama-cpp-python's high-level `Llama.create_completion`, called once per prompt,
  as a straightforward implementation would;
- ours: `localalign.engine.llamacpp.BatchGenerator.complete` on all prompts (multi-sequence
  llama_batch decoding, `--parallel` sequences per forward pass, shared-prefix KV copy).

Two model files, each measured both ways: the default model as shipped (Q4_1), and the same
model as Q8_0 (its HF copy written by localalign's exporter and quantized by llama.cpp).
llama.cpp's CPU matrix kernels reuse weights across a batch for Q8_0/Q4_0 but not for
Q4_1, where a batch of 8 costs about 4.5 single steps; the format decides how much
batching can give.

Tokens/s = generated tokens / wall time of the whole set, prompt reading included (that is
what a user waits for). Rewrites its section of docs/benchmarks.md (`<!-- bench_generate -->`
markers) with the numbers and the load average before and after: the box may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localalign.fsutil import atomic_write_text  # noqa: E402
from localalign.engine.base import GenerationConfig, derive_seed  # noqa: E402
from localalign.engine.llamacpp import BatchGenerator  # noqa: E402
from localalign.engine.runtime import load_llama  # noqa: E402
from localalign.paths import SEEDS_DIR  # noqa: E402
from localalign.samples import read_samples  # noqa: E402
from benchdoc import default_model, load_average, update_section

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_generate -->", "<!-- /bench_generate -->"
TARGET_RATIO = 3.0  # the target on 2 cores


def run_baseline(gguf: Path, prompts: list[str], cfg: GenerationConfig) -> tuple[float, int, list[str]]:
    llm = load_llama(gguf, n_ctx=cfg.n_ctx, threads=cfg.threads)
    try:
        texts, tokens = [], 0
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            out = llm.create_completion(
                p,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                min_p=0.0,  # our chain has no min-p; keep the two samplers the same
                seed=derive_seed(cfg.seed, i),
            )
            texts.append(out["choices"][0]["text"])
            tokens += out["usage"]["completion_tokens"]
        return time.perf_counter() - t0, tokens, texts
    finally:
        llm.close()


def run_batched(gguf: Path, prompts: list[str], cfg: GenerationConfig) -> tuple[float, int, list[str]]:
    with BatchGenerator(gguf, cfg) as gen:
        t0 = time.perf_counter()
        results = gen.run([gen.tokenize(p) for p in prompts])
        seconds = time.perf_counter() - t0
    return seconds, sum(r.n_generated for r in results), [r.texts[0] for r in results]


def make_q8_0(hf_dir: Path, work: Path) -> Path:
    from localalign.convert.converter import convert_hf
    from localalign.convert.quantize import quantize_gguf

    f16 = convert_hf(hf_dir, work / "model.f16.gguf", out_type="f16")
    return quantize_gguf(f16, work / "model.q8_0.gguf", "q8_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default="8,16,32", help="also time BatchGenerator on the Q8_0 file at these --parallel values")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    files = default_model()
    seeds = read_samples(SEEDS_DIR / "safety.jsonl")
    cfg = GenerationConfig(threads=args.threads, parallel=args.parallel, max_tokens=args.max_tokens, n_ctx=1024, seed=0)
    with BatchGenerator(files.gguf, cfg) as gen:  # only to render the chat template
        prompts = [gen.chat_prompt([{"role": "user", "content": s.prompt}]) for s in seeds[: args.prompts]]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        models = [("Q4_1 (as shipped)", files.gguf)]
        if files.hf_dir is not None:
            models.append(("Q8_0 (from the HF copy)", make_q8_0(files.hf_dir, Path(tmp))))
        load_before = load_average()
        rows = []
        for label, path in models:
            base = run_baseline(path, prompts, cfg)
            ours = run_batched(path, prompts, cfg)
            rows.append((label, base, ours))
        # How many sequences to decode together: the same prompts on the Q8_0 file that
        # `align` generates with, only the batch width changing.
        sweep = []
        if len(models) > 1:
            for width in [int(w) for w in args.sweep.split(",") if w]:
                seconds, tokens, _ = run_batched(models[1][1], prompts, replace(cfg, parallel=width))
                print(f"Q8_0 batched, {width} sequences: {tokens} tok / {seconds:.1f} s = {tokens / seconds:.1f} tok/s")
                sweep.append((width, seconds, tokens))
        load_after = load_average()

    lines, ratios = [], []
    for label, (bs, bt, btexts), (os_, ot, otexts) in rows:
        ratio = (ot / os_) / (bt / bs)
        ratios.append(ratio)
        print(f"{label}: loop {bt} tok / {bs:.1f} s = {bt / bs:.1f} tok/s; batched {ot} tok / {os_:.1f} s = {ot / os_:.1f} tok/s; ratio {ratio:.2f}x")
        lines.append(f"| {label} | `create_completion` loop | {bt} | {bs:.1f} s | {bt / bs:.1f} | |")
        lines.append(f"| {label} | `BatchGenerator`, {args.parallel} sequences | {ot} | {os_:.1f} s | {ot / os_:.1f} | **{ratio:.2f}x** |")
    headline = ratios[0]
    cross = ""
    if len(rows) > 1:
        q41_loop = rows[0][1][1] / rows[0][1][0]
        q8_batched = rows[1][2][1] / rows[1][2][0]
        cross = (
            f"Batched on Q8_0 against the loop on the shipped Q4_1: **{q8_batched / q41_loop:.2f}x**. "
            "Generating from a Q8_0 (or Q4_0) file is the way to the issue's 3x on this CPU."
        )
    print(f"load average before {load_before}, after {load_after}")
    if args.no_docs:
        return
    table = "\n".join(lines)
    sweep_table = "\n".join(f"| {w} | {t} | {sec:.1f} s | {t / sec:.1f} |" for w, sec, t in sweep)
    sweep_section = f"""
Batch width on the Q8_0 file (`--sweep`), same prompts, `BatchGenerator` only; `GenerationConfig.parallel`
defaults to the best width measured here:

| sequences decoded together | generated tokens | wall time | tokens/s |
|---|---|---|---|
{sweep_table}
""" if sweep else ""
    body = f"""## Batched generation (issue 3): default model

`.venv/bin/python bench/bench_generate.py --prompts {args.prompts} --max-tokens {args.max_tokens} --parallel {args.parallel} --threads {args.threads}`
started {started}; {platform.machine()}, {os.cpu_count()} cores; load average (1/5/15 min) before {load_before}, after {load_after}.
{len(prompts)} safety-seed requests in the chat template; up to {args.max_tokens} new tokens each; temperature {cfg.temperature},
top-p {cfg.top_p}, top-k {cfg.top_k}, one seed per prompt; {args.threads} threads for both. Tokens/s = generated tokens / wall time
for the whole set, prompt reading included.

| model file | how | generated tokens | wall time | tokens/s | batched / loop |
|---|---|---|---|---|---|
{table}

Ratio on the default model as shipped: **{headline:.2f}x** (target: at least {TARGET_RATIO:.0f}x on 2 cores). {cross}
Why the file format matters: one decode step of 8 sequences cost 4.5 single-sequence steps on Q4_1 but 3.4 on Q8_0 and
3.2 on Q4_0 (a separate sweep, `GenerationConfig(parallel=1)` vs `parallel=8`, load average about 6). Our reading of
llama.cpp's CPU backend: its batched matrix kernels (tinyBLAS, the AVX2 Q4_0 repacking) cover Q8_0 and Q4_0, while
Q4_1 falls back to one dot product per (row, token), so batching saves memory traffic but no arithmetic.
{sweep_section}"""
    atomic_write_text(DOCS, update_section(DOCS.read_text() if DOCS.exists() else "# Benchmarks\n", body, BEGIN, END))
    print(f"updated {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
