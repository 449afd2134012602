"""Batched text generation on llama.cpp, in this process.

`BatchGenerator` decodes many sequences at once through llama.cpp's low-level batch API,
as llama.cpp's own `batched` example does: one `llama_batch` per step holds the next token
of every live sequence (each under its own sequence id), one `llama_decode` runs them all,
and each sequence samples from its own row of logits with its own sampler chain. On a
2-core CPU a 135M model is bound by memory traffic per forward pass, not by arithmetic, so
eight sequences per pass cost little more than one.

- Slots are refilled as sequences finish (continuous batching), so a long completion does
  not hold the batch hostage.
- The longest token prefix shared by all prompts of a call (a system prompt, the rubric
  text) is decoded once into its own sequence and its KV cache copied into each slot.
- Every prompt gets its own sampler seeded from (config.seed, prompt index): the same
  config and prompts give the same texts, and a resumed run can regenerate sample i alone.

`continuation_logprobs` scores given continuations instead (multiple choice), on a second
handle of the model that keeps the logits of every position.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from localalign.engine.base import (
    chat_template_of,
    Completion,
    Decoding,
    GenerationConfig,
    GGUFText,
    Job,
    Leaf,
    TokenCounts,
    answer_seed,
    auto_parallel,
    check_prompt,
    decoding,
    kv_bytes_per_sequence,
)
from localalign.engine.runtime import default_threads, gpu_free_bytes, llama_cpp, load_llama, offloads
from localalign.errors import UserError


@dataclass
class _Live:
    """A sequence being decoded in one KV slot: one branch of a job, or one answer of a branch."""

    leaf: Leaf
    slot: int
    seed: int
    sampler: int
    pending: list[int]  # tokens to feed at the next decode
    n_past: int
    budget: int  # tokens it may still sample in this turn
    result: Completion = field(default_factory=Completion)
    turn: int = 0
    pieces: bytearray = field(default_factory=bytearray)
    ids: list[int] = field(default_factory=list)
    # Held for the job until its prompt is read: the other branches, started from its cache.
    followers: list["_Live"] = field(default_factory=list)
    answer_slots: list[int] = field(default_factory=list)  # reserved for this branch's answers 1..A-1


# Multiple-choice scoring keeps logits for every position: n_ctx x vocabulary floats
# (1024 x 49k x 4 bytes = 200 MB for SmolLM2); questions and answers are short.
SCORER_N_CTX = 1024


class BatchGenerator(GGUFText):
    """A GGUF model decoding up to `self.parallel` sequences per forward pass (`config.parallel`,
    or for "auto" what this machine holds: `resolve_parallel`)."""

    def __init__(self, gguf_path: str | Path, config: GenerationConfig | None = None, lora_path=None):
        self.config = config or GenerationConfig()
        self.gguf_path = Path(gguf_path)
        self.lib = llama_cpp()
        # load_llama owns file checks and error messages; its own context stays tiny because
        # decoding happens in a context made here with n_seq_max and kv_unified set (the
        # high-level Llama class does not pass those through).
        self.llm = load_llama(gguf_path, n_ctx=256, n_batch=64, threads=self._threads, lora_path=lora_path)
        self.model = self.llm._model.model
        self.vocab = self.llm._model.vocab
        self.template, self.family = chat_template_of(self.llm.metadata)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self._piece_cache: dict[int, bytes] = {}
        self.lora_path = lora_path
        self._scorer = None
        self.counts = TokenCounts()
        self._ctx = None
        self._batch = None
        self.parallel = self.resolve_parallel()
        self._make_context()

    @property
    def _threads(self) -> int:
        return self.config.threads or default_threads()

    def resolve_parallel(self) -> int:
        """`config.parallel` as a number: "auto" is `auto_parallel` of the free GPU memory (read after
        the weights are on it) and this model's KV cache per sequence; on a CPU, CPU_PARALLEL."""
        cfg = self.config
        if cfg.parallel != "auto":
            return int(cfg.parallel)
        free = gpu_free_bytes() if offloads() else None
        lib, model = self.lib, self.model
        n_head = lib.llama_model_n_head(model)
        head_dim = lib.llama_model_n_embd(model) // max(1, n_head)
        arch = self.llm.metadata.get("general.architecture", "")
        key_dim = int(self.llm.metadata.get(f"{arch}.attention.key_length", head_dim))
        value_dim = int(self.llm.metadata.get(f"{arch}.attention.value_length", head_dim))
        per_sequence = kv_bytes_per_sequence(cfg.n_ctx, lib.llama_model_n_layer(model), lib.llama_model_n_head_kv(model),
                                             key_dim, value_dim)
        return auto_parallel(free, per_sequence, cfg.n_batch)

    def _make_context(self) -> None:
        lib, cfg = self.lib, self.config
        # One extra sequence holds the shared prompt prefix that slots copy from.
        self.n_seq = self.parallel + 1
        params = lib.llama_context_default_params()
        # Unified: one buffer whose cells the prefix shares; split: one n_ctx stream each.
        params.n_ctx = cfg.n_ctx * (self.parallel if cfg.kv_unified else self.n_seq)
        params.n_batch = cfg.n_batch
        params.n_ubatch = cfg.n_batch
        params.n_seq_max = self.n_seq
        params.kv_unified = cfg.kv_unified
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.no_perf = True
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(self.model, params)
        if ctx is None:
            raise UserError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {self.gguf_path}")
        self._ctx = ctx
        adapter = getattr(self.llm, "_lora_adapter", None)
        if adapter is not None:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(self.llm.lora_scale)
            if lib.llama_set_adapters_lora(ctx, adapters, 1, scales):
                raise UserError(f"llama.cpp could not apply the adapter to {self.gguf_path}")
        self.mem = lib.llama_get_memory(ctx)
        self.n_ctx_seq = cfg.n_ctx if cfg.kv_unified else lib.llama_n_ctx_seq(ctx)
        self._batch = lib.llama_batch_init(cfg.n_batch, 0, 1)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None
        if self._batch is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self.lib.llama_free(self._ctx)
            self._ctx = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    # ------------------------------------------------------------------ text <-> tokens

    def piece(self, token: int) -> bytes:
        """The bytes of one token; control tokens render as their text (e.g. <|im_start|>)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            cached = self._piece_cache[token] = buf.raw[:n]
        return cached

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------------ public decoding

    def score_continuations(self, prompt: str, continuations: Sequence[str]) -> list[float]:
        """Sum of log p(continuation | prompt) for each continuation (multiple choice).

        Uses a second handle on the model with logits for every position, loaded on first use.
        """
        if self._scorer is None:
            self._scorer = load_llama(
                self.gguf_path, n_ctx=SCORER_N_CTX, threads=self.config.threads, logits_all=True, lora_path=self.lora_path
            )
        return continuation_logprobs(
            self._scorer, self.tokenize(prompt), [self.tokenize_continuation(c) for c in continuations]
        )

    def run_jobs(self, jobs: Iterable[Job], max_tokens: int | Sequence[int] | None = None,
                 temperature: float | None = None, stop: Sequence[str] | None = None, then: list[int] | None = None,
                 grammar: str | None = None, on_done: Callable[[Leaf, Completion], None] | None = None,
                 on_step: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 prefix: Sequence[int] = ()) -> None:
        """Decode a stream of jobs (see `Job`); the core that `run`, `complete` and the ISARA step share.

        Jobs are taken from `jobs` as slots free up, so the iterator may be endless: decoding
        stops when it runs dry or `should_stop()` says so (checked before every decode; what is
        still being decoded then is dropped). A job starts when it has a slot for each sequence
        it can grow to (`Job.sequences`).
        `then`: tokens fed after a first turn that ended on an end-of-generation token, after
        which the sequence writes a second turn (ISARA: the model writes a user turn, `then`
        opens the assistant turn, the model answers it, all in one pass over the KV cache).
        `grammar`: a GBNF grammar every completion must follow (llama.cpp's grammar sampler).
        `max_tokens` may be one number per turn. `prefix`: tokens every prompt starts with,
        decoded once and copied into each job's cache. `on_done(leaf, completion)` is called
        as each sequence finishes, `on_step(n)` after every decode that sampled n tokens.
        """
        d = decoding(self.config, max_tokens, temperature, stop, then, grammar)
        self._start(list(prefix))
        stream = enumerate(iter(jobs))
        waiting = next(stream, None)
        free = list(range(self.parallel))[::-1]
        live: list[_Live] = []
        while True:
            if should_stop is not None and should_stop():
                break
            while waiting is not None and len(free) >= self._check_job(*waiting).sequences:
                live.append(self._admit(*waiting, free, d, len(prefix)))
                waiting = next(stream, None)
            if not live:
                break
            ready = self._fill_and_decode(live)
            if on_step is not None and ready:
                on_step(len(ready))
            for seq, index in ready:
                for follower in seq.followers:  # the prompt is read: the job's other branches start
                    self._copy_cache(seq.slot, follower.slot)
                    follower.n_past = seq.n_past
                    live.append(follower)
                    self._sample(follower, index, d, live, free, on_done)
                seq.followers = []
                self._sample(seq, index, d, live, free, on_done)
        self._release(live)

    # ------------------------------------------------------------------ internals

    def _start(self, prefix: list[int]) -> None:
        """An empty cache, with `prefix` decoded into the extra sequence that jobs copy it from."""
        self.lib.llama_memory_clear(self.mem, True)
        if prefix:
            self._decode_plain(prefix, self.parallel)

    def _check_job(self, number: int, job: Job) -> Job:
        check_prompt(number, job.prompt, self.n_ctx_seq)
        if job.sequences > self.parallel:
            raise UserError(f"a job of {len(job.seeds)} branches x {job.answers} answers needs {job.sequences} "
                            f"sequences; parallel is {self.parallel}")
        return job

    def _admit(self, number: int, job: Job, free: list[int], d: Decoding, n_prefix: int) -> _Live:
        """The job's first branch, holding the slots of every sequence the job can grow to."""
        branches = []
        for b, seed in enumerate(job.seeds):
            slot = free.pop()
            self.lib.llama_memory_seq_rm(self.mem, slot, -1, -1)
            seq = _Live(Leaf(number, b, 0), slot, seed, self._sampler(d.temperature, seed, d.grammar),
                        pending=[], n_past=n_prefix, budget=d.budgets[0])
            seq.answer_slots = [free.pop() for _ in range(job.answers - 1)] if d.then is not None else []
            branches.append(seq)
        leader = branches[0]
        if n_prefix:
            self._copy_cache(self.parallel, leader.slot)
        leader.pending = list(job.prompt[n_prefix:])
        leader.followers = branches[1:]
        return leader

    def _copy_cache(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, dst, -1, -1)
        self.lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def _sample(self, seq: _Live, index: int, d: Decoding, live: list[_Live], free: list[int], on_done) -> None:
        """Sample `seq`'s next token from batch row `index`; finish, fork or continue it."""
        token = self.lib.llama_sampler_sample(seq.sampler, self._ctx, index)
        self.counts.written += 1
        outcome = self._advance(seq, token, d)
        if outcome == "continue":
            return
        if outcome == "second turn":
            for m, slot in enumerate(seq.answer_slots, 1):  # the other answers start from this cache
                self._copy_cache(seq.slot, slot)
                answer_seed_m = answer_seed(seq.seed, m)
                live.append(_Live(Leaf(seq.leaf.job, seq.leaf.branch, m), slot, answer_seed_m,
                                  self._sampler(d.temperature, answer_seed_m, d.grammar), pending=list(seq.pending),
                                  n_past=seq.n_past, budget=seq.budget, turn=1,
                                  result=_first_turn_of(seq.result)))
            seq.answer_slots = []
            return
        self.lib.llama_sampler_free(seq.sampler)
        live.remove(seq)
        free.append(seq.slot)
        unanswered = [Leaf(seq.leaf.job, seq.leaf.branch, m) for m in range(1, len(seq.answer_slots) + 1)]
        free.extend(seq.answer_slots)  # a first turn that never ended: its answers are never written
        seq.answer_slots = []
        if on_done is not None:
            on_done(seq.leaf, seq.result)
            for leaf in unanswered:
                on_done(leaf, _first_turn_of(seq.result, complete=True))

    def _release(self, live: list[_Live]) -> None:
        """Free the samplers of sequences left unfinished (should_stop)."""
        for seq in live:
            for follower in seq.followers:
                self.lib.llama_sampler_free(follower.sampler)
            self.lib.llama_sampler_free(seq.sampler)

    # ------------------------------------------------------------------ internals

    def _sampler(self, temperature: float, seed: int, grammar: str | None = None):
        lib, cfg = self.lib, self.config
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if grammar is not None:
            rule = lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not rule:
                lib.llama_sampler_free(chain)
                raise ValueError(f"llama.cpp rejected the grammar: {grammar!r}")
            lib.llama_sampler_chain_add(chain, rule)
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if cfg.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(cfg.top_k))
        if cfg.top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(cfg.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _decode_plain(self, tokens: list[int], seq_id: int) -> None:
        """Feed tokens to one sequence from position 0, no logits (the shared prefix)."""
        n_batch = self.config.n_batch
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            b = self._batch
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = 0
            b.n_tokens = len(chunk)
            self._decode()

    def _fill_and_decode(self, live: list[_Live]) -> list[tuple[_Live, int]]:
        """Put pending tokens of live sequences into one batch, decode it.

        Returns (sequence, batch index) for each sequence whose pending tokens all went in:
        its last token's logits are ready to sample from.
        """
        b = self._batch
        room = self.config.n_batch
        n = 0
        ready: list[tuple[_Live, int]] = []
        for seq in sorted(live, key=lambda s: s.slot):
            if room == 0:
                break
            take = seq.pending[:room]
            del seq.pending[: len(take)]
            for t in take:
                b.token[n] = t
                b.pos[n] = seq.n_past
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.slot
                b.logits[n] = 0
                seq.n_past += 1
                n += 1
            room -= len(take)
            if not seq.pending:
                b.logits[n - 1] = 1
                ready.append((seq, n - 1))
        b.n_tokens = n
        self._decode()
        self.counts.read += n - sum(1 for seq, _ in ready if seq.ids)  # a sampled token fed back is not read
        return ready

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no room in the KV cache)")

    def _advance(self, seq: _Live, token: int, d: Decoding) -> str:
        """Take one sampled token: "continue", "second turn" (`then` queued) or "finished"."""
        result = seq.result
        result.n_generated += 1
        ended_on_token = self.is_end(token)
        finish = None
        if ended_on_token:
            finish = "stop"
        else:
            seq.ids.append(token)
            seq.pieces += self.piece(token)
            seq.budget -= 1
            if d.stop and _find_stop(seq.pieces, d.stop) is not None:
                finish = "stop"
            elif seq.budget <= 0 or seq.n_past + 1 >= self.n_ctx_seq:
                finish = "length"
        if finish is None:
            seq.pending = [token]
            return "continue"
        text = seq.pieces.decode("utf-8", errors="ignore")
        if d.stop:
            cut = _find_stop(seq.pieces, d.stop)
            if cut is not None:
                text = text[:cut]
        result.texts.append(text)
        result.finish.append(finish)
        result.tokens.append(seq.ids)
        last_turn = seq.turn + 1 >= len(d.budgets)
        if last_turn or not ended_on_token or d.then is None:
            _close_turns(result, len(d.budgets), "none")
            return "finished"
        if seq.n_past + len(d.then) + 1 >= self.n_ctx_seq:
            _close_turns(result, len(d.budgets), "length")
            return "finished"
        seq.turn += 1
        seq.pending = list(d.then)
        seq.pieces = bytearray()
        seq.ids = []
        seq.budget = d.budgets[seq.turn]
        return "second turn"


def _close_turns(result: Completion, n_turns: int, why: str) -> None:
    """Turns never reached: empty, finished `why` ("none", or "length" when the context is full)."""
    while len(result.texts) < n_turns:
        result.texts.append("")
        result.finish.append(why)
        result.tokens.append([])


def _first_turn_of(result: Completion, complete: bool = False) -> Completion:
    """A new completion that shares `result`'s first turn (another answer to the same request)."""
    copy = Completion(texts=result.texts[:1], finish=result.finish[:1], tokens=result.tokens[:1])
    if complete:
        _close_turns(copy, len(result.texts), result.finish[-1] if result.finish[-1] == "length" else "none")
    return copy


def _find_stop(pieces: bytearray, stop: Sequence[str]) -> int | None:
    """Character offset of the earliest stop string in the decoded text, or None."""
    text = pieces.decode("utf-8", errors="ignore")
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


# ============================================================================ multiple choice


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
