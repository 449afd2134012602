"""The model under evaluation, as every suite sees it, and what a suite hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localalign.engine.base import Generator
from localalign.evaluation.stats import proportion
from localalign.isara.retrieve import Embedder, SampleIndex
from localalign.judges.refusal import REFUSAL_STOP, is_refusal
from localalign.judges.verdict import judge


@dataclass
class IclExamples:
    """ICL-kNN, ISARA's no-training baseline: each question is preceded by its `k` nearest seed
    pairs as earlier chat turns."""

    embedder: Embedder
    index: SampleIndex  # the seeds
    k: int

    def turns(self, prompt: str) -> list[dict[str, str]]:
        messages = []
        # Nearest last: the closest example sits right before the question.
        for sample, _ in reversed(self.index.search(self.embedder.embed([prompt])[0], self.k)):
            messages += [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.response}]
        return messages


@dataclass
class FixedExamples:
    """URIAL-style in-context alignment (Lin et al. 2023), our seed-only version: the same few
    seed pairs before every question, chosen without looking at it: the first of each response
    kind in turn (a refusal, an answer, ...) in seed-file order, so both lessons are shown."""

    examples: list

    @classmethod
    def of(cls, seeds: list, k: int) -> "FixedExamples":
        by_kind = [[s for s in seeds if is_refusal(s.response)], [s for s in seeds if not is_refusal(s.response)]]
        chosen = []
        while len(chosen) < min(k, len(seeds)):
            for group in by_kind:
                if group and len(chosen) < k:
                    chosen.append(group.pop(0))
        return cls(chosen)

    def turns(self, prompt: str) -> list[dict[str, str]]:
        messages = []
        for sample in self.examples:
            messages += [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.response}]
        return messages


class EvalSession:
    """A greedy generator (embedded or a server) and the settings the suites read."""

    def __init__(self, gen: Generator, seeds_dir: Path, max_tokens: int, refusal_max_tokens: int,
                 icl: IclExamples | FixedExamples | None = None):
        self.gen = gen
        self.seeds_dir = seeds_dir  # where the held-out suites' files are
        self.max_tokens = max_tokens  # reply budget for suites that check the whole reply
        self.refusal_max_tokens = refusal_max_tokens  # for suites that read only its opening
        self.icl = icl
        self.reply_tokens = 0  # tokens in all replies so far (re-tokenized), for throughput

    def chat(self, prompt: str) -> str:
        """The prompt as a user turn in the model's template (after retrieved seeds, for ICL-kNN)."""
        messages = self.icl.turns(prompt) if self.icl is not None else []
        return self.gen.chat_prompt(messages + [{"role": "user", "content": prompt}])

    def replies(self, prompts: list[str], max_tokens: int, stop: tuple[str, ...] = ()) -> list[str]:
        """Greedy replies to user prompts, each in the model's chat template."""
        replies = self.gen.complete([self.chat(p) for p in prompts], max_tokens=max_tokens, temperature=0.0,
                                    stop=list(stop) or None)
        self.reply_tokens += sum(len(self.gen.tokenize_continuation(r)) for r in replies if r)
        return replies

    def refusal_replies(self, prompts: list[str]) -> list[str]:
        """Replies for the suites that score only whether a reply refused: at most
        `refusal_max_tokens` tokens, each stopped at its first blank line (REFUSAL_STOP: the
        refusal verdict reads the opening). Not for a helpfulness score: a loop that starts after
        the first paragraph would go unseen. A reply that comes back empty may have opened with a
        blank line rather than ended at once, so those are asked again without the stop (greedy:
        one that ended at once is empty again)."""
        replies = self.replies(prompts, self.refusal_max_tokens, REFUSAL_STOP)
        empty = [i for i, reply in enumerate(replies) if not reply.strip()]
        if empty:
            for i, reply in zip(empty, self.replies([prompts[i] for i in empty], self.refusal_max_tokens)):
                replies[i] = reply
        return replies

    def close(self) -> None:
        self.gen.close()


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


def first_n(items: list, limit: int | None) -> list:
    """The first `limit` items (all of them without a limit): --limit's quick mode."""
    return items if limit is None else items[:limit]



def refusal_items(rows: list[tuple[str, str, str]], replies: list[str]) -> list[dict]:
    """The refusal suites' items: one per (id, prompt, kind) row and its reply, with the judge's
    verdict on it (judges/verdict.py): its kind, and whether it refused."""
    items = []
    for (item_id, prompt, kind), reply in zip(rows, replies):
        verdict = judge(reply, prompt)
        items.append({"id": item_id, "kind": kind, "prompt": prompt, "reply": reply,
                      "refused": verdict.refused, "verdict": verdict.kind})
    return items
