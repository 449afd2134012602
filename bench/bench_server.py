"""Benchmark: generation through the `openai` backend against llama_cpp.server, parallel vs serial.

    .venv/bin/python bench/bench_server.py [--requests 16] [--max-tokens 64] [--concurrency 8] [--threads 2] [--q8] [--no-docs]

One run, one server (llama-cpp-python's `python -m llama_cpp.server` on 127.0.0.1, serving
the default model), the same prompts (safety-seed requests in the model's chat template),
the same sampling (temperature 0.8, top-p 0.95, top-k 40, a seed per prompt), measured:

- serial: `--backend openai --concurrency 1`, one request at a time;
- parallel: `--concurrency N`, N requests in flight;
- embedded: `BatchGenerator` in this process on the same prompts (reference; the server is
  stopped while it runs, so the two never share the cores).

Tokens/s = generated tokens (the server's usage.completion_tokens) / wall time of the whole
set. llama_cpp.server takes a lock around its single Llama object for every request
(llama_cpp/server/app.py `get_llama_proxy`: llama_outer_lock + llama_inner_lock), so
parallel requests queue there: the ratio shows what concurrency buys against a server that
does not batch (the HTTP round trips overlap, nothing else). Servers with continuous
batching (llama-server -np N, vLLM) decode parallel requests together; see docs/scaling.md.

Rewrites its section of docs/benchmarks.md (`<!-- bench_server -->` markers) with the
numbers and the load average before and after: the box may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localalign.engine.base import BackendConfig, GenerationConfig  # noqa: E402
from localalign.engine.llamacpp import BatchGenerator  # noqa: E402
from localalign.engine.local_server import llama_cpp_server  # noqa: E402
from localalign.engine.select import open_generator  # noqa: E402
from localalign.evaluation.suites.truthfulness import load_mc_items, mc1_pick  # noqa: E402
from localalign.fsutil import atomic_write_text  # noqa: E402
from localalign.paths import SEEDS_DIR  # noqa: E402
from localalign.samples import read_samples  # noqa: E402
from benchdoc import DEFAULT_MODEL, default_model, load_average, update_section  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_server -->", "<!-- /bench_server -->"


def timed_run(gen, prompts: list[str]) -> tuple[float, int, list[str]]:
    ids = [gen.tokenize(p) for p in prompts]
    t0 = time.perf_counter()
    results = gen.run(ids)
    return time.perf_counter() - t0, sum(r.n_generated for r in results), [r.texts[0] for r in results]


def timed_scores(gen, items) -> tuple[float, list[list[float]]]:
    """Multiple-choice log-likelihoods (the truthfulness suite's scoring) for `items`."""
    t0 = time.perf_counter()
    scores = [gen.score_continuations(gen.chat_prompt([{"role": "user", "content": it.prompt}]), it.choices) for it in items]
    return time.perf_counter() - t0, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mc-items", type=int, default=1, help="truthfulness items scored through both backends")
    ap.add_argument("--q8", action="store_true", help="serve a Q8_0 copy (from the HF copy) instead of the shipped Q4_1")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    files = default_model()
    seeds = read_samples(SEEDS_DIR / "safety.jsonl")
    mc_items = load_mc_items(SEEDS_DIR / "truthfulness.heldout.jsonl")[: args.mc_items]
    cfg = GenerationConfig(threads=args.threads, parallel=8, max_tokens=args.max_tokens, n_ctx=1024, seed=0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        gguf, label = files.gguf, "Q4_1 (as shipped)"
        if args.q8:
            from localalign.convert.converter import convert_hf
            from localalign.convert.quantize import quantize_gguf

            gguf = quantize_gguf(convert_hf(files.hf_dir, Path(tmp) / "f16.gguf", out_type="f16"), Path(tmp) / "q8_0.gguf", "q8_0")
            label = "Q8_0 (from the HF copy)"
        rows, mc = {}, {}
        with llama_cpp_server(gguf, n_ctx=2048, threads=args.threads) as url:
            for name, concurrency in (("serial", 1), ("parallel", args.concurrency)):
                with open_generator(gguf, cfg, BackendConfig("openai", url, concurrency=concurrency)) as gen:
                    prompts = [gen.chat_prompt([{"role": "user", "content": s.prompt}]) for s in seeds[: args.requests]]
                    if name == "serial":
                        gen.complete(prompts[:1], max_tokens=1)  # warm-up: the first request loads nothing twice
                    rows[name] = timed_run(gen, prompts)
                    if name == "parallel":
                        mc["openai"] = timed_scores(gen, mc_items)
                print(f"{name} (concurrency {concurrency}): {rows[name][1]} tok / {rows[name][0]:.1f} s = {rows[name][1] / rows[name][0]:.1f} tok/s")
        with BatchGenerator(gguf, cfg) as gen:
            rows["embedded"] = timed_run(gen, prompts)
            mc["embedded"] = timed_scores(gen, mc_items)
        diff = max(abs(a - b) for x, y in zip(mc["openai"][1], mc["embedded"][1]) for a, b in zip(x, y))
        picks = sum(mc1_pick(x) == mc1_pick(y) for x, y in zip(mc["openai"][1], mc["embedded"][1]))
        print(f"MC scoring, {len(mc_items)} items x 4 choices: server {mc['openai'][0]:.1f} s, embedded {mc['embedded'][0]:.1f} s, "
              f"max |logprob diff| {diff:.2e}, same pick {picks}/{len(mc_items)}")
        print(f"embedded BatchGenerator: {rows['embedded'][1]} tok / {rows['embedded'][0]:.1f} s = {rows['embedded'][1] / rows['embedded'][0]:.1f} tok/s")
    load_after = load_average()

    rate = {k: t / s for k, (s, t, _) in rows.items()}
    ratio = rate["parallel"] / rate["serial"]
    same = sum(a == b for a, b in zip(rows["serial"][2], rows["parallel"][2]))
    print(f"parallel / serial: {ratio:.2f}x; identical texts {same}/{len(prompts)}; load before {load_before}, after {load_after}")
    if args.no_docs:
        return
    body = f"""## Generation on a server (issue 9): `--backend openai` against llama_cpp.server

`.venv/bin/python bench/bench_server.py --requests {args.requests} --max-tokens {args.max_tokens} --concurrency {args.concurrency} --threads {args.threads}{' --q8' if args.q8 else ''}`
started {started}; {platform.machine()}, {os.cpu_count()} cores; load average (1/5/15 min) before {load_before}, after {load_after}.
Model: {DEFAULT_MODEL}, {label}, served by llama-cpp-python {_version()}'s `python -m llama_cpp.server` on 127.0.0.1
({args.threads} threads). {len(prompts)} safety-seed requests in the chat template, up to {args.max_tokens} new tokens each,
temperature {cfg.temperature}, top-p {cfg.top_p}, top-k {cfg.top_k}, a seed per request. Tokens/s = generated tokens / wall time of the set.

| how | requests in flight | generated tokens | wall time | tokens/s |
|---|---|---|---|---|
| `--backend openai`, serial | 1 | {rows['serial'][1]} | {rows['serial'][0]:.1f} s | {rate['serial']:.1f} |
| `--backend openai`, parallel | {args.concurrency} | {rows['parallel'][1]} | {rows['parallel'][0]:.1f} s | {rate['parallel']:.1f} |
| embedded `BatchGenerator` (reference, server stopped) | {cfg.parallel} sequences | {rows['embedded'][1]} | {rows['embedded'][0]:.1f} s | {rate['embedded']:.1f} |

Multiple choice (the truthfulness suite's log-likelihood scoring, `echo` + `logprobs`), {len(mc_items)} item(s) x 4 choices:
{mc['openai'][0]:.1f} s through the server (with the one-time alignment probe, 2 requests) against {mc['embedded'][0]:.1f} s
embedded (with loading the scorer); largest difference between the two backends'
per-choice log-likelihoods {diff:.1e}, same answer picked for {picks} of {len(mc_items)} items. The server's time goes into
llama-cpp-python's echo path, which sorts the whole vocabulary for every prompt token (`Llama._create_completion`).

Parallel / serial: **{ratio:.2f}x**; the two runs wrote identical texts for {same} of {len(prompts)} requests (same seeds).
Why about 1x: llama_cpp.server holds one `Llama` object behind a lock (llama_cpp/server/app.py, `get_llama_proxy`:
`llama_outer_lock` and `llama_inner_lock` around every request), so requests in flight wait for each other and
are decoded one at a time; concurrency only overlaps the HTTP round trips. A server with continuous batching
(llama.cpp's `llama-server -np N`, vLLM) decodes the requests in flight together, which is what `--concurrency`
is for; the embedded row shows what batching the same model gives on this CPU.
"""
    atomic_write_text(DOCS, update_section(DOCS.read_text() if DOCS.exists() else "# Benchmarks\n", body, BEGIN, END))
    print(f"updated {DOCS.relative_to(REPO)}")


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama_cpp_python")


if __name__ == "__main__":
    main()
