"""Self-assessment: the model that wrote a pair scores it with the rubric of filters.py.

Off by default (FilterConfig.rate): measured on the hand-labelled development set, the
135M default model's scores do not separate the pairs worth training on from the rest
(docs/benchmarks.md). Kept for bigger models.
"""

from __future__ import annotations

import re
from typing import Callable

from localalign.engine.base import Generator
from localalign.isara.filters import (
    RATING_DOMAIN_EXAMPLES,
    RATING_GRAMMAR,
    RUBRIC_ANSWER_START,
    parse_rating,
    rubric_message,
)
from localalign.samples import Sample

_RATING_FORMAT = re.compile(r" (10|[1-9]), Domain: (10|[1-9])")  # the language of filters.RATING_GRAMMAR


def rate_samples(generator: Generator, samples: list[Sample], seeds: list[Sample],
                 on_step: Callable[[int], None] | None = None) -> None:
    """Self-assessment: the same model scores each sample with the rubric (greedy), into its scores."""
    domain = [s.prompt for s in seeds[:RATING_DOMAIN_EXAMPLES]]
    prompts = []
    for s in samples:
        text = generator.chat_prompt([{"role": "user", "content": rubric_message(s.prompt, s.response, domain)}])
        prompts.append(generator.tokenize(text + RUBRIC_ANSWER_START))
    too_long = [len(p) >= generator.n_ctx_seq - 16 for p in prompts]
    fitting = [p for p, long in zip(prompts, too_long) if not long]
    results = iter(
        generator.run(fitting, max_tokens=16, temperature=0, grammar=RATING_GRAMMAR, on_step=on_step) if fitting else []
    )
    for s, long in zip(samples, too_long):
        if long:
            continue  # no scores: rejected as "unrated"
        r = next(results)
        s.scores.update(parse_rating(r.texts[0]))
        s.meta["rating_text"] = (RUBRIC_ANSWER_START + r.texts[0]).strip()
        if not _RATING_FORMAT.fullmatch(r.texts[0]):
            # A server that ignores `grammar` (vLLM, Ollama) answers in free text; the scores
            # then come from parse_rating's reading of it, and the sample says so.
            s.meta["rating_free_text"] = True
