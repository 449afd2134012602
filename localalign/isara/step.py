"""The ISARA step: new prompt/response pairs, written by the model from retrieved examples alone.

    generate_samples(generator, embedder, seeds, n, ...) -> IsaraResult(accepted, rejected, index)

One stream, no passes. Candidates come from jobs; a job is one few-shot prompt (a query
sample and its k-1 nearest neighbours from the pool, shuffled) read once by the model and
continued by `branches` samplers, each writing a request and `answers` answers to it (the
engine copies the prompt's cache instead of reading it again: `engine.base.Job`). As each
candidate finishes it is judged, in index order:

1. rules        the string checks of filters.py, per answer (free);
2. consistency  per answer: the kind of response the request's nearest seeds give (refusal or
                answer), and the constraints the request states (consistency.py);
3. best-of-n    of the answers that pass, the one closest to the nearest seeds' responses; a
                failed answer is kept beside it as the rejected side of a preference pair;
4. novelty      against the seeds, the earlier rounds and everything accepted so far;
5. rating       (off by default: at 135M it does not separate good pairs from bad,
                docs/benchmarks.md) the model scores the pair in one forward pass.

The stream stops as soon as `n` are accepted; nothing waits for a slow sequence but the
candidates that follow it in index order. The step writes no file: it hands everything decided
so far to its `Listener` after each batch of decisions, and the stage writes it.

Resumable: candidate i = job i // branches, branch i % branches; the job draws its query and
examples from (generator.config.seed, job) and the pool, which is fixed for the call (the
seeds, or with query_from="all" also the earlier rounds' samples), and branch b samples with
derive_seed(seed, i). Every candidate is decided in index order and records i in
meta["index"], so a resumed call keeps the unbroken run of decided indices read back from the
files and continues after it.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from localalign.engine.base import Completion, Generator, Job, Leaf, derive_seed
from localalign.errors import UserError
from localalign.isara.consistency import SeedKinds, check_kind, check_stated_constraints
from localalign.isara.filters import FilterConfig, check_novelty, check_rating, check_rules
from localalign.isara.prompts import Parsed, build_isara_prompt, chat_markers, cut_to_sentence, parse_generation, shuffled
from localalign.isara.rating import rate_samples
from localalign.isara.retrieve import Embedder, SampleIndex
from localalign.judges.refusal import is_refusal
from localalign.samples import Sample

QUERY_FROM = ("seeds", "all")
DECIDE_BATCH = 8  # candidates judged together (one embedder call per phase)
WRONG_LESSON = ("answers_harmful", "refuses_ordinary", "breaks_constraint")


@dataclass
class IsaraConfig:
    # In-context examples: the query sample and its k-1 nearest neighbours. 0: none, the model
    # writes requests of its own (the rehearsal data, align.py).
    k: int = 4
    # Where query samples and their neighbours come from: "seeds", or "all" (seeds plus the
    # samples of earlier rounds, so later rounds can wander further from the seeds).
    query_from: str = "seeds"
    # Candidates per few-shot prompt: the prompt is read once and `branches` samplers write a
    # request each from its cache. Prompt reading is most of generation's cost on a CPU.
    branches: int = 4
    # Answers sampled per request (best-of-n); the best that passes the filters is kept.
    answers: int = 1
    max_prompt_tokens: int = 128  # the generated user turn; a longer one is cut and rejected
    # The seeds' answers are at most 158 tokens. Of hand-labelled generated answers, those over
    # 256 tokens were coherent half as often as shorter ones; a 384 budget spent 39% of the
    # 256-sample round's writing on answers then rejected as cut off (docs/benchmarks.md).
    max_response_tokens: int = 256
    max_candidates_factor: float = 6.0  # give up after n * this many candidates
    # Contrast twins (issue 26): every second job takes the query of the job before it and, as
    # its examples, the query's nearest pool samples of the *other* kind (answered for a
    # refused query, refused for an answered one), so the model writes an ordinary request
    # where it just wrote a harmful one, and the reverse: the same topic, the other lesson.
    # Jobs 0, 2, 4, ... are those of a run without twins. Off by default; measured in
    # docs/benchmarks.md ("The frontier on the powered suites").
    twins: bool = False

    def __post_init__(self) -> None:
        if self.k < 0:
            raise UserError(f"k must be at least 0, got {self.k}")
        if self.query_from not in QUERY_FROM:
            raise UserError(f"query_from must be 'seeds' or 'all', got {self.query_from!r}")
        if self.max_prompt_tokens < 8 or self.max_response_tokens < 8:
            raise UserError("max_prompt_tokens and max_response_tokens must be at least 8")
        if self.branches < 1 or self.answers < 1:
            raise UserError("branches and answers must be at least 1")
        if self.max_candidates_factor < 1:
            raise UserError("max_candidates_factor must be at least 1")


@dataclass
class Progress:
    """What `generate_samples` reports as it goes (for a progress bar)."""

    accepted: int = 0
    rejected: int = 0
    tokens: int = 0  # generated tokens (both turns and every answer)
    reasons: dict[str, int] = field(default_factory=dict)


class Listener:
    """What the stage hears from the step; the step itself writes nothing."""

    def progress(self, progress: Progress) -> None:
        """The work of this call so far: after every decision, and a few times a second while decoding."""

    def decided(self, accepted: list[Sample], rejected: list[Sample]) -> None:
        """Every sample accepted and rejected so far (resumed ones included), after each batch of decisions."""


class IsaraResult(NamedTuple):
    accepted: list[Sample]  # new accepted samples, in index order (resumed ones included)
    rejected: list[Sample]  # with their reject_reason
    index: SampleIndex  # seeds, the earlier rounds' samples and `accepted`, with their vectors


@dataclass
class _Candidate:
    index: int
    examples: list[Sample]  # the retrieved examples, nearest first (the prompt shows them shuffled)
    answers: list[Completion | None]


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
    while len(step.accepted) < n:
        before = step.decided_upto
        step.stream(n, budget)
        if step.filters.rate and step.awaiting:
            step.rate_and_accept(n)
        if step.decided_upto == before or step.decided_upto >= budget:
            break  # the candidate budget is spent
    return IsaraResult(step.accepted, step.rejected, step.known)


class _Step:
    """One call's state: the pool, what is known, what was decided; a method a phase."""

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
        self.kinds = SeedKinds.of(seeds, embedder.embed([s.prompt for s in seeds]),
                                  embedder.embed([s.response for s in seeds]))
        self.known = SampleIndex(embedder.dim)  # everything a new sample must differ from
        self.known.add(seeds, self.seed_vectors)
        self.accepted: list[Sample] = []
        self.rejected: list[Sample] = []
        self.awaiting: list[tuple[Sample, np.ndarray]] = []  # passed every filter but the rating
        self.progress = Progress()
        self.next_index = 0  # the first candidate not yet asked of the model
        self.decided_upto = 0  # every candidate below this is decided (or awaiting its rating)
        self.finished: dict[int, _Candidate] = {}
        self.open: dict[int, _Candidate] = {}
        self.stream_jobs: list[int] = []

    def resume(self, accepted: list[Sample], rejected: list[Sample]) -> None:
        """Keep the unbroken run of decided indices 0..m-1 and continue at m."""
        decided = {s.meta.get("index") for s in accepted + rejected}
        m = 0
        while m in decided:
            m += 1
        keep = lambda s: isinstance(s.meta.get("index"), int) and s.meta["index"] < m  # noqa: E731
        self.accepted, self.rejected = [s for s in accepted if keep(s)], [s for s in rejected if keep(s)]
        if self.earlier + self.accepted:
            self.known.add(self.earlier + self.accepted, self.embedder.embed_samples(self.earlier + self.accepted))
        self.pool = SampleIndex(self.embedder.dim)  # fixed for the call: a candidate's examples depend on its index alone
        self.pool.add(self.seeds, self.seed_vectors)
        if self.isara.query_from == "all" and self.earlier:
            self.pool.add(self.earlier, self.embedder.embed_samples(self.earlier))
        self.next_index = self.decided_upto = m

    # ---- the stream: jobs in, finished candidates out

    def stream(self, n: int, budget: int) -> None:
        last_report = 0.0

        def step(count: int) -> None:
            nonlocal last_report
            self.progress.tokens += count
            if time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                self.listener.progress(self.progress)

        def enough() -> bool:
            return len(self.accepted) + len(self.awaiting) >= n

        self.generator.run_jobs(
            self.jobs(budget), max_tokens=[self.isara.max_prompt_tokens, self.isara.max_response_tokens],
            then=self.then, on_done=lambda leaf, c: self.finish(leaf, c, n), on_step=step, should_stop=enough,
        )
        self.judge_finished(n, final=True)
        self.finished.clear()  # candidates past the target: neither accepted nor rejected (a resume regenerates them)
        self.open.clear()
        self.next_index = self.decided_upto

    def jobs(self, budget: int) -> Iterator[Job]:
        """Jobs from the one holding candidate `next_index` on, until the candidate budget."""
        branches, seed = self.isara.branches, self.generator.config.seed
        job = self.next_index // branches
        self.stream_jobs = []  # the engine numbers jobs by their place in this stream
        while job * branches < budget:
            self.stream_jobs.append(job)
            examples, tokens = self.examples_for(job)
            for i in range(max(job * branches, self.decided_upto), (job + 1) * branches):
                self.open[i] = _Candidate(i, examples, [None] * self.isara.answers)
            self.next_index = (job + 1) * branches
            yield Job(tokens, tuple(derive_seed(seed, i) for i in range(job * branches, (job + 1) * branches)),
                      self.isara.answers)
            job += 1

    def examples_for(self, job: int) -> tuple[list[Sample], list[int]]:
        """A query sample and its nearest neighbours, shuffled into a prompt that fits the context."""
        generator = self.generator
        if self.isara.k == 0:
            return [], generator.tokenize(build_isara_prompt(generator.chat_prompt, []))
        rng = random.Random(f"{generator.config.seed}:{job}")
        query = rng.randrange(len(self.pool))
        if self.is_twin(job):
            query = random.Random(f"{generator.config.seed}:{job - 1}").randrange(len(self.pool))  # the job before's
            near = self.twin_examples(query)
        else:
            near = [s for s, _ in self.pool.search(self.pool.vector(query), self.isara.k)]
        while near:
            tokens = generator.tokenize(build_isara_prompt(generator.chat_prompt, shuffled(near, rng)))
            if len(tokens) <= self.room:
                return near, tokens
            near = near[:-1]  # drop the farthest neighbour until the prompt fits
        raise UserError(f"a single seed example does not fit n_ctx {generator.n_ctx_seq}; raise n_ctx")

    def is_twin(self, job: int) -> bool:
        return self.isara.twins and job % 2 == 1

    def twin_examples(self, query: int) -> list[Sample]:
        """The query's k nearest pool samples of the other kind (refused / answered); its plain
        neighbours where the pool holds only one kind."""
        ranked = [s for s, _ in self.pool.search(self.pool.vector(query), len(self.pool))]
        other = [s for s in ranked if is_refusal(s.response) != is_refusal(self.pool.samples[query].response)]
        return (other or ranked)[: self.isara.k]

    def finish(self, leaf: Leaf, completion: Completion, n: int) -> None:
        index = self.stream_jobs[leaf.job] * self.isara.branches + leaf.branch
        candidate = self.open.get(index)
        if candidate is None or index < self.decided_upto:
            return  # an earlier branch of a job a resume re-runs: decided already
        candidate.answers[leaf.answer] = completion
        if all(a is not None for a in candidate.answers):
            self.finished[index] = self.open.pop(index)
            self.judge_finished(n)

    # ---- judging, in index order

    def judge_finished(self, n: int, final: bool = False) -> None:
        """Judge the finished candidates that come next in index order, `DECIDE_BATCH` at a time
        (fewer at the end of the stream), while fewer than `n` are accepted or awaiting a rating."""
        while len(self.accepted) + len(self.awaiting) < n:
            batch = []
            while self.decided_upto + len(batch) in self.finished and len(batch) < DECIDE_BATCH:
                batch.append(self.finished[self.decided_upto + len(batch)])
            if not batch or (len(batch) < DECIDE_BATCH and not final and self.open):
                return  # wait for a whole batch: the embedder is called once per batch and phase
            for c in batch:
                del self.finished[c.index]
            self.decide(batch, n)  # the ones past the target stay undecided
            self.listener.decided(self.accepted, self.rejected)
            self.listener.progress(self.progress)

    def decide(self, batch: list[_Candidate], n: int) -> None:
        """Rules and consistency per answer, best-of-n, novelty: accept, await the rating, or reject;
        in index order, until `n` are accepted or awaiting (the rest stay undecided)."""
        parsed = [[self.parse(a) for a in c.answers] for c in batch]
        prompt_vectors = self.embedder.embed([answers[0].prompt for answers in parsed])
        verdicts = [self.judge(c, answers, v) for c, answers, v in zip(batch, parsed, prompt_vectors)]
        kept = [sample for sample, reason in verdicts if reason is None]
        vectors = iter(self.embedder.embed_samples(kept) if kept else [])
        for c, (sample, reason) in zip(batch, verdicts):
            if len(self.accepted) + len(self.awaiting) >= n:
                return
            self.decided_upto = c.index + 1
            if reason is not None:
                self.reject(sample, reason)
                continue
            vector = next(vectors)[None, :]
            sim = float(self.known.max_similarity(vector)[0])
            sample.scores["max_similarity"] = round(sim, 4)
            if (reason := check_novelty(sim, self.filters)) is not None:
                self.reject(sample, reason)
            elif self.filters.rate:
                self.awaiting.append((sample, vector))
            else:
                self.accept(sample, vector)

    def parse(self, completion: Completion) -> Parsed:
        a = completion
        parsed = parse_generation(a.texts[0], a.finish[0], a.texts[1], a.finish[1], self.markers)
        if parsed.problem == "truncated_response" and self.filters.end_cut_answers and cut_to_sentence(parsed.response):
            return Parsed(parsed.prompt, cut_to_sentence(parsed.response))
        return parsed

    def judge(self, c: _Candidate, answers, prompt_vector: np.ndarray) -> tuple[Sample, str | None]:
        """The candidate's sample (its best answer) and the reason it fails, before novelty; no state changes."""
        prompt = answers[0].prompt
        why = [check_rules(p.prompt, p.response, c.examples, self.filters, self.markers.leak, p.problem) for p in answers]
        if self.filters.consistency:
            vote = float(self.kinds.refusal_vote(prompt_vector[None, :], self.filters.vote_temperature)[0])
            for m, p in enumerate(answers):
                if why[m] is None:
                    why[m] = (check_kind(vote, p.response, self.filters.keep_refusal_from, self.filters.keep_answer_below)
                              or check_stated_constraints(prompt, p.response))
        meta = {"index": c.index, "examples": [_example_ref(e) for e in c.examples]}
        if self.is_twin(c.index // self.isara.branches):
            meta["twin"] = True
        passing = [m for m, r in enumerate(why) if r is None]
        if not passing:
            return Sample(prompt, answers[0].response, "generated", self.round_no, meta=meta), why[0]
        pick, other = self.best_of(prompt_vector, answers, why, passing)
        sample = Sample(prompt, answers[pick].response, "generated", self.round_no, meta=meta)
        if other is not None:
            sample.meta["rejected_response"] = answers[other].response
            sample.meta["rejected_reason"] = why[other] or "farther_from_seeds"
        return sample, None

    def best_of(self, prompt_vector: np.ndarray, answers, why: list[str | None], passing: list[int]):
        """(the passing answer closest to the nearest seeds' responses, an answer to set against it or None)."""
        if len(answers) == 1:
            return 0, None
        closeness = self.kinds.closeness(prompt_vector, self.embedder.embed([answers[m].response for m in passing]),
                                         self.filters.consistency_k)
        order = [passing[i] for i in np.argsort(-closeness, kind="stable")]
        failed = [m for m, r in enumerate(why) if r is not None and answers[m].response.strip()]
        wrong_kind = [m for m in failed if why[m] in WRONG_LESSON]
        if wrong_kind:  # the most telling contrast: the same request answered the wrong way
            return order[0], wrong_kind[0]
        if failed:
            return order[0], failed[0]
        return order[0], order[-1] if len(order) > 1 else None

    def accept(self, sample: Sample, vector: np.ndarray) -> None:
        self.accepted.append(sample)
        self.known.add([sample], vector)
        self.progress.accepted += 1

    def reject(self, sample: Sample, reason: str) -> None:
        sample.reject_reason = reason
        self.rejected.append(sample)
        self.progress.rejected += 1
        self.progress.reasons[reason] = self.progress.reasons.get(reason, 0) + 1

    # ---- rating, when on

    def rate_and_accept(self, n: int) -> None:
        """Rate what passed every other filter; accept in index order (novelty checked again)."""

        def step(count: int) -> None:
            self.progress.tokens += count

        rate_samples(self.generator, [s for s, _ in self.awaiting], self.seeds, on_step=step)
        for sample, vector in self.awaiting:
            if len(self.accepted) >= n:
                break  # enough: the rest are neither accepted nor rejected (a resume regenerates them)
            reason = check_rating(sample.scores, self.filters)
            if reason is None:
                sim = float(self.known.max_similarity(vector)[0])
                sample.scores["max_similarity"] = round(max(sim, sample.scores["max_similarity"]), 4)
                reason = check_novelty(sim, self.filters)
            if reason:
                self.reject(sample, reason)
            else:
                self.accept(sample, vector)
        self.awaiting = []
        self.listener.decided(self.accepted, self.rejected)
        self.listener.progress(self.progress)


def _example_ref(sample: Sample) -> str:
    """A short, stable reference to an in-context example (for provenance in meta)."""
    return hashlib.sha256(f"{sample.prompt}\x00{sample.response}".encode()).hexdigest()[:12]

