"""Rehearsal data: ordinary requests the base model writes for itself, with its own answers.

Trained on the seeds alone, a 135M model learns refusal as a style and refuses ordinary
instructions too (docs/benchmarks.md). Rehearsal mixes in what it already does well: the
base model, shown only its chat template's opening and an empty user turn, writes a typical
request (Magpie, Xu et al. 2024) and answers it. The ISARA step with k = 0 does exactly that,
with the rule filters; a refusal is dropped (refuses_ordinary), and an answer cut off by the
length limit is ended at its last complete sentence.

No outside data: the requests and answers are the model's own, and the seeds' refusals give
each pair a rejected side for the preference objective (the nearest refusing seed's
response: "this is not a request to refuse").
"""

from __future__ import annotations

import dataclasses

from localalign.engine.base import Generator
from localalign.isara.consistency import SeedKinds
from localalign.isara.filters import FilterConfig
from localalign.isara.retrieve import Embedder
from localalign.isara.step import IsaraConfig, IsaraResult, Listener, generate_samples
from localalign.samples import Sample


def rehearsal_samples(generator: Generator, embedder: Embedder, seeds: list[Sample], n: int, isara: IsaraConfig,
                      filters: FilterConfig, resume: tuple[list[Sample], list[Sample]] | None = None,
                      listener: Listener | None = None) -> IsaraResult:
    """`n` requests of the model's own with its answers, each with a refusal to prefer it over."""
    own = dataclasses.replace(isara, k=0, answers=1)
    # The base model seldom writes a harmful request of its own, and the seeds' vote calls half
    # of its ordinary ones harmful (docs/benchmarks.md): only refusals are filtered out here.
    # Its answers run long: one cut off is ended at its last sentence.
    own_filters = dataclasses.replace(filters, keep_refusal_from=1.01, keep_answer_below=1.01, end_cut_answers=True)
    result = generate_samples(generator, embedder, seeds, n, isara=own, filters=own_filters, round_no=0, resume=resume,
                              listener=listener)
    with_refusals(result.accepted, seeds, embedder)
    return result


def with_refusals(samples: list[Sample], seeds: list[Sample], embedder: Embedder) -> None:
    """Set each sample's meta["rejected_response"] to its nearest refusing seed's response
    (nothing where no seed refuses, as in truthfulness and instruction-following)."""
    kinds = SeedKinds.of(seeds, embedder.embed([s.prompt for s in seeds]), embedder.embed([s.response for s in seeds]))
    refusing = [i for i, r in enumerate(kinds.refuses) if r]
    if not refusing or not samples:
        return
    sims = embedder.embed([s.prompt for s in samples]) @ kinds.prompt_vectors[refusing].T
    for sample, row in zip(samples, sims):
        sample.meta["rejected_response"] = seeds[refusing[int(row.argmax())]].response
        sample.meta["rejected_reason"] = "refusal_of_an_ordinary_request"


def without_pairs(samples: list[Sample]) -> list[Sample]:
    """Copies of `samples` without a rejected side (SFT data only, whatever the objective)."""
    drop = ("rejected_response", "rejected_reason")
    return [dataclasses.replace(s, meta={k: v for k, v in s.meta.items() if k not in drop}) for s in samples]
