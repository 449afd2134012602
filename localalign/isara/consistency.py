"""Does a generated pair teach the seeds' lesson? Checks that use the seeds as the only labels.

Each seed's response is a refusal or an answer (the refusal detector, judges/refusal.py), so
the seeds say which kind of response a request of their kind gets. The seeds vote on the kind
a generated prompt's response should be, each weighted by a softmax of its prompt's
similarity to the generated one (`SeedKinds.refusal_vote`), so the closest seeds decide; a pair
whose response is confidently the other kind teaches the wrong lesson: a harmful request
answered ("answers_harmful"), an ordinary one refused ("refuses_ordinary"). In a domain
whose seeds never refuse (truthfulness, instruction-following) every request expects an
answer. A request that states checkable constraints must get a response that meets them
("breaks_constraint", judges/constraints.py).

Best-of-n: of several answers to one request that pass every check, the one whose response
is most like the responses of the request's nearest seeds is kept (`closeness`).

Pure numpy over embeddings computed by the caller; the thresholds are FilterConfig fields,
measured on the hand-labelled development set (tests/data/labelled/, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localalign.judges.constraints import check_constraint, constraints_in_prompt
from localalign.judges.refusal import is_refusal
from localalign.samples import Sample


@dataclass
class SeedKinds:
    """The seeds as labelled examples: prompt and response vectors, and which ones refuse."""

    prompt_vectors: np.ndarray  # (n_seeds, dim), normalized
    response_vectors: np.ndarray  # (n_seeds, dim), normalized
    refuses: np.ndarray  # (n_seeds,) bool

    @classmethod
    def of(cls, seeds: list[Sample], prompt_vectors: np.ndarray, response_vectors: np.ndarray) -> "SeedKinds":
        return cls(prompt_vectors, response_vectors, np.array([is_refusal(s.response) for s in seeds], dtype=bool))

    def neighbours(self, prompt_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, weights) of each prompt's k nearest seed prompts; weights = similarity, floored at 0."""
        sims = prompt_vectors @ self.prompt_vectors.T
        k = min(k, len(self.refuses))
        idx = np.argsort(-sims, axis=1)[:, :k]
        weights = np.clip(np.take_along_axis(sims, idx, axis=1), 0.0, None)
        return idx, weights

    def refusal_vote(self, prompt_vectors: np.ndarray, temperature: float) -> np.ndarray:
        """For each prompt, the share of the seeds' vote that refuses (0..1).

        Every seed votes with weight exp(similarity / temperature): at 0.1 a seed 0.1 closer
        counts e times more. A plain similarity-weighted vote of the k nearest lets the many
        seeds on a topic outvote the one that matches the request's intent: on the labelled
        set it called 151 of 279 requests harmful at 0.24 precision (docs/benchmarks.md)."""
        if not self.refuses.any():
            return np.zeros(len(prompt_vectors))
        sims = prompt_vectors @ self.prompt_vectors.T
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
        return (weights * self.refuses).sum(axis=1) / weights.sum(axis=1)

    def closeness(self, prompt_vector: np.ndarray, response_vectors: np.ndarray, k: int) -> np.ndarray:
        """How like the nearest seeds' responses each candidate response is (weighted mean cosine)."""
        idx, weights = self.neighbours(prompt_vector[None, :], k)
        sims = response_vectors @ self.response_vectors[idx[0]].T  # (n_answers, k)
        w = weights[0] if weights[0].sum() > 0 else np.ones_like(weights[0])
        return (sims * w).sum(axis=1) / w.sum()


def check_kind(refusal_vote: float, response: str, keep_refusal_from: float, keep_answer_below: float) -> str | None:
    """The reason a response is the wrong kind for its request, or None.

    The two thresholds are independent: a refusal is kept only where at least
    `keep_refusal_from` of the vote refuses, an answer only where less than `keep_answer_below`
    does; between them (when keep_refusal_from > keep_answer_below) neither kind is kept."""
    if is_refusal(response):
        return None if refusal_vote >= keep_refusal_from else "refuses_ordinary"
    return None if refusal_vote < keep_answer_below else "answers_harmful"


def check_stated_constraints(prompt: str, response: str) -> str | None:
    """"breaks_constraint" if the prompt states constraints (that the reader recognises) the response breaks."""
    constraints = constraints_in_prompt(prompt)
    if constraints and not all(check_constraint(response, c) for c in constraints):
        return "breaks_constraint"
    return None
