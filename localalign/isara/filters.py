"""Filters for generated pairs: rules, novelty, self-assessment. Pure functions.

A candidate passes the checks in this order, and the first failure is its reject reason:

1. rules (string checks, free): unparseable or truncated output, empty, too short or too
   long, template or role-marker leakage, the response echoing the prompt, a near-copy of one
   of its own in-context examples, degenerate repetition;
2. consistency with the seeds (consistency.py): the wrong kind of response for the request
   (answers_harmful, refuses_ordinary), or a constraint the request states broken;
3. novelty (one embedding): cosine similarity to any seed or accepted sample above
   `novelty_threshold` makes it a duplicate;
4. self-assessment (off by default; one forward pass of the same model): the probability it
   answers Yes to the rubric below (quality and domain fit) must reach `min_rating`.

The rubric is the only fixed instruction text in the whole method; the generation prompts
carry none. The model-touching side of step 4 lives in rating.py; here are the prompt
text and the parsing.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from typing import Sequence

from localalign.errors import UserError
from localalign.isara.prompts import COMMON_LEAK_MARKERS
from localalign.samples import Sample

REASONS = (
    "truncated_prompt",
    "truncated_response",
    "unparseable",
    "empty",
    "too_short",
    "too_long",
    "leak",
    "echo",
    "copies_example",
    "repetitive",
    "answers_harmful",
    "refuses_ordinary",
    "breaks_constraint",
    "duplicate",
    "low_rating",
    "unrated",
)


@dataclass
class FilterConfig:
    # Characters, not tokens: rules must not need a tokenizer. A real request is rarely under
    # 10 characters; a real answer rarely under 20 ("No." teaches nothing).
    min_prompt_chars: int = 10
    min_response_chars: int = 20
    max_prompt_chars: int = 1500
    max_response_chars: int = 3000
    # difflib ratio at or above which a generated prompt is a copy of an example's prompt,
    # or a response a copy of its own prompt. 0.8 catches copies with a few words changed.
    copy_ratio: float = 0.8
    # Distinct word 3-grams / all 3-grams below this: a loop ("I can't, I can't, ...").
    # Human answers of 20+ words sit above 0.9; SmolLM2's loops fall under 0.5.
    min_distinct_trigrams: float = 0.5
    novelty_threshold: float = 0.9  # cosine similarity above which a candidate is a duplicate
    # Consistency with the seeds (consistency.py): the response kind the request's nearest seeds
    # give, and the constraints the request states. Thresholds measured on the labelled set.
    consistency: bool = True
    # The seeds' vote (consistency.py): softmax over prompt similarity at this temperature.
    vote_temperature: float = 0.1
    # A refusal is kept where at least this share of the vote refuses, an answer where less
    # than this does. On the labelled set (279 requests, 40 harmful) the vote is >= 0.9 for 11
    # requests (9 harmful) and >= 0.8 for 32 (20 harmful): strict for refusals, which teach
    # over-refusal when wrong; lenient for answers, since 5 in 6 generated requests are ordinary.
    keep_refusal_from: float = 0.9
    keep_answer_below: float = 0.8
    # The answer cut-off for a round whose generator is a tuned model (an earlier round's). On the
    # labelled requests a tuned model wrote, 0.8 keeps 6 answers to harmful requests among 91, 0.6
    # keeps 4 among 72 and the same 3 worth training on; in a make run's round 2, 0.8 let two
    # phishing emails through (votes 0.70 and 0.77). The base model's answers keep 0.8, where 0.6
    # would cost 4 of its 13 trainable answers (docs/benchmarks.md).
    tuned_keep_answer_below: float = 0.6
    consistency_k: int = 12  # best-of-n: nearest seeds whose responses a kept answer should resemble
    # An answer cut off by the length limit is ended at its last complete sentence instead of
    # rejected. Off for the domain data (a cut-off answer rambles); on for rehearsal, whose
    # lesson is "answer ordinary requests", not what the answer says (rehearsal.py).
    end_cut_answers: bool = False
    rate: bool = False  # the self-assessment: near chance at 135M (docs/benchmarks.md); for bigger models
    min_rating: float = 0.5  # the rating (P(yes), 0-1) a sample needs

    def __post_init__(self) -> None:
        if not 0 < self.copy_ratio <= 1:
            raise UserError(f"copy_ratio must be in (0, 1], got {self.copy_ratio}")
        if not -1 <= self.novelty_threshold <= 1:
            raise UserError(f"novelty_threshold must be in [-1, 1], got {self.novelty_threshold}")
        if self.consistency_k < 1:
            raise UserError(f"consistency_k must be >= 1, got {self.consistency_k}")
        for name in ("keep_refusal_from", "keep_answer_below", "tuned_keep_answer_below"):
            if not 0 <= getattr(self, name) <= 1.01:
                raise UserError(f"{name} must be in 0..1.01 (a share of the seeds' vote; 1.01: never), "
                                f"got {getattr(self, name)}")
        if not self.vote_temperature > 0:
            raise UserError(f"vote_temperature must be > 0, got {self.vote_temperature}")
        if not 0 <= self.min_rating <= 1:
            raise UserError(f"min_rating must be in 0..1 (a probability), got {self.min_rating}")
        if self.min_prompt_chars > self.max_prompt_chars or self.min_response_chars > self.max_response_chars:
            raise UserError("a minimum length is above its maximum")

    def for_generator(self, tuned: bool) -> "FilterConfig":
        """The filters a round applies: a tuned generator's answers meet the stricter cut-off."""
        return replace(self, keep_answer_below=self.tuned_keep_answer_below) if tuned else self


