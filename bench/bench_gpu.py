"""GPU benchmark (issue 17): our trainer against transformers.Trainer + peft, generation width, a round.

    python bench/bench_gpu.py                    # a CUDA machine: training + generation -> docs/benchmarks.md
    python bench/bench_gpu.py --round            # also a whole 256-sample round by stage -> docs/scaling.md
    python bench/bench_gpu.py --device cpu --tiny --no-docs --round   # a dry run of every path on a CPU
    python bench/bench_gpu.py --parts train --results r.json   # a run in parts (train while llama.cpp builds),
    python bench/bench_gpu.py --parts gen,round --results r.json   # then the rest; docs from all of r.json
    python bench/bench_gpu.py --parts round --results r.json --budget 120   # stopped at 120 s, what ran kept
    bash bench/gpu_session.sh                    # all of it in one 8-minute call on a fresh GPU machine

A worker stopped at --budget, or one that crashes, leaves what it finished: each width of the sweep,
each stage of the round (results "timed_out" / "failed", with the end of its stderr); the report says
what was not measured.

Needs torch (a CUDA build), transformers and peft; the generation sweep and the round also need
llama-cpp-python built with CUDA (docs/scaling.md, "One GPU"). No model files: the model is
SmolLM2-135M's shape with random weights, built here from the config and tokenizer in
bench/smollm2-135m-shape/ (speed depends on the shape, not on the weights).

What it measures, each in its own process (its own CUDA context and peak memory):
- training, 256 samples x 3 epochs, the same samples per optimizer step (4 x 2) for both, bf16:
  localalign's trainer at its defaults and transformers.Trainer + peft; whole-run tokens/s (the
  training loop; model loading excluded), steady tokens/s (steps 4 on), the first steps' times, the
  peak GPU memory; then a short second run of each under torch.profiler: the share of a few steady
  steps' wall time the GPU spends in kernels, the largest CPU costs, and (ours) the host-device
  syncs CUDA's sync-debug mode reports;
- generation: BatchGenerator on the model's q8_0 GGUF, all layers offloaded, at several widths
  and at parallel="auto" (a setting "+fa" also turns llama.cpp's flash attention on), the same
  prompts each;
- `--round`: the stages of a 256-sample round (generation, training, export, evaluation) in one
  process, as `localalign align` runs them. A random model writes no usable sample, so generation
  is a proxy doing the default round's measured work: 360 candidates from 90 few-shot prompts
  (4 branches each), a 48-token request and a 155-token answer each (the last measured round wrote
  73k tokens for 360 candidates, docs/benchmarks.md); training is the seeds plus 256 samples (316)
  for 3 epochs; export merges, writes q8_0 and checks parity; evaluation is the held-out safety
  suite. The answers re-read their few-shot prompt (the real stream continues its cache), and a
  random model writes every reply to its limit: both make the proxy an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPE_DIR = REPO / "bench" / "smollm2-135m-shape"
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
DOCS_BENCH, DOCS_SCALING = REPO / "docs" / "benchmarks.md", REPO / "docs" / "scaling.md"
MARKERS_BENCH = ("<!-- bench_gpu -->", "<!-- /bench_gpu -->")
MARKERS_ROUND = ("<!-- bench_gpu_round -->", "<!-- /bench_gpu_round -->")
STEADY_FROM = 4  # steady tokens/s counts steps 4 on (the first three set kernels and allocator up)
# The round's generation proxy: the default round's last measured work (see the docstring).
ROUND = {"candidates": 360, "branches": 4, "k": 4, "request_tokens": 48, "answer_tokens": 155, "samples": 316}
# A dry run's settings (--device cpu or --tiny), where the command line does not set them.
DRY = {"samples": 16, "epochs": 1, "profile_steps": "2:3", "gen_prompts": 8, "gen_tokens": 8, "widths": "2,4,auto,auto+fa",
       "eval_limit": 2}
PARTS = ("train", "gen", "round")
DRY_ROUND = {"candidates": 8, "branches": 2, "k": 2, "request_tokens": 8, "answer_tokens": 8, "samples": 12}


# --------------------------------------------------------------------------- pure pieces


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def steady_rate(log: list[dict], start: int = STEADY_FROM) -> float | None:
    """Tokens per second over the logged steps numbered `start` on (None if there are none)."""
    rest = [r for r in log if r["step"] >= start]
    seconds = sum(r["seconds"] for r in rest)
    return sum(r["tokens"] for r in rest) / seconds if rest and seconds else None


def bench_samples(n: int, domain: str | None = None):
    """`n` seed samples (every non-held-out seed file, or one domain's), cycled when there are fewer."""
    from localalign.paths import SEEDS_DIR  # package data: the checkout has no top-level seeds/
    from localalign.samples import read_samples

    files = sorted(p for p in SEEDS_DIR.glob(f"{domain or '*'}.jsonl") if not p.name.endswith(".heldout.jsonl"))
    samples = [s for p in files for s in read_samples(p)]
    if not samples:
        sys.exit(f"bench_gpu: no seed files in {SEEDS_DIR}")
    return [samples[i % len(samples)] for i in range(n)]


def width_setting(text: str) -> tuple[int | str, bool]:
    """A sweep setting: ("auto" or a number of sequences, flash attention on) from "64", "auto+fa"."""
    width, _, flag = text.partition("+")
    if flag not in ("", "fa") or not (width == "auto" or width.isdigit()):
        raise ValueError(f"--widths wants settings like 32, auto or auto+fa, got {text!r}")
    return (width if width == "auto" else int(width)), flag == "fa"


def profile_window(text: str) -> tuple[int, int]:
    first, last = (int(x) for x in text.split(":"))
    if not 1 <= first <= last:
        raise ValueError(f"--profile-steps wants FIRST:LAST with 1 <= FIRST <= LAST, got {text!r}")
    return first, last


# --------------------------------------------------------------------------- set-up


def preflight(args) -> None:
    """One line and out, where this machine cannot run the benchmark."""
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_gpu: needs torch, transformers and peft: {e}")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"bench_gpu: torch {torch.__version__} ({build}) sees no CUDA GPU here; run it on a CUDA machine, "
                 "or with --device cpu --tiny for a dry run of its code paths")
    if not (args.shape / "config.json").exists() or not (args.shape / "tokenizer.json").exists():
        sys.exit(f"bench_gpu: {args.shape} has no config.json and tokenizer.json to build the model from")


