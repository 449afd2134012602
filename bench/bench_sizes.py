"""What fits this machine: random-weight models at the real shapes of the models users bring.

    .venv/bin/python bench/bench_sizes.py [--models smollm2-360m,qwen3-0.6b,...] [--no-docs]

For each shape (transformers' own config class at the published sizes of SmolLM2-360M,
Qwen3-0.6B, Llama-3.2-1B and Qwen2.5-1.5B; SmolLM2-135M, the default, as the anchor; weights
random, since speed and memory do not depend on their values) and SmolLM2's tokenizer padded to
the model's vocabulary, each stage runs in a fresh process of its own, which reports its wall
time and its peak resident memory (VmHWM; children included, e.g. the converter):

1. export      llama.cpp's converter to f16, then llama.cpp's quantizer to q8_0 (what a round does)
2. generation  the q8_0 file with localalign's BatchGenerator at parallel = "auto" (32 on a CPU):
               32 prompts of ~140 tokens, 128 tokens each: prompt tokens/s and written tokens/s
3. training    localalign's trainer (its defaults: LoRA r 16; bf16 only on a CPU that has it natively) on 16 of the safety
               seeds for one epoch (2 optimizer steps): tokens/s and peak memory
4. merge       the trained adapter folded in, exported to q8_0 and parity-checked (export_merged)

and projects the time of a round of 24 and of 256 accepted samples from the default model's
measured token counts per round (ROUND_TOKENS below). Rewrites its section of docs/benchmarks.md.
The same numbers calibrate `align`'s estimate before it starts (localalign/fit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tiny models' tokenizer helpers (tests/tiny_families.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_sizes -->", "<!-- /bench_sizes -->"

# Published shapes (config.json of each model on the hub), random weights.
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)),
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                                 rope_theta=1000000.0)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                                   rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                   rope_theta=1000000.0)),
}
# Tokens a round puts through the model, measured on the default model (docs/benchmarks.md:
# make run's rounds and the 256-sample round): per accepted sample, prompt tokens read and tokens
# written by generation (rejects included); per trained sample-epoch, tokens; the fixed part of a
# round (rehearsal is once per run and left out), the held-out evaluation's tokens.
ROUND_TOKENS = {"read_per_sample": 290, "written_per_sample": 372, "train_tokens_per_sample": 160,
                "train_samples_fixed": 60 + 32, "epochs": 3, "eval_read": 144 * 60, "eval_written": 144 * 80}


def vm_hwm_mb() -> float:
    """Peak resident memory of this process and its waited-for children, in MB."""
    own = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(own, children)


# ------------------------------------------------------------------ stages (each in a fresh process)


def build(name: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tiny_families import CHATML, bpe_tokenizer, qwen_tokenizer

    arch, dims = SHAPES[name]
    tok = (qwen_tokenizer(out, CHATML) if arch.startswith("qwen") else bpe_tokenizer(out, CHATML))
    cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                       "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[arch]
    config = config_cls(**dims, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = cls(config)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)


def export(hf: Path, out: Path) -> dict:
    from localalign.convert.converter import convert_hf
    from localalign.convert.quantize import quantize_gguf

    t0 = time.perf_counter()
    f16 = convert_hf(hf, out.with_suffix(".f16.gguf"), "f16")
    t1 = time.perf_counter()
    quantize_gguf(f16, out, "q8_0")
    f16.unlink()
    return {"convert_s": round(t1 - t0, 1), "quantize_s": round(time.perf_counter() - t1, 1),
            "q8_0_mb": round(out.stat().st_size / 1e6)}


def generate(gguf: Path) -> dict:
    from localalign.engine.base import GenerationConfig
    from localalign.engine.llamacpp import BatchGenerator
    from localalign.paths import SEEDS_DIR
    from localalign.samples import read_samples

    seeds = read_samples(SEEDS_DIR / "safety.jsonl")
    with BatchGenerator(gguf, GenerationConfig(max_tokens=128, n_ctx=1024)) as gen:
        prompts = [gen.tokenize(gen.chat_prompt([{"role": "user", "content": f"{a.prompt}\n{b.prompt}\n{c.prompt}"}]))
                   for a, b, c in zip(seeds[0:32], seeds[10:42], seeds[20:52])]
        # A random model rarely ends a turn: what it writes until max_tokens is the writing cost.
        t0 = time.perf_counter()
        out = gen.run(prompts)
        seconds = time.perf_counter() - t0
        written = sum(c.n_generated for c in out)
        read = sum(len(p) for p in prompts)
        return {"parallel": gen.parallel, "read_tokens": read, "written_tokens": written, "seconds": round(seconds, 1),
                "tokens_per_s": round((read + written) / seconds, 1), "written_per_s": round(written / seconds, 1)}


def train_(hf: Path, out: Path) -> dict:
    from localalign.paths import SEEDS_DIR
    from localalign.samples import read_samples
    from localalign.train.config import TrainConfig
    from localalign.train.lora import train

    samples = read_samples(SEEDS_DIR / "safety.jsonl")[:16]
    res = train(hf, samples, out, TrainConfig(epochs=1, progress=False, checkpoint_every=1000), log=lambda m: None)
    return {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 1),
            "tokens_per_s": round(res.tokens_per_s, 1)}


def merge(hf: Path, adapter: Path, out: Path) -> dict:
    from localalign.export.pipeline import export_merged

    t0 = time.perf_counter()
    report = export_merged(hf, adapter, out, quant="q8_0")
    return {"seconds": round(time.perf_counter() - t0, 1), "parity": report.ok,
            "top1": report.details.get("top1_agreement")}


def child(stage: str, args: list[str]) -> None:
    """Run one stage in this (fresh) process; print its result and peak memory as JSON."""
    t0 = time.perf_counter()
    if stage == "build":
        build(args[0], Path(args[1]))
        result = {}
    elif stage == "export":
        result = export(Path(args[0]), Path(args[1]))
    elif stage == "generate":
        result = generate(Path(args[0]))
    elif stage == "train":
        result = train_(Path(args[0]), Path(args[1]))
    else:
        result = merge(Path(args[0]), Path(args[1]), Path(args[2]))
    print("RESULT " + json.dumps({**result, "wall_s": round(time.perf_counter() - t0, 1), "peak_mb": round(vm_hwm_mb())}))


def run_stage(stage: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench_sizes: stage {stage} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ the table


def params_of(hf: Path) -> int:
    from localalign.checks.model_input import inspect_hf

    return inspect_hf(hf.name, hf).dims.params


def round_minutes(row: dict, samples: int) -> float:
    """A round of `samples` accepted samples: generation, training, merge + export, evaluation."""
    t = ROUND_TOKENS
    gen_tps = row["generate"]["written_per_s"]
    read_tps = row["generate"]["tokens_per_s"]  # prompt reading runs at least at the mixed rate
    generation = samples * (t["written_per_sample"] / gen_tps + t["read_per_sample"] / read_tps)
    train_tokens = (t["train_samples_fixed"] + samples) * t["train_tokens_per_sample"] * t["epochs"]
    training = train_tokens / row["train"]["tokens_per_s"]
    evaluation = t["eval_written"] / gen_tps + t["eval_read"] / read_tps
    return (generation + training + row["merge"]["seconds"] + evaluation) / 60


def precision() -> str:
    from localalign.train.model import cpu_has_native_bf16

    return "bf16: this CPU has it natively" if cpu_has_native_bf16() else "fp32: this CPU has no native bf16"


def fit_table(rows: dict[str, dict]) -> str:
    """localalign/fit.py's MEASURED, from these rows."""
    lines = ["MEASURED: tuple[tuple[float, float, float, float, float, float], ...] = ("]
    for r in rows.values():
        peak = max(r[s]["peak_mb"] for s in ("export", "generate", "train", "merge"))
        lines.append(f"    ({r['params']}, {r['generate']['tokens_per_s']}, {r['generate']['written_per_s']}, "
                     f"{r['train']['tokens_per_s']}, {r['merge']['seconds']}, {peak}e6),")
    return "\n".join(lines + [")"])