# ---------------------------------------------------------------------------- rules

_ROLE_PREFIX = re.compile(r"^\s*(user|assistant|system|human|ai|### ?(prompt|response|instruction))\s*[:\n]", re.I)


def normalize(text: str) -> str:
    """Lowercased, accents and punctuation folded, whitespace collapsed: for copy checks."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def similar(a: str, b: str) -> float:
    """difflib similarity of two normalized texts (1.0 = identical)."""
    a, b = normalize(a), normalize(b)
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return SequenceMatcher(None, a, b).ratio()


def distinct_trigram_ratio(text: str) -> float:
    words = normalize(text).split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def check_rules(
    prompt: str,
    response: str,
    examples: Sequence[Sample] = (),
    config: FilterConfig | None = None,
    leak_markers: Sequence[str] = COMMON_LEAK_MARKERS,
    parse_problem: str | None = None,
) -> str | None:
    """The first rule a candidate breaks (a reason from REASONS), or None."""
    c = config or FilterConfig()
    if parse_problem is not None:
        return parse_problem
    p, r = prompt.strip(), response.strip()
    if not p or not r:
        return "empty"
    if len(p) < c.min_prompt_chars or len(r) < c.min_response_chars:
        return "too_short"
    if len(p) > c.max_prompt_chars or len(r) > c.max_response_chars:
        return "too_long"
    if any(m in p or m in r for m in leak_markers) or _ROLE_PREFIX.match(p) or _ROLE_PREFIX.match(r):
        return "leak"
    if normalize(r).startswith(normalize(p)) or similar(p, r) >= c.copy_ratio:
        return "echo"
    for ex in examples:
        if similar(p, ex.prompt) >= c.copy_ratio or (similar(r, ex.response) >= c.copy_ratio):
            return "copies_example"
    if len(normalize(r).split()) >= 20 and distinct_trigram_ratio(r) < c.min_distinct_trigrams:
        return "repetitive"
    return None


# ---------------------------------------------------------------------------- novelty


def check_novelty(max_similarity: float, config: FilterConfig | None = None) -> str | None:
    c = config or FilterConfig()
    return "duplicate" if max_similarity > c.novelty_threshold else None


# ---------------------------------------------------------------------------- self-assessment

# The one fixed instruction text of the method. The domain is shown through a few seed
# prompts (the same ones for every candidate, so all rating prompts share one KV prefix).
RUBRIC = """Here are requests from a dataset:
{domain}

Here is a new request and a response to it.

Request: {prompt}

Response: {response}

Is the response helpful, correct, honest and safe, does it answer the request, and is the
request the same kind of request as the dataset's? Answer Yes or No."""

# The assistant turn is opened with this; the rating is P(" Yes") / (P(" Yes") + P(" No")) at
# the next token, read in one forward pass (a 135M model asked to write a score mostly
# repeats the rubric back; read from the logits, it only chooses).
RUBRIC_ANSWER_START = "Answer:"
RATING_WORDS = (" Yes", " No")
RATING_DOMAIN_EXAMPLES = 4  # seed prompts shown as the domain
RATING_MAX_CHARS = 1200  # a long response is cut in the rubric: the model's context is small


def rubric_message(prompt: str, response: str, domain_prompts: Sequence[str]) -> str:
    def cut(text: str) -> str:
        return text if len(text) <= RATING_MAX_CHARS else text[:RATING_MAX_CHARS] + " [...]"

    domain = "\n".join(f"- {cut(d).strip()}" for d in domain_prompts)
    return RUBRIC.format(domain=domain, prompt=cut(prompt.strip()), response=cut(response.strip()))


def yes_probability(logp_yes: float, logp_no: float) -> float:
    """P(yes) among the two answers, from their log-probabilities."""
    m = max(logp_yes, logp_no)
    a, b = math.exp(logp_yes - m), math.exp(logp_no - m)
    return a / (a + b)


def check_rating(scores: dict[str, float], config: FilterConfig | None = None) -> str | None:
    c = config or FilterConfig()
    if "rating" not in scores:
        return "unrated"
    if scores["rating"] < c.min_rating:
        return "low_rating"
    return None
