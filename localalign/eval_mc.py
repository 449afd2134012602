"""Multiple-choice truthfulness by log-likelihood (MC1), on our own held-out set.

What it measures: for a question with one true answer and three common misconceptions
(seeds/truthfulness.heldout.jsonl), whether the model assigns the true answer a higher
likelihood than every false one when the answer is the whole assistant reply to the
chat-templated question. It measures what the model *believes most likely*, not what it
would write: no text is generated, so a model that rambles can still score well, and a
chance-level model scores 25%.

Normalization: MC1 compares each answer's log-likelihood *per UTF-8 byte* of its text (the
sum of its tokens' log-probabilities divided by its length in bytes; lm-evaluation-harness
calls this acc_norm). The plain sum (TruthfulQA's MC1) penalizes every extra token, and in
our held-out set the true answers are longer than the misconceptions (29.6 vs 22.8
characters on average): on the default model, the sum picked the shortest choice in 27 of
43 items and scored 0.116, below chance. Per byte, not per token, so the normalization does
not depend on the tokenizer. The per-item sums and byte lengths are kept in the results, so
the sum-based score can be recomputed. Ties go to the lowest index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localalign.errors import UserError

N_CHOICES = 4


@dataclass(frozen=True)
class MCItem:
    id: str
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index of the true choice


def load_mc_items(path: str | Path) -> list[MCItem]:
    """Read a truthfulness held-out file (schema in seeds/README.md); bad lines are UserErrors."""
    from localalign.samples import iter_jsonl

    items = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
            raise UserError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if len(set(choices)) != len(choices):
            raise UserError(f"{where}: 'choices' must be distinct")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f"{where}: 'answer' must be an index into 'choices', got {answer!r}")
        items.append(MCItem(f"{Path(path).stem}:{lineno}", row["prompt"], tuple(choices), answer))
    if not items:
        raise UserError(f"{path}: no items")
    return items


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def continuation_logprobs(llm, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
    """Sum of log p(continuation tokens | prompt) for each continuation, in one model.

    `llm` is a llama_cpp.Llama loaded with logits_all=True. The prompt is decoded once; each
    continuation is decoded after it (llama-cpp-python's `eval` drops KV cells past
    `n_tokens`, so rewinding `n_tokens` reuses the prompt's cache). The logits at position
    t predict token t + 1, so the first continuation token is scored by the prompt's last row.
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    if any(not c for c in continuations):
        raise ValueError("empty continuation")
    if len(prompt_ids) + max(len(c) for c in continuations) > llm.n_ctx():
        raise UserError(f"a multiple-choice item needs more than the {llm.n_ctx()}-token context")
    llm.reset()
    llm.eval(prompt_ids)
    n_prompt = llm.n_tokens
    last_prompt_row = np.array(llm.scores[n_prompt - 1])
    sums = []
    for cont in continuations:
        llm.n_tokens = n_prompt
        llm.eval(cont)
        rows = np.vstack([last_prompt_row[None, :], llm.scores[n_prompt : n_prompt + len(cont) - 1]])
        logp = log_softmax(rows)
        sums.append(float(logp[np.arange(len(cont)), cont].sum()))
    return sums


def per_byte(logprobs: list[float], choices: list[str] | tuple[str, ...]) -> list[float]:
    """Each choice's summed log-probability divided by its length in UTF-8 bytes."""
    return [lp / len(c.encode("utf-8")) for lp, c in zip(logprobs, choices, strict=True)]


def mc1_pick(scores: list[float]) -> int:
    """The chosen answer: the highest score, lowest index on a tie."""
    return int(np.argmax(np.asarray(scores)))
