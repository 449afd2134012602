"""Benchmark: our GGUF writer against llama.cpp's convert_hf_to_gguf.py, same model, same type.

    .venv/bin/python bench/bench_export.py [--out-type f16] [--repeats 3] [--no-docs]

1. Makes a "merged model" the way a round does: a seeded random LoRA (r=8, every linear
   layer) on the default model's HF copy, folded in with `localalign.train.merge.merge_adapter`.
2. Fetches llama.cpp's converter from the llama-cpp-python 0.3.36 source distribution
   (`pip download --no-binary :all: --no-deps`; pip's cache makes later runs fast) and
   extracts `convert_hf_to_gguf.py`, its `conversion/` package and the bundled `gguf-py`
   into a temp dir. It needs `sentencepiece`, which localalign does not: it is installed
   with `pip install --target` into that temp dir, never into the venv.
3. Runs each converter as a fresh process (interpreter start and imports included, as a
   user would run it), alternating, `--repeats` times; reports the median wall time.
4. Checks that both outputs hold identical tensors (names, shapes, types, bytes) with
   GGUFReader, and lists the metadata keys that differ.
5. Unless --no-parity: exports the merged model with `export_model` as f16, q8_0 and q4_k_m
   (parity check included) and records the parity numbers and wall times.
6. Rewrites its section of docs/benchmarks.md (`<!-- bench_export -->` markers) with the
   numbers and the load average before and after (the box may be shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localalign.fsutil import atomic_write_text  # noqa: E402
from benchdoc import DEFAULT_MODEL, default_model, load_average, update_section

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_export -->", "<!-- /bench_export -->"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SENTENCEPIECE = "sentencepiece==0.2.3"
VENDOR = "vendor/llama.cpp/"
TARGET_RATIO = 0.5  # the issue's target: ours in at most half the reference's time


def make_merged_model(hf_dir: Path, work: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from localalign.train.merge import merge_adapter

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    model.save_pretrained(work / "adapter")
    return merge_adapter(hf_dir, work / "adapter", work / "merged")


def fetch_reference(work: Path) -> tuple[Path, str]:
    """(convert_hf_to_gguf.py, PYTHONPATH for it) extracted from the sdist into `work`."""
    py = sys.executable
    subprocess.run(
        [py, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", LLAMA_CPP_PYTHON, "-d", str(work / "sdist")],
        check=True,
    )
    (sdist,) = (work / "sdist").glob("llama_cpp_python-*.tar.gz")
    dest = work / "ref"
    with tarfile.open(sdist) as tar:
        wanted = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition(VENDOR)
            if rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/")):
                m.name = rel
                wanted.append(m)
        tar.extractall(dest, members=wanted, filter="data")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(work / "sp"), SENTENCEPIECE], check=True
    )
    return dest / "convert_hf_to_gguf.py", os.pathsep.join([str(dest / "gguf-py"), str(work / "sp")])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{res.stderr[-3000:]}")
    return dt


def compare_gguf(ours: Path, ref: Path) -> tuple[int, list[str], list[str]]:
    """(tensor count, tensor differences, metadata keys that differ) between two GGUF files."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(str(ours), "r"), GGUFReader(str(ref), "r")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    problems = [f"only in ours: {n}" for n in sorted(set(ta) - set(tb))]
    problems += [f"only in reference: {n}" for n in sorted(set(tb) - set(ta))]
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            problems.append(f"{name}: bytes differ")
    keys = [k for k in sorted(set(a.fields) | set(b.fields)) if not k.startswith("GGUF.")]
    meta = [
        k for k in keys
        if k not in a.fields or k not in b.fields or a.fields[k].contents() != b.fields[k].contents()
    ]
    return len(ta), problems, meta