def build_model_dir(shape: Path, out: Path, tiny: bool, seed: int = 0) -> Path:
    """A random-weight model of `shape`'s config (shrunk with `tiny`) with its tokenizer, as an HF dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (shape / name).exists():
            shutil.copy(shape / name, out / name)
    config = json.loads((shape / "config.json").read_text())
    if tiny:
        config.update(TINY)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_q8_gguf(hf_dir: Path) -> Path:
    """The model as llama.cpp generates from it in a round: q8_0 (localalign's export)."""
    from localalign.convert.converter import convert_hf
    from localalign.convert.quantize import quantize_gguf

    f16 = convert_hf(hf_dir, hf_dir.parent / "model.f16.gguf", out_type="f16")
    out = quantize_gguf(f16, hf_dir.parent / "model.q8_0.gguf", "q8_0")
    f16.unlink()
    return Path(out)


# --------------------------------------------------------------------------- profiling


class StepProfiler:
    """torch.profiler over optimizer steps `first`..`last` (1-based, inclusive): wall time, the
    GPU's busy time (union of its kernels), the largest CPU costs, and on CUDA the syncs that
    CUDA's sync-debug mode warns about. Call `after_step(n)` after each step."""

    def __init__(self, first: int, last: int, cuda: bool):
        import torch

        self.first, self.last, self.cuda = first, last, cuda
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.prof = torch.profiler.profile(activities=acts)
        self.result: dict | None = None
        self._t0 = 0.0
        self._warnings = None
        self._caught: list = []

    def after_step(self, step: int) -> None:
        if step == self.first - 1:
            self._start()
        elif step == self.last:
            self._stop()

    def _start(self) -> None:
        import warnings

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.prof.start()
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        import torch

        syncs = None
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            syncs = sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(None, None, None)
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self.prof.stop()
        self.result = self._summary(wall, syncs)

    def _summary(self, wall: float, syncs: int | None) -> dict:
        from torch.autograd import DeviceType

        events = self.prof.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
        busy = busy_seconds(kernels) / 1e6 if kernels else None
        averages = sorted(self.prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        top = [{"op": e.key, "cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in averages[:10]]
        steps = self.last - self.first + 1
        return {"steps": steps, "wall_s": wall, "gpu_busy_s": busy, "gpu_busy_share": busy / wall if busy else None,
                "top_cpu": top, "syncs": syncs, "syncs_per_step": syncs / steps if syncs is not None else None}


# --------------------------------------------------------------------------- workers (one process each)


def peak_gpu_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def worker_ours(args) -> dict:
    """localalign's trainer at its defaults (only the epochs, threads and device set here)."""
    from localalign.train.config import TrainConfig
    from localalign.train.lora import train

    profiler = StepProfiler(*profile_window(args.profile_steps), args.device == "cuda") if args.profile else None
    cfg = TrainConfig(epochs=args.epochs, progress=False, checkpoint_every=10**6, device=args.device, threads=args.threads)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(args.model, bench_samples(args.samples), tmp, cfg, log=lines.append,
                    on_step=(lambda rec: profiler.after_step(rec.step)) if profiler else None)
        call_s = time.perf_counter() - t0
        log = [json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    return {"tokens": res.tokens, "loop_s": res.seconds, "call_s": call_s, "steps": res.steps,
            "first_steps_s": [r["seconds"] for r in log[:3]], "steady_tokens_per_s": steady_rate(log),
            "final_loss": res.final_loss, "peak_gpu_gb": peak_gpu_gb(args.device), "log": lines,
            "profile": profiler.result if profiler else None}


def worker_hf(args) -> dict:
    """transformers.Trainer + peft as its documentation sets it up: the padding collator, logits at
    every position, bf16 autocast; our encoding (prompt masked), LoRA config and samples per step."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from benchdoc import hf_lora_model  # bench/, this script's folder
    from localalign.train.config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs)
    tok, data, rows, model = hf_lora_model(args.model, bench_samples(args.samples), cfg)
    profiler = StepProfiler(*profile_window(args.profile_steps), args.device == "cuda") if args.profile else None
    clock: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.append((time.perf_counter(), 0))

        def on_step_end(self, a, state, control, **kw):
            clock.append((time.perf_counter(), state.num_input_tokens_seen))
            if profiler:
                profiler.after_step(state.global_step)

    bf16 = args.device != "cuda" or torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, bf16=bf16,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=args.device == "cpu",
            dataloader_num_workers=0, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        )
        trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()],
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    log = [{"step": i, "tokens": n - n0, "seconds": t - t_prev}
           for i, ((t_prev, n0), (t, n)) in enumerate(zip(clock, clock[1:]), 1)]
    tokens = sum(len(e.input_ids) for e in data) * cfg.epochs
    return {"tokens": tokens, "loop_s": seconds, "steps": len(log), "first_steps_s": [r["seconds"] for r in log[:3]],
            "steady_tokens_per_s": steady_rate(log), "final_loss": out.training_loss,
            "peak_gpu_gb": peak_gpu_gb(args.device), "profile": profiler.result if profiler else None}


def worker_gen(args) -> dict:
    """BatchGenerator at each width, the same chat prompts (seed requests) every time."""
    from localalign.engine.base import GenerationConfig
    from localalign.engine.llamacpp import BatchGenerator
    from localalign.engine.runtime import offloads

    if args.device == "cuda" and not offloads():
        return {"skipped": "this llama-cpp-python cannot offload to a GPU (reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\", "
                           "docs/scaling.md) or LOCALALIGN_GPU_LAYERS=0 is set"}
    requests = [s.prompt for s in bench_samples(args.gen_prompts)]
    rows = []
    for setting in args.widths.split(","):
        width, flash = width_setting(setting)
        cfg = GenerationConfig(parallel=width, max_tokens=args.gen_tokens, n_ctx=args.gen_ctx, threads=args.threads,
                               seed=0, flash_attn=flash)
        with BatchGenerator(args.gguf, cfg) as g:
            prompts = [g.tokenize(g.chat_prompt([{"role": "user", "content": r}])) for r in requests]
            t0 = time.perf_counter()
            done = g.run(prompts)
            seconds = time.perf_counter() - t0
            rows.append({"setting": setting, "parallel": g.parallel, "tokens": sum(c.n_generated for c in done),
                         "seconds": seconds})
        save_progress(args, {"rows": rows, "prompts": len(requests)})
    return {"rows": rows, "prompts": len(requests)}


def generation_proxy(gguf: Path, plan: dict, threads: int | None) -> dict:
    """The round's generation work with a model that writes nothing usable (see the docstring):
    few-shot prompts of `k` safety seeds, `branches` requests from each, an answer to each."""
    from localalign.engine.base import GenerationConfig, Job, derive_seed
    from localalign.engine.llamacpp import BatchGenerator
    from localalign.isara.prompts import build_isara_prompt, chat_markers

    seeds = bench_samples(60, "safety")
    rng = random.Random(0)
    n_jobs = -(-plan["candidates"] // plan["branches"])
    with BatchGenerator(gguf, GenerationConfig(threads=threads, seed=0)) as g:
        prompts = [g.tokenize(build_isara_prompt(g.chat_prompt, rng.sample(seeds, plan["k"]))) for _ in range(n_jobs)]
        then = g.tokenize_continuation(chat_markers(g.chat_prompt).then)
        requests: dict[tuple[int, int], list[int]] = {}
        jobs = [Job(p, tuple(derive_seed(0, j * plan["branches"] + b) for b in range(plan["branches"])))
                for j, p in enumerate(prompts)]
        g.run_jobs(jobs, max_tokens=plan["request_tokens"],
                   on_done=lambda leaf, c: requests.__setitem__((leaf.job, leaf.branch), c.tokens[0]))
        second = [prompts[j] + requests[(j, b)] + then for j, b in sorted(requests)]
        answers = g.run(second, max_tokens=plan["answer_tokens"])
        parallel = g.parallel
    written = sum(len(t) for t in requests.values()) + sum(c.n_generated for c in answers)
    read = sum(len(p) for p in prompts) + sum(len(p) for p in second)
    return {"candidates": len(second), "prompts": n_jobs, "parallel": parallel, "read": read, "written": written}


def worker_round(args) -> dict:
    """The stages of one round in this process, as `localalign align` runs them, timed."""
    from localalign.errors import UserError
    from localalign.evaluation.run import EvalConfig, evaluate
    from localalign.export.pipeline import export_merged
    from localalign.train.config import TrainConfig
    from localalign.train.lora import train

    plan, stages = json.loads(args.round_plan), {}
    work = Path(tempfile.mkdtemp(prefix="round-"))
    try:
        t0 = time.perf_counter()
        stages["generation"] = {**generation_proxy(args.gguf, plan, args.threads), "seconds": time.perf_counter() - t0}
        save_progress(args, {"stages": stages})
        t0 = time.perf_counter()
        cfg = TrainConfig(progress=False, device=args.device, threads=args.threads, epochs=args.round_epochs)
        res = train(args.model, bench_samples(plan["samples"], "safety"), work / "train", cfg, log=lambda m: None)
        stages["training"] = {"seconds": time.perf_counter() - t0, "samples": plan["samples"], "steps": res.steps,
                              "tokens_per_s": res.tokens_per_s, "epochs": cfg.epochs}
        save_progress(args, {"stages": stages})
        t0, out = time.perf_counter(), work / "round.gguf"
        try:
            parity = "passed" if export_merged(args.model, res.adapter_dir, out, quant="q8_0").ok else "failed"
        except UserError as e:  # random weights can fail the q8_0 parity tolerances; the file is kept
            parity, out = f"failed ({str(e)[:120]})", out.with_name(out.stem + ".parity-failed" + out.suffix)
        stages["export"] = {"seconds": time.perf_counter() - t0, "parity": parity}
        save_progress(args, {"stages": stages})
        t0 = time.perf_counter()
        result = evaluate(EvalConfig(model=out, suites=("safety",), limit=args.eval_limit, threads=args.threads))
        stages["evaluation"] = {"seconds": time.perf_counter() - t0, "items": result["suites"]["safety"]["n_items"],
                                "reply_tokens": result["suites"]["safety"]["reply_tokens"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"stages": stages, "total_s": sum(s["seconds"] for s in stages.values())}


WORKERS = {"ours": worker_ours, "hf": worker_hf, "gen": worker_gen, "round": worker_round}


def save_progress(args, partial: dict) -> None:
    """What a worker has finished so far (a width, a stage), where `run_worker` reads it back if
    the worker is stopped or dies before it ends."""
    if getattr(args, "progress", None):
        from localalign.fsutil import atomic_write_text

        atomic_write_text(Path(args.progress), json.dumps(partial))


def run_worker(kind: str, args, timeout: float | None = None, **overrides) -> dict:
    """One measurement in a fresh interpreter: its JSON result (the last line it prints). A worker
    stopped at `timeout` seconds, or one that fails, gives what it had finished (`save_progress`)
    with "timed_out" or "failed" saying why, and the end of its stderr."""
    with tempfile.TemporaryDirectory(prefix="bench_gpu-progress-") as tmp:
        progress = Path(tmp) / "progress.json"
        settings = {k: str(v) if isinstance(v, Path) else v
                    for k, v in {**vars(args), **overrides, "progress": str(progress)}.items()}
        cmd = [sys.executable, __file__, "--worker", kind, "--worker-args", json.dumps(settings)]
        t = time.perf_counter()
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # keep a caller's extra folders
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path), timeout=timeout)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            print(f"  {kind}: stopped at its time limit ({timeout:.0f} s)", file=sys.stderr)
            return {**_read_progress(progress), "timed_out": f"stopped at the time limit, {timeout:.0f} s",
                    "stderr": stderr[-2000:]}
        partial = _read_progress(progress)
    if proc.returncode != 0:  # a signal (a crash inside llama.cpp or CUDA) leaves no stderr: name it
        why = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        print(f"  {kind}: failed ({why})", file=sys.stderr)
        return {**partial, "failed": why, "stderr": proc.stderr[-3000:]}
    print(f"  {kind}{' (profiled)' if overrides.get('profile') else ''}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def worker_main(kind: str, settings: str) -> None:
    args = argparse.Namespace(**json.loads(settings))
    for name in ("model", "gguf", "shape"):
        if getattr(args, name, None):
            setattr(args, name, Path(getattr(args, name)))
    print(json.dumps(WORKERS[kind](args)))


# --------------------------------------------------------------------------- report


def fmt(x, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def machine_line(args) -> str:
    import peft
    import torch
    import transformers

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"**{props.name}** ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        device = f"CPU only (dry run, {os.cpu_count()} cores)"
    try:
        from importlib.metadata import version

        llama = version("llama_cpp_python")
    except Exception:
        llama = "not installed"
    return (f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"llama-cpp-python {llama}")


def why_not(entry: dict | None) -> str:
    """Why a measurement has no whole result: not run, skipped, stopped at its time limit, failed."""
    if entry is None:
        return "not measured yet"
    if "failed" in entry:
        return f"failed ({entry['failed']})"
    return entry.get("skipped") or entry.get("timed_out") or "no result"


def training_section(args, r: dict) -> list[str]:
    ours, hf = r.get("ours", {}), r.get("hf", {})
    if "tokens" not in ours or "tokens" not in hf:
        return [f"Training: ours {why_not(r.get('ours')) if 'tokens' not in ours else 'measured'}; "
                f"transformers.Trainer {why_not(r.get('hf')) if 'tokens' not in hf else 'measured'}."]
    profiles = {key: (r.get(f"{key}_profile") or {}).get("profile") for key in ("ours", "hf")}
    lines = [
        "| trainer | whole-run tokens/s | steady tokens/s (steps 4+) | first 3 steps | peak GPU memory | "
        "GPU busy (profiled steady steps) | host syncs per step |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, res, prof in (("localalign `train`, defaults (4 x 2 samples per step)", ours, profiles["ours"] or {}),
                            ("transformers.Trainer + peft, bf16, 4 x 2", hf, profiles["hf"] or {})):
        busy = prof.get("gpu_busy_share")
        lines.append(
            f"| {name} | {res['tokens'] / res['loop_s']:.0f} | {fmt(res['steady_tokens_per_s'])} | "
            f"{', '.join(f'{s:.2f}' for s in res['first_steps_s'])} s | {fmt(res['peak_gpu_gb'], '.2f')} GB | "
            f"{fmt(busy and 100 * busy, '.0f')}% | {fmt(prof.get('syncs_per_step'), '.1f')} |")
    ratio = (ours["tokens"] / ours["loop_s"]) / (hf["tokens"] / hf["loop_s"])
    busy = (profiles["ours"] or {}).get("gpu_busy_share")
    lines += [
        "",
        f"Whole-run tokens/s, ours / transformers.Trainer: **{ratio:.2f}x** (target: at least 2x); the GPU busy "
        f"**{fmt(busy and 100 * busy, '.0f')}%** of our steady steps (target: at least 40%). Ours: {ours['steps']} steps, "
        f"{ours['tokens']} tokens in {ours['loop_s']:.1f} s of training loop ({ours['call_s']:.1f} s for the whole "
        f"`train` call with model loading); transformers: {hf['steps']} steps in {hf['loop_s']:.1f} s of `Trainer.train`.",
    ]
    lines += [f"Our trainer said: {line}" for line in ours["log"] if "GPU layout" in line]
    for key, name in (("ours", "ours"), ("hf", "transformers.Trainer")):
        prof = profiles[key]
        if prof is None:
            lines.append(f"Profile of {name}: {why_not(r.get(f'{key}_profile'))}.")
            continue
        top = ", ".join(f"`{t['op']}` {t['cpu_ms']:.0f} ms ({t['calls']})" for t in prof["top_cpu"][:6])
        lines.append(f"Largest CPU costs over {prof['steps']} profiled steps ({prof['wall_s']:.2f} s), {name}: {top}.")
    return lines


def generation_section(g: dict, widths: str) -> list[str]:
    rows = g.get("rows") or []
    if not rows:
        return [f"Generation sweep: {why_not(g)}."]
    base = next((row for row in rows if row["setting"] == "32"), rows[0])
    lines = ["| `parallel` | sequences | generated tokens | seconds | tokens/s | vs. the first row |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        lines.append(f"| {row['setting']} | {row['parallel']} | {row['tokens']} | {row['seconds']:.2f} | {rate:.0f} | "
                     f"{rate / (base['tokens'] / base['seconds']):.2f}x |")
    auto = next((row for row in rows if row["setting"] == "auto"), None)
    if auto is not None:
        ratio = (auto["tokens"] / auto["seconds"]) / (base["tokens"] / base["seconds"])
        lines += ["", f"`parallel = \"auto\"` ({auto['parallel']} sequences) against {base['parallel']}: "
                      f"**{ratio:.2f}x** (target: at least 3x)."]
    left = [w for w in widths.split(",") if w not in {row["setting"] for row in rows}]
    if left:
        lines += ["", f"The sweep ended early ({why_not(g)}): {', '.join(left)} not measured."]
    return lines


def runs_line(r: dict) -> str:
    """The command(s) that measured `r`, with when each started."""
    return "; then ".join(f"`{run['command']}` on {run['started']}" for run in r["runs"])


def report(args, r: dict) -> str:
    dry = " (a dry run on a CPU with a tiny model: the numbers mean nothing)" if args.device != "cuda" else ""
    lines = [
        f"{runs_line(r)}{dry}.",
        machine_line(args) + ".",
        f"Model: SmolLM2-135M's shape{' shrunk to ' + str(TINY) if args.tiny else ''}, random weights, its tokenizer; "
        f"{args.samples} seed samples x {args.epochs} epoch(s), 8 samples per optimizer step; generation on its q8_0 "
        f"GGUF{', every layer offloaded' if args.device == 'cuda' else ''}, {args.gen_prompts} seed requests in the chat "
        f"template, {args.gen_tokens} new tokens each, temperature 0.8 (a random model rarely ends a reply early).",
        "Whole-run tokens/s: real (non-pad) tokens over the training loop (ours: `train`'s loop; transformers: "
        "`Trainer.train`), model loading excluded. GPU busy: the union of the GPU's kernels over the wall time of "
        "the profiled steps (a second, 1-epoch run of each under torch.profiler). Host syncs: what CUDA's sync-debug "
        "mode reported over those steps (ours reads its summed loss once per step, by design).",
        "",
    ]
    gen = generation_section(r["gen"], args.widths) if "gen" in r else ["Generation sweep: not measured yet."]
    return "\n".join(lines + training_section(args, r) + [""] + gen)


ROUND_STAGES = ("generation", "training", "export", "evaluation")


def round_section(args, r: dict) -> str:
    s = r["round"].get("stages", {})
    what = {
        "generation": lambda g: f"{g['candidates']} candidates from {g['prompts']} few-shot prompts, {g['parallel']} "
                                f"sequences at a time (`parallel = \"auto\"`); {g['read']} tokens read, {g['written']} written",
        "training": lambda t: f"{t['samples']} samples x {t['epochs']} epochs, {t['steps']} steps, "
                              f"{t['tokens_per_s']:.0f} tokens/s",
        "export": lambda e: f"merge, q8_0 GGUF, parity {e['parity']}",
        "evaluation": lambda e: f"held-out safety suite, {e['items']} prompts, {e['reply_tokens']} reply tokens",
    }
    lines = [f"{runs_line(r)}; {machine_line(args)}. SmolLM2-135M's shape with random "
             "weights: generation is a proxy of the default round's work (bench/bench_gpu.py says how), an upper bound.",
             "", "| stage | seconds | what it did |", "|---|---:|---|"]
    lines += [f"| {stage} | {s[stage]['seconds']:.1f} | {what[stage](s[stage])} |" if stage in s else
              f"| {stage} | - | not reached |" for stage in ROUND_STAGES]
    done = sum(stage["seconds"] for stage in s.values())
    if all(stage in s for stage in ROUND_STAGES):
        lines.append(f"| **the round** | **{done:.0f}** | target: under 180 s on one H100/H200-class GPU |")
    else:
        lines.append(f"| **the round** | - | {why_not(r['round'])}, after {done:.0f} s of the stages above; "
                     "target: under 180 s on one H100/H200-class GPU |")
    return "\n".join(lines)


def update_docs(path: Path, markers: tuple[str, str], heading: str, body: str) -> None:
    from benchdoc import update_section  # bench/, this script's folder
    from localalign.fsutil import atomic_write_text

    text = path.read_text() if path.exists() else ""
    atomic_write_text(path, update_section(text, f"{heading}\n\n{body}", *markers))
    print(f"updated {path}", file=sys.stderr)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same vocabulary, small settings")
    ap.add_argument("--round", action="store_true", help="also time a whole 256-sample round -> docs/scaling.md")
    ap.add_argument("--shape", type=Path, default=SHAPE_DIR, help="config.json + tokenizer to build the model from")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--profile-steps", default="8:12", help="steps profiled, FIRST:LAST (a second, 1-epoch run)")
    ap.add_argument("--gen-prompts", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-ctx", type=int, default=2048, help="n_ctx per sequence (\"auto\" sizes by it)")
    ap.add_argument("--widths", default="32,64,128,auto,auto+fa", help="parallel settings to sweep (+fa: flash attention)")
    ap.add_argument("--eval-limit", type=int, default=None, help="round: evaluate only the first N prompts")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads [every core]")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--budget", type=float, help="seconds this call may measure for, model building included: a worker "
                                                 "still running then is stopped, what it finished (widths, stages) kept")
    ap.add_argument("--parts", help=f"what to measure, of {','.join(PARTS)} [train,gen; --round adds round; \"\": none]")
    ap.add_argument("--results", type=Path, help="a JSON file of results, read where it exists and written after each "
                                                 "measurement: a run in parts, the report from all of them")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.device == "cpu" or args.tiny
    if dry:
        given = {a.split("=")[0][2:].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith("--")}
        for key, value in DRY.items():
            if key not in given:
                setattr(args, key, value)
    args.round_plan, args.round_epochs = json.dumps(DRY_ROUND if dry else ROUND), 1 if dry else 3
    parts = args.parts if args.parts is not None else "train,gen" + (",round" if args.round else "")
    args.parts = tuple(part for part in parts.split(",") if part)  # "": measure nothing, report --results
    if args.budget is not None and args.budget <= 0:
        ap.error(f"--budget wants a number of seconds above 0, got {args.budget:g}")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    for setting in args.widths.split(","):
        try:
            width_setting(setting)
        except ValueError as e:
            ap.error(str(e))
    return args


def load_results(path: Path | None) -> dict:
    """An earlier run's results (--results), {} where there is none yet; one line and out if unreadable."""
    if path is None or not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        sys.exit(f"bench_gpu: --results {path} is not a results file of this script: {e}")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        sys.exit(f"bench_gpu: --results {path} is not a results file of this script (no \"runs\" list)")
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_args)
    preflight(args)
    last = profile_window(args.profile_steps)[1]
    from localalign.fsutil import atomic_write_text

    results = load_results(args.results)
    if not args.parts and not results:
        sys.exit("bench_gpu: --parts \"\" measures nothing: give it --results FILE of an earlier run to report")
    command = shlex.join(["python", "bench/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    results.setdefault("runs", []).append({"command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    llama = __import__("importlib.util").util.find_spec("llama_cpp") is not None
    deadline = time.monotonic() + args.budget if args.budget else None
    failed: list[str] = []

    def measure(key: str, kind: str, **overrides) -> None:
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left <= 0:
            results[key] = {"skipped": f"out of time: this call's --budget of {args.budget:g} s was spent before it began"}
        else:
            results[key] = run_worker(kind, args, timeout=left, **overrides)
        if "failed" in results[key]:
            failed.append(f"worker {kind} failed ({results[key]['failed']}):\n{results[key]['stderr']}")
        if args.results:  # after each measurement: a later failure or time limit keeps what was measured
            atomic_write_text(args.results, json.dumps(results, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        if args.parts:  # seeded: the same model every call
            args.model = build_model_dir(args.shape, Path(tmp) / "hf", args.tiny)
            args.gguf = write_q8_gguf(args.model) if llama and {"gen", "round"} & set(args.parts) else None
            print(f"model: {args.model} ({'tiny' if args.tiny else 'full shape'}), gguf: {args.gguf}", file=sys.stderr)
        if "train" in args.parts:
            measure("ours", "ours", profile=False)
            measure("hf", "hf", profile=False)
            # The profiled runs need only reach their window: 8 samples a step, two steps past it.
            measure("ours_profile", "ours", profile=True, epochs=1, samples=8 * (last + 2))
            measure("hf_profile", "hf", profile=True, epochs=1, samples=8 * (last + 2))
        for part in ("gen", "round"):
            if part in args.parts:
                if llama:
                    measure(part, part)
                else:
                    results.setdefault(part, {"skipped": "llama-cpp-python is not installed"})
    text = report(args, results)
    print(text)
    round_text = round_section(args, results) if results.get("round", {}).get("stages") else None
    if "round" in results and not round_text:
        print(f"round: {why_not(results['round'])}", file=sys.stderr)
    if round_text:
        print("\n" + round_text)
    if args.no_docs or args.device != "cuda":
        print("docs/ left alone" + (" (a dry run)" if args.device != "cuda" else ""), file=sys.stderr)
    else:
        update_docs(DOCS_BENCH, MARKERS_BENCH, "## One GPU (bench/bench_gpu.py, issue 17)", text)
        if round_text:
            update_docs(DOCS_SCALING, MARKERS_ROUND, "### Measured: a 256-sample round on one GPU", round_text)
    if failed:  # after the report: what the other workers measured is printed and kept
        sys.exit("bench_gpu: " + "\nbench_gpu: ".join(failed))


if __name__ == "__main__":
    main()
