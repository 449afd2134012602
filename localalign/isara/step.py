"""The ISARA step: new prompt/response pairs, written by the model from retrieved examples alone.

    generate_samples(generator, embedder, seeds, n, ...) -> IsaraResult(accepted, rejected, index)

Candidates are made and judged in passes of `batch_candidates`, each pass in five phases:

1. candidates  each draws a query sample and its k-1 nearest neighbours from the pool (the
               seeds, or with query_from="all" everything accepted too), shuffled into a
               few-shot prompt that fits the context;
2. decoding    both turns in one pass: the model writes a request, then answers it;
3. rules       the string checks of filters.py (free);
4. novelty     one embedding each, against the seeds and everything accepted so far;
5. rating      the same model scores each survivor with the rubric (greedy); then
   acceptance  in index order, novelty checked again against what this pass accepted.

The step writes no file: after every pass it hands the accepted and rejected samples so far
to its `Listener`, and the stage that called it rewrites its files there.

Resumable: candidate i draws its query, examples and sampler seed from
(generator.config.seed, i) and the pool alone, and records i in meta["index"]. A resumed run
passes resume=(accepted, rejected) as read back from its files (`samples.read_rejected` reads
rejects, whose samples may be empty); generation continues after the last recorded pass, and
the returned lists include the resumed samples.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

from localalign.engine.base import Completion, Generator, derive_seed
from localalign.errors import UserError
from localalign.isara.filters import (
    RATING_DOMAIN_EXAMPLES,
    RATING_GRAMMAR,
    RUBRIC_ANSWER_START,
    FilterConfig,
    check_novelty,
    check_rating,
    check_rules,
    parse_rating,
    rubric_message,
)
from localalign.isara.prompts import build_isara_prompt, chat_markers, parse_generation, shuffled
from localalign.isara.retrieve import Embedder, SampleIndex
from localalign.samples import Sample

QUERY_FROM = ("seeds", "all")


@dataclass
class IsaraConfig:
    k: int = 4  # in-context examples: the query sample and its k-1 nearest neighbours
    # Where query samples and their neighbours come from: "seeds", or "all" (seeds plus the
    # samples accepted so far, so later rounds can wander further from the seeds).
    query_from: str = "seeds"
    max_prompt_tokens: int = 128  # the generated user turn; a longer one is cut and rejected
    max_response_tokens: int = 384
    # Candidates decoded per pass: a few times `parallel`, so slots stay busy until the tail.
    batch_candidates: int = 64
    max_candidates_factor: float = 6.0  # give up after n * this many candidates

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.query_from not in QUERY_FROM:
            raise UserError(f"query_from must be 'seeds' or 'all', got {self.query_from!r}")
        if self.max_prompt_tokens < 8 or self.max_response_tokens < 8:
            raise UserError("max_prompt_tokens and max_response_tokens must be at least 8")
        if self.batch_candidates < 1 or self.max_candidates_factor < 1:
            raise UserError("batch_candidates and max_candidates_factor must be at least 1")


@dataclass
class Progress:
    """What `generate_samples` reports as it goes (for a progress bar)."""

    accepted: int = 0
    rejected: int = 0
    tokens: int = 0  # generated tokens (both turns and ratings)
    reasons: dict[str, int] = field(default_factory=dict)


class Listener:
    """What the stage hears from the step; the step itself writes nothing."""

    def progress(self, progress: Progress) -> None:
        """The work of this call so far (a few times a second at most while decoding)."""

    def pass_done(self, accepted: list[Sample], rejected: list[Sample]) -> None:
        """Every sample accepted and rejected so far (resumed ones included), after each pass."""


class IsaraResult(NamedTuple):
    accepted: list[Sample]  # new accepted samples, in index order (resumed ones included)
    rejected: list[Sample]  # with their reject_reason
    index: SampleIndex  # seeds, the earlier rounds' samples and `accepted`, with their vectors


@dataclass
class _Candidate:
    index: int
    examples: list[Sample]  # the retrieved examples, nearest first (the prompt shows them shuffled)
    prompt: list[int]  # tokens
    sample: Sample | None = None  # once parsed
    vector: np.ndarray | None = None  # once embedded


def generate_samples(
    generator: Generator,
    embedder: Embedder,
    seeds: list[Sample],
    n: int,
    *,
    earlier: Sequence[Sample] = (),
    isara: IsaraConfig | None = None,
    filters: FilterConfig | None = None,
    round_no: int | None = None,
    resume: tuple[list[Sample], list[Sample]] | None = None,
    listener: Listener | None = None,
) -> IsaraResult:
    """Generate until `n` new samples are accepted (or the candidate budget runs out).

    `earlier`: the samples accepted in earlier rounds, for novelty and (query_from="all") as
    examples. See the module docstring for the phases, `resume` and `listener`.
    """
    step = _Step(generator, embedder, seeds, earlier, isara or IsaraConfig(), filters or FilterConfig(), round_no,
                 listener or Listener())
    step.resume(*(resume or ([], [])))
    budget = int(n * step.isara.max_candidates_factor)
    while len(step.accepted) < n and step.next_index < budget:
        candidates = step.candidates(min(step.isara.batch_candidates, budget - step.next_index))
        survivors = step.novelty(step.rules(candidates, step.decode(candidates)))
        if survivors and step.filters.rate:
            step.rate(survivors)
        step.accept(survivors, n)
        step.listener.pass_done(step.accepted, step.rejected)
    return IsaraResult(step.accepted, step.rejected, step.known)


class _Step:
    """One call's state: the pool, what is known, what was accepted and rejected; a method a phase."""

    def __init__(self, generator: Generator, embedder: Embedder, seeds: list[Sample], earlier: Sequence[Sample],
                 isara: IsaraConfig, filters: FilterConfig, round_no: int | None, listener: Listener):
        if not seeds:
            raise UserError("no seed samples")
        self.generator, self.embedder, self.seeds, self.earlier = generator, embedder, seeds, list(earlier)
        self.isara, self.filters, self.round_no, self.listener = isara, filters, round_no, listener
        self.markers = chat_markers(generator.chat_prompt)
        self.then = generator.tokenize_continuation(self.markers.then)
        self.room = generator.n_ctx_seq - isara.max_prompt_tokens - len(self.then) - isara.max_response_tokens - 1
        if self.room < 64:
            raise UserError(
                f"n_ctx {generator.n_ctx_seq} leaves no room for examples after the generated turns; raise n_ctx"
            )
        self.seed_vectors = embedder.embed_samples(seeds)
        self.known = SampleIndex(embedder.dim)  # everything a new sample must differ from
        self.known.add(seeds, self.seed_vectors)
        self.accepted: list[Sample] = []
        self.rejected: list[Sample] = []
        self.progress = Progress()
        self.next_index = 0

    def resume(self, accepted: list[Sample], rejected: list[Sample]) -> None:
        """Start after the last pass recorded in `accepted` and `rejected` but one (`before_last_pass`)."""
        done, rejected_done = before_last_pass(accepted, rejected, self.isara.batch_candidates)
        if self.earlier + done:
            self.known.add(self.earlier + done, self.embedder.embed_samples(self.earlier + done))
        if self.isara.query_from == "all":
            self.pool = self.known
        else:
            self.pool = SampleIndex(self.embedder.dim)
            self.pool.add(self.seeds, self.seed_vectors)
        self.accepted, self.rejected = list(done), list(rejected_done)
        indices = [s.meta.get("index") for s in self.accepted + self.rejected]
        self.next_index = max((i for i in indices if isinstance(i, int)), default=-1) + 1

    def reject(self, sample: Sample, reason: str) -> None:
        sample.reject_reason = reason
        self.rejected.append(sample)
        self.progress.rejected += 1
        self.progress.reasons[reason] = self.progress.reasons.get(reason, 0) + 1

    # ---- 1. in-context examples and prompts, from the pool as it stands at the pass start

    def candidates(self, count: int) -> list[_Candidate]:
        generator, seed = self.generator, self.generator.config.seed
        out = []
        for i in range(self.next_index, self.next_index + count):
            rng = random.Random(f"{seed}:{i}")
            query = rng.randrange(len(self.pool))
            near = [s for s, _ in self.pool.search(self.pool.vector(query), self.isara.k)]
            tokens: list[int] = []
            while near:
                tokens = generator.tokenize(build_isara_prompt(generator.chat_prompt, shuffled(near, rng)))
                if len(tokens) <= self.room:
                    break
                near = near[:-1]  # drop the farthest neighbour until the prompt fits
            if not near:
                raise UserError(f"a single seed example does not fit n_ctx {generator.n_ctx_seq}; raise n_ctx")
            out.append(_Candidate(i, near, tokens))
        self.next_index += count
        return out

    # ---- 2. both turns in one pass: the model writes a request, then answers it

    def decode(self, candidates: list[_Candidate]) -> list[Completion]:
        last_report = 0.0

        def step(count: int) -> None:
            nonlocal last_report
            self.progress.tokens += count
            now = time.monotonic()
            if now - last_report > 0.5:
                last_report = now
                self.listener.progress(self.progress)

        return self.generator.run(
            [c.prompt for c in candidates],
            max_tokens=[self.isara.max_prompt_tokens, self.isara.max_response_tokens],
            seeds=[derive_seed(self.generator.config.seed, c.index) for c in candidates],
            then=self.then,
            on_step=step,
        )

    # ---- 3. rules

    def rules(self, candidates: list[_Candidate], results: list[Completion]) -> list[_Candidate]:
        survivors = []
        for c, r in zip(candidates, results):
            parsed = parse_generation(r.texts[0], r.finish[0], r.texts[1], r.finish[1], self.markers)
            c.sample = Sample(
                parsed.prompt,
                parsed.response,
                source="generated",
                round=self.round_no,
                meta={"index": c.index, "examples": [_example_ref(e) for e in c.examples]},
            )
            reason = check_rules(parsed.prompt, parsed.response, c.examples, self.filters, self.markers.leak, parsed.problem)
            if reason:
                self.reject(c.sample, reason)
            else:
                survivors.append(c)
        self.listener.progress(self.progress)
        return survivors

    # ---- 4. novelty against seeds and everything accepted (before spending a rating on it)

    def novelty(self, survivors: list[_Candidate]) -> list[_Candidate]:
        if not survivors:
            return survivors
        vectors = self.embedder.embed_samples([c.sample for c in survivors])
        kept = []
        for c, v, sim in zip(survivors, vectors, self.known.max_similarity(vectors)):
            c.vector = v
            c.sample.scores["max_similarity"] = round(float(sim), 4)
            reason = check_novelty(float(sim), self.filters)
            if reason:
                self.reject(c.sample, reason)
            else:
                kept.append(c)
        return kept

    # ---- 5. self-assessment, then acceptance in index order

    def rate(self, survivors: list[_Candidate]) -> None:
        def step(count: int) -> None:
            self.progress.tokens += count

        rate_samples(self.generator, [c.sample for c in survivors], self.seeds, on_step=step)
        self.listener.progress(self.progress)

    def accept(self, survivors: list[_Candidate], n: int) -> None:
        """Accept in index order, re-checking novelty against the samples accepted earlier in this pass."""
        for c in survivors:
            reason = check_rating(c.sample.scores, self.filters) if self.filters.rate else None
            if reason is None and len(self.accepted) >= n:
                break  # enough: the rest are neither accepted nor rejected (a resume regenerates them)
            if reason is None:
                sim = float(self.known.max_similarity(c.vector[None, :])[0])
                c.sample.scores["max_similarity"] = round(max(sim, c.sample.scores["max_similarity"]), 4)
                reason = check_novelty(sim, self.filters)
            if reason:
                self.reject(c.sample, reason)
                continue
            self.accepted.append(c.sample)
            self.known.add([c.sample], c.vector[None, :])
            self.progress.accepted += 1
        self.listener.progress(self.progress)


def before_last_pass(accepted: list[Sample], rejected: list[Sample], batch: int) -> tuple[list[Sample], list[Sample]]:
    """What a resume keeps: the samples of every pass but the last one recorded.

    The two files are rewritten one after the other at the end of each pass, so a kill
    between the writes leaves them a pass apart (the rejects of the last pass missing).
    Passes start at multiples of `batch` and regenerate identically, so the last one is
    simply run again.
    """
    indices = [s.meta.get("index") for s in accepted + rejected]
    last = max((i for i in indices if isinstance(i, int)), default=-1)
    start = last // batch * batch if last >= 0 else 0

    def keep(s: Sample) -> bool:
        return not isinstance(s.meta.get("index"), int) or s.meta["index"] < start

    return [s for s in accepted if keep(s)], [s for s in rejected if keep(s)]


def _example_ref(sample: Sample) -> str:
    """A short, stable reference to an in-context example (for provenance in meta)."""
    return hashlib.sha256(f"{sample.prompt}\x00{sample.response}".encode()).hexdigest()[:12]


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