def parity_runs(merged: Path, work: Path) -> list[str]:
    from localalign.errors import UserError
    from localalign.export.pipeline import export_model

    rows = []
    for quant in (None, "q8_0", "q4_k_m"):
        label = quant or "f16"
        t0 = time.perf_counter()
        try:
            report = export_model(merged, work / f"export.{label}.gguf", quant=quant, out_type="f16")
        except UserError as e:  # parity failed: the row says so, the run goes on
            rows.append(f"| {label} | - | - | - | - | - | FAILED: {e} |")
            continue
        dt = time.perf_counter() - t0
        d = report.details
        rows.append(
            f"| {label} | {dt:.1f} | {d['max_abs_logit_diff']:.3f} | {d.get('max_abs_logit_tol', '-')} "
            f"| {d['top1_agreement']:.3f} | {d['min_top1_agreement']} | {'ok' if report.ok else 'FAILED'} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-type", default="f16", choices=["f32", "f16", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--no-parity", action="store_true", help="skip the export_model parity runs")
    args = parser.parse_args()

    files = default_model()
    load_before = load_average()
    scratch = REPO / "bench" / "out"  # git-ignored; same disk as the repo (files of ~1 GB)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=scratch) as tmp:
        work = Path(tmp)
        print("preparing the merged model and the reference converter ...", flush=True)
        merged = make_merged_model(files.hf_dir, work)
        converter, ref_path = fetch_reference(work)
        ours_out, ref_out = work / f"ours.{args.out_type}.gguf", work / f"ref.{args.out_type}.gguf"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        ref_env = dict(os.environ, PYTHONPATH=ref_path)
        ours_cmd = [
            sys.executable, "-c",
            f"from localalign.convert.gguf_writer import write_gguf; write_gguf({str(merged)!r}, {str(ours_out)!r}, {args.out_type!r})",
        ]
        ref_cmd = [sys.executable, str(converter), str(merged), "--outfile", str(ref_out), "--outtype", args.out_type]
        t_ours, t_ref = [], []
        for i in range(args.repeats):
            t_ref.append(timed(ref_cmd, ref_env))
            t_ours.append(timed(ours_cmd, env))
            print(f"run {i + 1}: reference {t_ref[-1]:.2f} s, ours {t_ours[-1]:.2f} s", flush=True)
        n_tensors, problems, meta = compare_gguf(ours_out, ref_out)
        size_mb = ours_out.stat().st_size / 1e6
        parity_rows = [] if args.no_parity else parity_runs(merged, work)
    load_after = load_average()

    ours, ref = statistics.median(t_ours), statistics.median(t_ref)
    ratio = ours / ref
    identical = not problems
    lines = [
        "## GGUF export (issue 5)",
        "",
        f"`bench/bench_export.py`: the default model ({DEFAULT_MODEL}) with a seeded random LoRA merged in,",
        f"written as {args.out_type} by `localalign.convert.gguf_writer.write_gguf` and by llama.cpp's `convert_hf_to_gguf.py`",
        f"from the {LLAMA_CPP_PYTHON} source distribution (its bundled gguf-py, {SENTENCEPIECE} in a temp dir).",
        "Each is a fresh process (interpreter start and imports included), alternating; median of",
        f"{args.repeats} runs.",
        "",
        "| converter | median wall s | runs (s) |",
        "|---|---|---|",
        f"| llama.cpp convert_hf_to_gguf.py | {ref:.2f} | {', '.join(f'{t:.2f}' for t in t_ref)} |",
        f"| localalign write_gguf | {ours:.2f} | {', '.join(f'{t:.2f}' for t in t_ours)} |",
        "",
        f"- ours / reference: **{ratio:.2f}** (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})",
        f"- tensors: {n_tensors}, {size_mb:.0f} MB; identical names, shapes, types and bytes: "
        f"**{'yes' if identical else 'NO'}**" + ("" if identical else f" ({len(problems)} differ: {problems[:5]})"),
        f"- metadata keys that differ: {', '.join(meta) if meta else 'none'}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; load average before {load_before}, after {load_after}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
    ]
    if parity_rows:
        lines += [
            "",
            "`export_model` on the same merged model (write, quantize with llama.cpp, parity check against HF",
            "on the probe prompts of `localalign.checks.parity`, which holds the tolerances):",
            "",
            "| output | wall s | max abs logit diff | bound | top-1 agreement | bound | parity |",
            "|---|---|---|---|---|---|---|",
            *parity_rows,
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(DOCS, update_section(DOCS.read_text() if DOCS.exists() else "# Benchmarks\n", body, BEGIN, END))
        print(f"updated {DOCS}")
    if not identical:
        raise SystemExit("the two converters wrote different tensors")


if __name__ == "__main__":
    main()
