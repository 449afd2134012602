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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from localalign.engine.base import Completion, GenerationConfig, GGUFText, run_settings
from localalign.engine.runtime import default_threads, llama_cpp, load_llama
from localalign.errors import UserError


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
