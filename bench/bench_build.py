"""Benchmark: llama.cpp builds and GGUF formats, prompt reading and batched writing.

    .venv/bin/python bench/bench_build.py [--baseline SITE_DIR] [--label NAME] [--reps 2] [--no-docs]

For each model file (the default model as shipped, Q4_1; its HF copy exported to Q8_0 and
Q4_0) and each llama-cpp-python build (the one installed in the venv; with --baseline, also
one installed elsewhere with `pip install --target SITE_DIR`), a fresh child process measures:

- prompt reading: one 512-token batch decoded from an empty cache (llama-bench's pp512),
  the median of 3;
- batched writing: `BatchGenerator` with 32 sequences, 32 safety-seed requests, 64 new
  tokens each, temperature 0.8 (the ISARA step's shape), generated tokens / wall time.

Builds alternate (A, B, A, B, ...) so that load on a shared box hits both alike; the table
shows the median over --reps. Rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import default_model, load_average, publish  # noqa: E402

from localalign.paths import SEEDS_DIR  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_build -->", "<!-- /bench_build -->"
PROMPT_TOKENS = 512
SEQUENCES, NEW_TOKENS = 32, 64


def child(gguf: str, threads: int) -> dict:
    """Runs inside the child process, with whichever llama_cpp its sys.path finds first."""
    from localalign.engine.base import GenerationConfig
    from localalign.engine.llamacpp import BatchGenerator
    from localalign.engine.build import llama_cpp_lib_dir
    from localalign.engine.runtime import load_llama
    from localalign.samples import read_samples

    seeds = read_samples(SEEDS_DIR / "safety.jsonl")
    llm = load_llama(gguf, n_ctx=PROMPT_TOKENS + 8, n_batch=PROMPT_TOKENS, threads=threads)
    text = " ".join(s.response for s in seeds)
    tokens = llm.tokenize(text.encode(), add_bos=True)[:PROMPT_TOKENS]
    reads = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        reads.append(len(tokens) / (time.perf_counter() - t0))
    llm.close()
    cfg = GenerationConfig(threads=threads, parallel=SEQUENCES, max_tokens=NEW_TOKENS, n_ctx=512)
    with BatchGenerator(gguf, cfg) as gen:
        prompts = [gen.tokenize(gen.chat_prompt([{"role": "user", "content": s.prompt}])) for s in seeds[:SEQUENCES]]
        t0 = time.perf_counter()
        results = gen.run(prompts)
        seconds = time.perf_counter() - t0
    written = sum(r.n_generated for r in results)
    return {"read_tok_s": statistics.median(reads), "write_tok_s": written / seconds, "lib": str(llama_cpp_lib_dir())}


def measure(gguf: Path, site: str | None, threads: int) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    code = f"import json, sys; sys.path.insert(1, {str(REPO / 'bench')!r}); import bench_build; " \
           f"print(json.dumps(bench_build.child({str(gguf)!r}, {threads})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_files(work: Path) -> dict[str, Path]:
    from localalign.convert.converter import convert_hf
    from localalign.convert.quantize import quantize_gguf

    files = default_model()
    f16 = convert_hf(files.hf_dir, work / "model.f16.gguf", out_type="f16")
    return {
        "Q4_1 (as shipped)": files.gguf,
        "Q8_0": quantize_gguf(f16, work / "model.q8_0.gguf", "q8_0"),
        "Q4_0": quantize_gguf(f16, work / "model.q4_0.gguf", "q4_0"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="site-packages dir holding another llama-cpp-python build")
    ap.add_argument("--baseline-label", default="baseline build")
    ap.add_argument("--label", default="localalign's build (`make setup`)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    builds = [(args.label, None)] + ([(args.baseline_label, args.baseline)] if args.baseline else [])
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(Path(tmp))
        for rep in range(args.reps):
            for fmt, path in files.items():
                for label, site in (builds if rep % 2 == 0 else builds[::-1]):
                    r = measure(path, site, args.threads)
                    rows.setdefault((fmt, label), []).append(r)
                    print(f"{fmt:18s} {label:40s} read {r['read_tok_s']:6.0f} tok/s  write {r['write_tok_s']:6.1f} tok/s",
                          flush=True)
    load_after = load_average()

    lines = [
        "## llama.cpp build and model format (bench/bench_build.py)",
        "",
        f"`.venv/bin/python bench/bench_build.py{' --baseline ' + args.baseline if args.baseline else ''}` "
        f"started {started}; load average before {load_before}, after {load_after}; {args.threads} threads.",
        f"Prompt reading: one {PROMPT_TOKENS}-token batch from an empty cache (pp{PROMPT_TOKENS}), median of 3. "
        f"Batched writing: {SEQUENCES} sequences x {NEW_TOKENS} new tokens, generated tokens / wall time. "
        f"Median of {args.reps} child processes per cell, builds alternating.",
        "",
        "| model file | build | prompt reading tok/s | batched writing tok/s |",
        "|---|---|---:|---:|",
    ]
    for (fmt, label), rs in rows.items():
        read = statistics.median(r["read_tok_s"] for r in rs)
        write = statistics.median(r["write_tok_s"] for r in rs)
        lines.append(f"| {fmt} | {label} | {read:.0f} | {write:.1f} |")
    if args.baseline:
        lines += ["", "Ratio of the two builds (ours / baseline):", ""]
        for fmt in files:
            ours, base = rows[(fmt, args.label)], rows[(fmt, args.baseline_label)]
            r_read = statistics.median(r["read_tok_s"] for r in ours) / statistics.median(r["read_tok_s"] for r in base)
            r_write = statistics.median(r["write_tok_s"] for r in ours) / statistics.median(r["write_tok_s"] for r in base)
            lines.append(f"- {fmt}: prompt reading {r_read:.2f}x, batched writing {r_write:.2f}x")
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
