"""Self-assessment: the model that wrote a pair scores it with the rubric of filters.py.

Off by default (FilterConfig.rate): measured on the hand-labelled development set, the
135M default model's scores do not separate the pairs worth training on from the rest
(docs/benchmarks.md). Kept for bigger models.
"""

from __future__ import annotations

from typing import Callable

from localalign.engine.base import Generator
from localalign.errors import UserError
from localalign.isara.filters import RATING_DOMAIN_EXAMPLES, RATING_WORDS, RUBRIC_ANSWER_START, rubric_message, yes_probability
from localalign.samples import Sample


def rate_samples(generator: Generator, samples: list[Sample], seeds: list[Sample],
                 on_step: Callable[[int], None] | None = None) -> None:
    """Self-assessment: the model that wrote each sample reads the rubric about it; P(" Yes")
    against P(" No") as the reply's next words goes into the sample's scores as "rating". One
    pass over each rubric prompt (the multiple-choice scorer); a prompt too long for the
    context gets no rating and is rejected as "unrated"."""
    domain = [s.prompt for s in seeds[:RATING_DOMAIN_EXAMPLES]]
    for s in samples:
        text = generator.chat_prompt([{"role": "user", "content": rubric_message(s.prompt, s.response, domain)}])
        text += RUBRIC_ANSWER_START
        try:
            yes, no = generator.score_continuations(text, list(RATING_WORDS))
        except UserError:  # longer than the scorer's context
            continue
        s.scores["rating"] = round(yes_probability(yes, no), 4)
        if on_step is not None:
            on_step(1)
