"""Batched text generation on llama.cpp, and the ISARA generate step built on it.

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
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from localalign.chat import render_chat
from localalign.errors import UserError
from localalign.runtime import default_threads, llama_cpp, load_llama

if TYPE_CHECKING:
    from localalign.backends import Generator


@dataclass
class GenerationConfig:
    threads: int | None = None  # None: LOCALALIGN_THREADS or every core (runtime.default_threads)
    # Per sequence: prompt + completion. A 4-shot ISARA prompt of safety seeds is ~700 tokens
    # with SmolLM2's tokenizer, plus up to two turns of completion.
    n_ctx: int = 2048
    temperature: float = 0.8  # 0 = greedy. Below ~0.6 a 135M model repeats its examples.
    top_p: float = 0.95
    # top-k before top-p: llama.cpp's default too; it also keeps each sampling step O(k)
    # instead of sorting the whole 49k-token vocabulary, for every sequence, every token.
    top_k: int = 40
    max_tokens: int = 384  # per completion (per turn for two-turn generation)
    seed: int = 0  # base seed; prompt i samples with derive_seed(seed, i)
    # Sequences decoded together. On a Q8_0 model llama.cpp's batched kernels keep gaining
    # up to 32 here (2 cores, SmolLM2-135M, 32 prompts x 128 tokens: 111 tokens/s with 8,
    # 144 with 16, 159 with 32: bench/bench_generate.py --sweep, docs/benchmarks.md).
    parallel: int = 32
    n_batch: int = 512  # tokens per llama_decode while reading prompts
    # One KV buffer for all sequences (True) makes every token attend over every sequence's
    # cells, masked; separate buffers (False) keep attention to a sequence's own cells.
    # llama.h: "try to disable when n_seq_max > 1 for improved performance when the sequences
    # do not share a large prefix" - ISARA prompts share only the system prompt.
    kv_unified: bool = False
    # llama.cpp's flash-attention kernels. Off: the plain kernels are what llama-cpp-python's
    # Llama uses, so greedy outputs match it token for token (tested).
    flash_attn: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.n_ctx >= 64, f"n_ctx must be at least 64, got {self.n_ctx}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (1 <= self.parallel <= 64, f"parallel must be in 1..64, got {self.parallel}"),
            (self.n_batch >= 1, f"n_batch must be >= 1, got {self.n_batch}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit sampler seed for item `index` of a run seeded with `seed` (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    return value if value != 0xFFFFFFFF else 0  # 0xFFFFFFFF means "random" to llama.cpp


@dataclass
class Completion:
    """What one prompt produced: a text per turn, and why each turn ended."""

    texts: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)  # "stop" (end token or stop string) or "length"
    tokens: list[list[int]] = field(default_factory=list)  # the sampled ids, per turn
    n_generated: int = 0


@dataclass
class _Live:
    """A sequence being decoded in one KV slot."""

    job: int
    slot: int
    sampler: int
    pending: list[int]  # tokens to feed at the next decode
    n_past: int
    budget: int  # tokens it may still sample in this turn
    turn: int = 0
    pieces: bytearray = field(default_factory=bytearray)
    ids: list[int] = field(default_factory=list)


class GGUFText:
    """Tokens and chat template from a GGUF loaded in llama-cpp-python (`self.llm`; a
    vocab-only load is enough). Shared by every generation backend, so a prompt is the same
    text and the same tokens whichever backend decodes it; a backend is a context manager
    around its `close`."""

    llm: object
    template: str

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text`, special tokens parsed, BOS added if the model wants one."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def tokenize_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence (no BOS)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        """`messages` in the GGUF's own chat template, ending where the assistant speaks."""
        bos = self.llm._model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = self.llm._model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        return render_chat(self.template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def turn_budgets(max_tokens: int | Sequence[int] | None, n_turns: int, default: int) -> list[int]:
    """`max_tokens` of `run` as one budget per turn."""
    if max_tokens is None:
        return [default] * n_turns
    if isinstance(max_tokens, int):
        return [max_tokens] * n_turns
    return list(max_tokens)


def run_settings(cfg: GenerationConfig, n_ctx_seq: int, prompt_tokens, max_tokens, temperature, stop, seeds, then):
    """`run`'s arguments checked and completed from the config: (budgets, temperature, seeds, stop)."""
    budgets = turn_budgets(max_tokens, 2 if then is not None else 1, cfg.max_tokens)
    temperature = cfg.temperature if temperature is None else temperature
    seeds = list(seeds) if seeds is not None else [derive_seed(cfg.seed, i) for i in range(len(prompt_tokens))]
    if len(seeds) != len(prompt_tokens):
        raise ValueError("one seed per prompt")
    for i, toks in enumerate(prompt_tokens):
        if len(toks) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(toks) >= n_ctx_seq:
            raise UserError(f"prompt {i} has {len(toks)} tokens; the context holds {n_ctx_seq} per sequence (raise n_ctx)")
    return budgets, temperature, seeds, [s for s in (stop or []) if s]


# Multiple-choice scoring keeps logits for every position: n_ctx x vocabulary floats
# (1024 x 49k x 4 bytes = 200 MB for SmolLM2); questions and answers are short.
SCORER_N_CTX = 1024


class BatchGenerator(GGUFText):
    """A GGUF model decoding up to `config.parallel` sequences per forward pass."""

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
        self.template = self.llm.metadata.get("tokenizer.chat_template", "")
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self._piece_cache: dict[int, bytes] = {}
        self.lora_path = lora_path
        self._scorer = None
        self._ctx = None
        self._batch = None
        self._make_context()

    @property
    def _threads(self) -> int:
        return self.config.threads or default_threads()

    def _make_context(self) -> None:
        lib, cfg = self.lib, self.config
        # One extra sequence holds the shared prompt prefix that slots copy from.
        self.n_seq = cfg.parallel + 1
        params = lib.llama_context_default_params()
        # Unified: one buffer whose cells the prefix shares; split: one n_ctx stream each.
        params.n_ctx = cfg.n_ctx * (cfg.parallel if cfg.kv_unified else self.n_seq)
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
        from localalign.eval_mc import continuation_logprobs

        if self._scorer is None:
            self._scorer = load_llama(
                self.gguf_path, n_ctx=SCORER_N_CTX, threads=self.config.threads, logits_all=True, lora_path=self.lora_path
            )
        return continuation_logprobs(
            self._scorer, self.tokenize(prompt), [self.tokenize_continuation(c) for c in continuations]
        )

    def complete(
        self,
        prompts: list[str],
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[str]:
        """Complete each prompt (already chat-templated text); texts in input order."""
        results = self.run([self.tokenize(p) for p in prompts], max_tokens, temperature, stop, seeds)
        return [r.texts[0] for r in results]

    def run(
        self,
        prompt_tokens: list[list[int]],
        max_tokens: int | Sequence[int] | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        then: list[int] | None = None,
        on_done: Callable[[int, Completion], None] | None = None,
        grammar: str | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Decode every prompt; the core that `complete` and the ISARA step share.

        `then`: tokens fed after a turn that ended on an end-of-generation token, after which
        the sequence writes a second turn (ISARA: the model writes a user turn, `then` opens
        the assistant turn, the model answers it, all in one pass over the KV cache).
        `grammar`: a GBNF grammar every completion must follow (llama.cpp's grammar sampler).
        `max_tokens` may be one number per turn. `on_done(i, completion)` is called as each
        prompt finishes, `on_step(n)` after every decode that sampled n tokens (progress).
        """
        cfg = self.config
        budgets, temperature, seeds, stop = run_settings(
            cfg, self.n_ctx_seq, prompt_tokens, max_tokens, temperature, stop, seeds, then
        )
        results = [Completion() for _ in prompt_tokens]
        if not prompt_tokens:
            return results

        lib, ctx, mem = self.lib, self._ctx, self.mem
        lib.llama_memory_clear(mem, True)
        prefix = _shared_prefix(prompt_tokens) if len(prompt_tokens) > 1 else []
        prefix_seq = cfg.parallel
        if prefix:
            self._decode_plain(prefix, prefix_seq)

        queue = deque(range(len(prompt_tokens)))
        free = list(range(cfg.parallel))[::-1]
        live: list[_Live] = []
        while queue or live:
            while queue and free:
                job = queue.popleft()
                slot = free.pop()
                lib.llama_memory_seq_rm(mem, slot, -1, -1)
                if prefix:
                    lib.llama_memory_seq_cp(mem, prefix_seq, slot, -1, -1)
                live.append(
                    _Live(
                        job=job,
                        slot=slot,
                        sampler=self._sampler(temperature, seeds[job], grammar),
                        pending=list(prompt_tokens[job][len(prefix):]),
                        n_past=len(prefix),
                        budget=budgets[0],
                    )
                )
            ready = self._fill_and_decode(live)
            if on_step is not None and ready:
                on_step(len(ready))
            for seq, index in ready:
                token = lib.llama_sampler_sample(seq.sampler, ctx, index)
                if not self._advance(seq, token, stop, then, budgets, results[seq.job]):
                    continue
                lib.llama_sampler_free(seq.sampler)
                live.remove(seq)
                free.append(seq.slot)
                if on_done is not None:
                    on_done(seq.job, results[seq.job])
        return results

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
        return ready

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no room in the KV cache)")

    def _advance(self, seq: _Live, token: int, stop, then, budgets, result: Completion) -> bool:
        """Take one sampled token; True when the sequence is finished."""
        result.n_generated += 1
        ended_on_token = self.is_end(token)
        finish = None
        if ended_on_token:
            finish = "stop"
        else:
            seq.ids.append(token)
            seq.pieces += self.piece(token)
            seq.budget -= 1
            if stop and _find_stop(seq.pieces, stop) is not None:
                finish = "stop"
            elif seq.budget <= 0 or seq.n_past + 1 >= self.n_ctx_seq:
                finish = "length"
        if finish is None:
            seq.pending = [token]
            return False
        text = seq.pieces.decode("utf-8", errors="ignore")
        if stop:
            cut = _find_stop(seq.pieces, stop)
            if cut is not None:
                text = text[:cut]
        result.texts.append(text)
        result.finish.append(finish)
        result.tokens.append(seq.ids)
        last_turn = seq.turn + 1 >= len(budgets)
        if last_turn or not ended_on_token or then is None:
            while len(result.texts) < len(budgets):  # turns never reached
                result.texts.append("")
                result.finish.append("none")
                result.tokens.append([])
            return True
        if seq.n_past + len(then) + 1 >= self.n_ctx_seq:
            result.texts.append("")
            result.finish.append("length")
            result.tokens.append([])
            return True
        seq.turn += 1
        seq.pending = list(then)
        seq.pieces = bytearray()
        seq.ids = []
        seq.budget = budgets[seq.turn]
        return False


def _find_stop(pieces: bytearray, stop: Sequence[str]) -> int | None:
    """Character offset of the earliest stop string in the decoded text, or None."""
    text = pieces.decode("utf-8", errors="ignore")
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest common token prefix, leaving each prompt at least one token of its own
    (a sequence samples from the logits of its own last token)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    first = prompts[0]
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return first[:n]


# ============================================================================ the ISARA step


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
        if self.query_from not in ("seeds", "all"):
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


@dataclass
class _Candidate:
    index: int
    examples: list  # list[Sample], in prompt order
    sample: object = None  # Sample once parsed
    vector: object = None


def generate_samples(
    generator: Generator,
    embedder,
    seeds: list,
    n: int,
    accepted: list | None = None,
    isara: IsaraConfig | None = None,
    filters=None,
    round_no: int | None = None,
    resume: tuple[list, list] | None = None,
    samples_path: str | Path | None = None,
    rejected_path: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
):
    """Generate until `n` new samples are accepted (or the candidate budget runs out).

    Inputs: the seeds, samples accepted in earlier rounds (`accepted`, used for novelty and,
    with query_from="all", as examples). Returns (new accepted, rejected) Sample lists;
    writes them as JSONL when paths are given (rewritten atomically after every pass).

    Resumable: candidate i draws its query, examples and sampler seed from
    (generator.config.seed, i) and the pool alone, and records i in meta["index"]. A resumed
    run passes resume=(accepted, rejected) as read back from its files (`read_rejected` reads
    rejected.jsonl, whose samples may be empty); generation continues at the candidate after
    the last recorded index, and the returned lists (and files) include the resumed samples.
    `on_progress` counts only the work of this call.
    """
    import random

    from localalign.filters import FilterConfig, check_novelty, check_rating, check_rules
    from localalign.prompts import build_isara_prompt, chat_markers, parse_generation, shuffled
    from localalign.retrieve import SampleIndex
    from localalign.samples import Sample, write_samples

    isara = isara or IsaraConfig()
    filters = filters or FilterConfig()
    accepted_before = list(accepted or [])
    if not seeds:
        raise UserError("no seed samples")
    cfg = generator.config
    markers = chat_markers(generator.chat_prompt)
    then = generator.tokenize_continuation(markers.then)
    room = generator.n_ctx_seq - isara.max_prompt_tokens - len(then) - isara.max_response_tokens - 1
    if room < 64:
        raise UserError(
            f"n_ctx {generator.n_ctx_seq} leaves no room for examples after the generated turns; raise n_ctx"
        )

    seed_vectors = embedder.embed_samples(seeds)
    known = SampleIndex(embedder.dim)  # everything a new sample must differ from
    known.add(seeds, seed_vectors)
    done, rejected_done = before_last_pass(*(resume or ([], [])), isara.batch_candidates)
    if accepted_before + list(done):
        known.add(accepted_before + list(done), embedder.embed_samples(accepted_before + list(done)))
    pool = known if isara.query_from == "all" else _seed_index(seeds, seed_vectors, embedder.dim)

    new: list = list(done)
    rejected: list = list(rejected_done)
    progress = Progress()
    indices = [s.meta.get("index") for s in new + rejected]
    index = max((i for i in indices if isinstance(i, int)), default=-1) + 1
    budget = int(n * isara.max_candidates_factor)

    def reject(sample, reason: str) -> None:
        sample.reject_reason = reason
        rejected.append(sample)
        progress.rejected += 1
        progress.reasons[reason] = progress.reasons.get(reason, 0) + 1

    while len(new) < n and index < budget:
        # 1. in-context examples and prompts, from the pool as it stands at the pass start
        count = min(isara.batch_candidates, budget - index)
        candidates, prompts = [], []
        for i in range(index, index + count):
            rng = random.Random(f"{cfg.seed}:{i}")
            query = rng.randrange(len(pool))
            near = [s for s, _ in pool.search(pool.vector(query), isara.k)]
            tokens = None
            while near:
                tokens = generator.tokenize(build_isara_prompt(generator.chat_prompt, shuffled(near, rng)))
                if len(tokens) <= room:
                    break
                near = near[:-1]  # drop the farthest neighbour until the prompt fits
            if not near:
                raise UserError(f"a single seed example does not fit n_ctx {generator.n_ctx_seq}; raise n_ctx")
            candidates.append(_Candidate(i, near))
            prompts.append(tokens)
        index += count

        # 2. both turns in one pass: the model writes a request, then answers it
        last_report = [0.0]

        def step(count: int) -> None:
            progress.tokens += count
            now = time.monotonic()
            if on_progress is not None and now - last_report[0] > 0.5:
                last_report[0] = now
                on_progress(progress)

        results = generator.run(
            prompts,
            max_tokens=[isara.max_prompt_tokens, isara.max_response_tokens],
            seeds=[derive_seed(cfg.seed, c.index) for c in candidates],
            then=then,
            on_step=step,
        )

        # 3. rules
        survivors = []
        for c, r in zip(candidates, results):
            parsed = parse_generation(r.texts[0], r.finish[0], r.texts[1], r.finish[1], markers)
            c.sample = Sample(
                parsed.prompt,
                parsed.response,
                source="generated",
                round=round_no,
                meta={"index": c.index, "examples": [_example_ref(e) for e in c.examples]},
            )
            reason = check_rules(parsed.prompt, parsed.response, c.examples, filters, markers.leak, parsed.problem)
            if reason:
                reject(c.sample, reason)
            else:
                survivors.append(c)
        if on_progress is not None:
            on_progress(progress)

        # 4. novelty against seeds and everything accepted (before spending a rating on it)
        if survivors:
            vectors = embedder.embed_samples([c.sample for c in survivors])
            sims = known.max_similarity(vectors)
            kept = []
            for c, v, sim in zip(survivors, vectors, sims):
                c.vector = v
                c.sample.scores["max_similarity"] = round(float(sim), 4)
                reason = check_novelty(float(sim), filters)
                if reason:
                    reject(c.sample, reason)
                else:
                    kept.append(c)
            survivors = kept

        # 5. self-assessment, then acceptance in index order (re-checking novelty against
        #    the samples accepted earlier in this same pass)
        if survivors and filters.rate:
            _rate(generator, [c.sample for c in survivors], seeds, filters, progress, on_progress)
        for c in survivors:
            reason = check_rating(c.sample.scores, filters) if filters.rate else None
            if reason is None and len(new) >= n:
                break  # enough: the rest are neither accepted nor rejected (a resume regenerates them)
            if reason is None:
                sim = float(known.max_similarity(c.vector[None, :])[0])
                c.sample.scores["max_similarity"] = round(max(sim, c.sample.scores["max_similarity"]), 4)
                reason = check_novelty(sim, filters)
            if reason:
                reject(c.sample, reason)
                continue
            new.append(c.sample)
            known.add([c.sample], c.vector[None, :])
            progress.accepted += 1
        if on_progress is not None:
            on_progress(progress)
        if samples_path is not None:
            write_samples(samples_path, new)
        if rejected_path is not None:
            write_samples(rejected_path, rejected)
    return new, rejected


def before_last_pass(accepted: list, rejected: list, batch: int) -> tuple[list, list]:
    """What a resume keeps: the samples of every pass but the last one recorded.

    The two files are rewritten one after the other at the end of each pass, so a kill
    between the writes leaves them a pass apart (the rejects of the last pass missing).
    Passes start at multiples of `batch` and regenerate identically, so the last one is
    simply run again.
    """
    indices = [s.meta.get("index") for s in accepted + rejected]
    last = max((i for i in indices if isinstance(i, int)), default=-1)
    start = last // batch * batch if last >= 0 else 0

    def keep(s) -> bool:
        return not isinstance(s.meta.get("index"), int) or s.meta["index"] < start

    return [s for s in accepted if keep(s)], [s for s in rejected if keep(s)]


def read_rejected(path: str | Path) -> list:
    """rejected.jsonl back as Samples. Not `read_samples`: a rejected sample may be empty."""
    from localalign.samples import Sample, iter_jsonl

    out = []
    for lineno, obj in iter_jsonl(path):
        try:
            out.append(
                Sample(
                    str(obj["prompt"]),
                    str(obj["response"]),
                    obj.get("source", "generated"),
                    obj.get("round"),
                    obj.get("system"),
                    dict(obj.get("scores", {})),
                    obj.get("reject_reason"),
                    dict(obj.get("meta", {})),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{lineno}: not a rejected sample ({e})") from None
    return out


def _seed_index(seeds, vectors, dim):
    from localalign.retrieve import SampleIndex

    index = SampleIndex(dim)
    index.add(seeds, vectors)
    return index


def _example_ref(sample) -> str:
    """A short, stable reference to an in-context example (for provenance in meta)."""
    return hashlib.sha256(f"{sample.prompt}\x00{sample.response}".encode()).hexdigest()[:12]


_RATING_FORMAT = re.compile(r" (10|[1-9]), Domain: (10|[1-9])")  # the language of filters.RATING_GRAMMAR


def _rate(generator: Generator, samples, seeds, filters, progress: Progress, on_progress) -> None:
    """Self-assessment: the same model scores each sample with the rubric (greedy)."""
    from localalign.filters import (
        RATING_DOMAIN_EXAMPLES,
        RATING_GRAMMAR,
        RUBRIC_ANSWER_START,
        parse_rating,
        rubric_message,
    )

    domain = [s.prompt for s in seeds[:RATING_DOMAIN_EXAMPLES]]
    prompts = []
    for s in samples:
        text = generator.chat_prompt([{"role": "user", "content": rubric_message(s.prompt, s.response, domain)}])
        prompts.append(generator.tokenize(text + RUBRIC_ANSWER_START))
    too_long = [len(p) >= generator.n_ctx_seq - 16 for p in prompts]
    fitting = [p for p, long in zip(prompts, too_long) if not long]
    def step(count: int) -> None:
        progress.tokens += count

    results = iter(
        generator.run(fitting, max_tokens=16, temperature=0, grammar=RATING_GRAMMAR, on_step=step) if fitting else []
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
    if on_progress is not None:
        on_progress(progress)