def report(rows: dict[str, dict]) -> list[str]:
    import platform

    lines = [
        "## What fits this machine (issue 25)",
        "",
        "`bench/bench_sizes.py`: random-weight models at the published shapes, SmolLM2's tokenizer padded to each",
        "model's vocabulary; every stage a fresh process (wall time, peak resident memory with its children).",
        "Generation: q8_0, `parallel = auto` (32 sequences on a CPU), 32 prompts x 128 tokens. Training:",
        f"localalign's defaults (LoRA r 16, {precision()}), 16 seeds, 1 epoch. Merge: adapter folded in, q8_0, parity checked.",
        f"Projected round: the default model's measured tokens per round ({ROUND_TOKENS['written_per_sample']} written and",
        f"{ROUND_TOKENS['read_per_sample']} read per accepted sample, {ROUND_TOKENS['epochs']} epochs over the seeds, the samples",
        "and 32 rehearsal samples at ~160 tokens each, the safety + over-refusal evaluation), at each model's rates.",
        "",
        "| model shape | params | export s (f16 + q8_0) | peak GB | gen tok/s (read+written) | written tok/s | peak GB "
        "| train tok/s | peak GB | merge+export+parity s | peak GB | round, 24 samples | round, 256 samples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        e, g, t, m = r["export"], r["generate"], r["train"], r["merge"]
        lines.append(
            f"| {name} | {r['params'] / 1e9:.2f} B | {e['convert_s'] + e['quantize_s']:.0f} | {e['peak_mb'] / 1e3:.1f} "
            f"| {g['tokens_per_s']:.0f} | {g['written_per_s']:.0f} | {g['peak_mb'] / 1e3:.1f} | {t['tokens_per_s']:.0f} "
            f"| {t['peak_mb'] / 1e3:.1f} | {m['seconds']:.0f} | {m['peak_mb'] / 1e3:.1f} "
            f"| {round_minutes(r, 24):.0f} min | {round_minutes(r, 256):.0f} min |")
    lines += ["", f"- machine: {platform.machine()}, {os.cpu_count()} cores; load average at the end "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.strftime('%Y-%m-%d %H:%M')}",
              "- raw results: `bench/out/sizes.json` (not committed)"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shapes to measure")
    parser.add_argument("--no-docs", action="store_true", help="print the section, do not rewrite docs/benchmarks.md")
    parser.add_argument("--work", help="keep the built models in this folder (default: a temp dir, deleted)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"bench_sizes: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    results_path = REPO / "bench" / "out" / "sizes.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(results_path.read_text()) if results_path.exists() else {}
    try:
        for name in names:
            d = work / name
            hf = d / "hf"
            if not (hf / "config.json").exists():
                run_stage("build", name, hf)
            row = {"params": params_of(hf)}
            print(f"{name}: {row['params'] / 1e9:.2f} B parameters", flush=True)
            row["export"] = run_stage("export", hf, d / "model.q8_0.gguf")
            print(f"  export {row['export']}", flush=True)
            row["generate"] = run_stage("generate", d / "model.q8_0.gguf")
            print(f"  generate {row['generate']}", flush=True)
            shutil.rmtree(d / "train", ignore_errors=True)  # a kept work folder's last run: train anew
            row["train"] = run_stage("train", hf, d / "train")
            print(f"  train {row['train']}", flush=True)
            row["merge"] = run_stage("merge", hf, d / "train" / "adapter", d / "merged.q8_0.gguf")
            print(f"  merge {row['merge']}", flush=True)
            rows[name] = row
            results_path.write_text(json.dumps(rows, indent=1))
            if not args.work:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ordered = {n: rows[n] for n in SHAPES if n in rows}
    from benchdoc import publish

    publish(DOCS, report(ordered), BEGIN, END, write=not args.no_docs)
    print("\nfor localalign/fit.py:\n" + fit_table(ordered))


if __name__ == "__main__":
    main()
