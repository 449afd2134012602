"""What every generation backend shares: its settings, its interface and its results.

The embedded backend decodes with llama.cpp (llamacpp.BatchGenerator), the other asks an
OpenAI-compatible server (openai.OpenAIGenerator); `select.open_generator` picks one and runs
it in an engine process of its own (process.ProcessGenerator). All satisfy `Generator` and
build `run` and `complete` on `run_jobs` the same way (`Decoder`); the two backends tokenize and
template prompts with the same GGUF (`GGUFText`) and complete `run`'s arguments the same way
(`decoding`), so a prompt is the same text and the same tokens whichever backend decodes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from localalign.chat import render_conversation
from localalign.errors import UserError
from localalign.families import Family, find_gguf_family

if TYPE_CHECKING:
    from llama_cpp import Llama

BACKENDS = ("llama-cpp", "openai")
# llama.cpp holds at most 256 sequences in one context (LLAMA_MAX_SEQ; 257 is refused), and the
# embedded generator keeps one of them for the prompt prefix its slots copy.
MAX_PARALLEL = 255
# "auto" without a GPU: on a Q8_0 model llama.cpp's batched kernels keep gaining up to 32 here
# (2 cores, SmolLM2-135M, 32 prompts x 128 tokens: 111 tokens/s with 8, 144 with 16, 159 with 32:
# bench/bench_generate.py --sweep, docs/benchmarks.md).
CPU_PARALLEL = 32
# "auto" on a GPU: the share of its free memory (after the weights are loaded) that the KV caches
# may take, less what llama.cpp's compute buffers need (logits and attention scores of one batch).
GPU_KV_SHARE = 0.8
GPU_COMPUTE_RESERVE = 1 << 30


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
    # Sequences decoded together, 1..255 or "auto": CPU_PARALLEL on a CPU; with llama.cpp
    # offloading to a GPU, as many as their KV caches (n_ctx each) fit in its free memory
    # (`auto_parallel`), up to 255. A GPU's batched decoding is nearly free per extra sequence.
    parallel: int | str = "auto"
    n_batch: int = 512  # tokens per llama_decode while reading prompts; at least parallel + 1
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
            (self.parallel == "auto" or (type(self.parallel) is int and 1 <= self.parallel <= MAX_PARALLEL),
             f"parallel must be 'auto' or in 1..{MAX_PARALLEL}, got {self.parallel!r}"),
            (self.n_batch >= 1, f"n_batch must be >= 1, got {self.n_batch}"),
            # llama.cpp sizes a context's outputs by n_batch and aborts (no error) below n_seq_max
            (not isinstance(self.parallel, int) or self.n_batch > self.parallel,
             f"n_batch ({self.n_batch}) must exceed parallel ({self.parallel}): each decode holds a token of every sequence"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def kv_bytes_per_sequence(n_ctx: int, n_layer: int, n_head_kv: int, key_dim: int, value_dim: int,
                          bytes_per_value: int = 2) -> int:
    """The KV cache of one sequence of `n_ctx` tokens (llama.cpp's default cache type is f16)."""
    return n_ctx * n_layer * n_head_kv * (key_dim + value_dim) * bytes_per_value


def auto_parallel(gpu_free: int | None, per_sequence: int, n_batch: int, cap: int = MAX_PARALLEL) -> int:
    """`parallel = "auto"`: CPU_PARALLEL without a GPU (`gpu_free` None); on one, as many sequences
    as fit GPU_KV_SHARE of its free bytes less GPU_COMPUTE_RESERVE, counting the prefix sequence,
    at most `cap` and n_batch - 1."""
    if gpu_free is None:
        return min(CPU_PARALLEL, n_batch - 1)
    fits = (int(gpu_free * GPU_KV_SHARE) - GPU_COMPUTE_RESERVE) // max(1, per_sequence) - 1
    return max(1, min(cap, n_batch - 1, fits))


def derive_seed(seed: int, index: int | str) -> int:
    """A 32-bit sampler seed for item `index` of a run seeded with `seed` (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    return value if value != 0xFFFFFFFF else 0  # 0xFFFFFFFF means "random" to llama.cpp


def answer_seed(branch_seed: int, answer: int) -> int:
    """The sampler seed of answer `answer` >= 1 of a branch (answer 0 keeps the branch's own sampler)."""
    return derive_seed(branch_seed, f"answer-{answer}")


@dataclass(frozen=True)
class Job:
    """One prompt, read once and continued by several samplers.

    Each seed starts a branch: every branch continues the prompt's KV cache (copied, not
    decoded again), so a prompt shared by B candidates costs its tokens once. With a second
    turn (`run_jobs(then=...)`), each branch's first turn is answered `answers` times from the
    branch's own cache: answer 0 with the branch's sampler, answer m with `answer_seed`.
    A job of one seed and one answer is one plain completion.
    """

    prompt: list[int]
    seeds: tuple[int, ...]
    answers: int = 1

    @property
    def sequences(self) -> int:
        """Decoding slots the job holds at its widest."""
        return len(self.seeds) * self.answers


@dataclass(frozen=True)
class Leaf:
    """Where a completion of `run_jobs` comes from: the job's place in the stream, its branch, its answer."""

    job: int
    branch: int
    answer: int


@dataclass
class Completion:
    """What one prompt produced: a text per turn, and why each turn ended."""

    texts: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)  # "stop" (end token or stop string) or "length"
    tokens: list[list[int]] = field(default_factory=list)  # the sampled ids, per turn
    n_generated: int = 0



@dataclass
class TokenCounts:
    """Tokens a backend has put through the model: `read` from prompts (and the `then` text), `written` sampled."""

    read: int = 0
    written: int = 0


class Decoder:
    """What every generator builds on its `run_jobs` and `tokenize`: `run`, `complete`, and being
    a context manager around its `close`. Backends in this process (GGUFText below) and the
    proxy of one in its own process (process.ProcessGenerator) share it."""

    config: GenerationConfig
    counts: TokenCounts

    def close(self) -> None:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def run_jobs(self, jobs: Iterable[Job], max_tokens: int | Sequence[int] | None = None,
                 temperature: float | None = None, stop: Sequence[str] | None = None, then: list[int] | None = None,
                 grammar: str | None = None, on_done: Callable[[Leaf, Completion], None] | None = None,
                 on_step: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 prefix: Sequence[int] = ()) -> None:
        raise NotImplementedError

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
        """Complete every prompt once (prompt i samples with seeds[i], by default
        derive_seed(config.seed, i)); completions in input order. `run_jobs` in its simplest use."""
        seeds = list(seeds) if seeds is not None else [derive_seed(self.config.seed, i) for i in range(len(prompt_tokens))]
        if len(seeds) != len(prompt_tokens):
            raise ValueError("one seed per prompt")
        results: list[Completion] = [Completion() for _ in prompt_tokens]

        def done(leaf: Leaf, completion: Completion) -> None:
            results[leaf.job] = completion
            if on_done is not None:
                on_done(leaf.job, completion)

        jobs = [Job(list(p), (s,)) for p, s in zip(prompt_tokens, seeds)]
        self.run_jobs(jobs, max_tokens, temperature, stop, then, grammar, on_done=done, on_step=on_step,
                      prefix=shared_prefix(prompt_tokens))
        return results

    def complete(self, prompts: list[str], max_tokens: int | None = None, temperature: float | None = None,
                 stop: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[str]:
        """Complete each prompt (already chat-templated text); texts in input order."""
        results = self.run([self.tokenize(p) for p in prompts], max_tokens, temperature, stop, seeds)
        return [r.texts[0] for r in results]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GGUFText(Decoder):
    """Tokens and chat template from a GGUF loaded in llama-cpp-python in this process
    (`self.llm`; a vocab-only load is enough). Shared by every backend, so a prompt is the same
    text and the same tokens whichever backend decodes it."""

    llm: Llama
    template: str
    family: Family | None  # from the GGUF's general.architecture; None for a family not in the table

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text`, special tokens parsed, BOS added if the model wants one and the text
        does not write it itself (a chat template that opens with {{ bos_token }})."""
        bos = self.llm.token_bos()
        writes_bos = bos >= 0 and text.startswith(self.llm._model.token_get_text(bos))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not writes_bos, special=True)

    def tokenize_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence (no BOS)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        """`messages` in the GGUF's own chat template, ending where the assistant speaks, rendered
        as the trainer renders them (the family's template variables, its system-role rule)."""
        bos = self.llm._model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = self.llm._model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        return render_conversation(self.template, messages, self.family, {"bos_token": bos, "eos_token": eos})


def chat_template_of(metadata: dict) -> tuple[str, Family | None]:
    """The chat template a GGUF is prompted with and its family: the GGUF's own template, else
    (a base model's GGUF) its family's (families.py), else ""."""
    family = find_gguf_family(metadata.get("general.architecture"))
    template = metadata.get("tokenizer.chat_template") or ""
    if not template and family is not None and family.fallback_template:
        template = family.fallback_template
    return template, family


def turn_budgets(max_tokens: int | Sequence[int] | None, n_turns: int, default: int) -> list[int]:
    """`max_tokens` of `run` as one budget per turn."""
    if max_tokens is None:
        return [default] * n_turns
    if isinstance(max_tokens, int):
        return [max_tokens] * n_turns
    return list(max_tokens)


@dataclass(frozen=True)
class Decoding:
    """`run_jobs`'s settings, checked and completed from the config."""

    budgets: list[int]  # tokens per turn
    temperature: float
    stop: list[str]
    then: list[int] | None  # tokens that open the second turn
    grammar: str | None


def decoding(cfg: GenerationConfig, max_tokens, temperature, stop, then, grammar) -> Decoding:
    budgets = turn_budgets(max_tokens, 2 if then is not None else 1, cfg.max_tokens)
    temperature = cfg.temperature if temperature is None else temperature
    return Decoding(budgets, temperature, [s for s in (stop or []) if s], then, grammar)


def check_prompt(job: int, tokens: Sequence[int], n_ctx_seq: int) -> None:
    if len(tokens) == 0:
        raise UserError(f"prompt {job} is empty")
    if len(tokens) >= n_ctx_seq:
        raise UserError(f"prompt {job} has {len(tokens)} tokens; the context holds {n_ctx_seq} per sequence (raise n_ctx)")


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest common token prefix, leaving each prompt at least one token of its own
    (a sequence samples from the logits of its own last token)."""
    if len(prompts) < 2:
        return []
    shortest = min(len(p) for p in prompts)
    n = 0
    first = prompts[0]
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return list(first[:n])


@dataclass
class BackendConfig:
    """Where text is generated. `kind` and `served_model` decide what a run produces; the
    rest is how to reach the server (compare=False: a run resumed against the same model
    at another address, or with other timeouts, is the same run)."""

    kind: str = "llama-cpp"  # "llama-cpp" (embedded) or "openai" (a server at base_url)
    base_url: str | None = field(default=None, compare=False)  # e.g. http://127.0.0.1:8080 (a trailing /v1 is accepted)
    # The NAME of an environment variable holding the API key, never the key: the config is
    # written into the run directory.
    api_key_env: str | None = field(default=None, compare=False)
    # The request's "model" field. None: the first model the server lists (/v1/models).
    # In `align`, "{name}" is replaced by the stage's model ("base", "round-1", ...) so a
    # server can serve each round under its own name (docs/scaling.md).
    served_model: str | None = None
    # Requests in flight. A server with continuous batching decodes them together; one
    # without (llama_cpp.server) queues them, and more than a few only adds waiting.
    # Results do not depend on it: every request carries its own seed.
    concurrency: int = field(default=8, compare=False)
    timeout_s: float = field(default=600.0, compare=False)  # per request: a 512-token reply from a busy CPU server takes minutes
    # Connection errors, timeouts, 429 and 5xx are retried after backoff_s, 2x, 4x, ...
    retries: int = field(default=3, compare=False)
    backoff_s: float = field(default=1.0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {self.kind!r}")
        if self.kind == "openai" and not self.base_url:
            raise UserError("--backend openai needs --base-url URL (e.g. http://127.0.0.1:8080)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"base URL must start with http:// or https://, got {self.base_url!r}")
        if not 1 <= self.concurrency <= 256:
            raise UserError(f"concurrency must be in 1..256, got {self.concurrency}")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise UserError("timeout_s must be > 0, retries and backoff_s >= 0")

    def for_model(self, name: str) -> "BackendConfig":
        """This config for the stage whose model is `name` ("base", "round-1", ...) in `align`."""
        if self.kind != "openai":
            return self
        if self.served_model and "{name}" in self.served_model:
            return BackendConfig(**{**self.__dict__, "served_model": self.served_model.replace("{name}", name)})
        if name != "base":
            raise UserError(
                f"the server serves one model, but {name} is a trained model: set backend.served_model to a "
                "pattern with {name} (e.g. 'localalign-{name}') and serve each round under its name (docs/scaling.md)"
            )
        return self


class Generator(Protocol):
    """What a backend offers: tokens, the model's chat template, and decoding."""

    config: GenerationConfig
    n_ctx_seq: int  # tokens one sequence (prompt + completion) may use

    def tokenize(self, text: str) -> list[int]: ...
    def tokenize_continuation(self, text: str) -> list[int]: ...
    def chat_prompt(self, messages: list[dict]) -> str: ...
    def complete(self, prompts: list[str], max_tokens: int | None = None, temperature: float | None = None,
                 stop: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[str]: ...
    def run_jobs(self, jobs: Iterable[Job], max_tokens: int | Sequence[int] | None = None,
                 temperature: float | None = None, stop: Sequence[str] | None = None, then: list[int] | None = None,
                 grammar: str | None = None, on_done: Callable[[Leaf, Completion], None] | None = None,
                 on_step: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 prefix: Sequence[int] = ()) -> None: ...
    def run(self, prompt_tokens: list[list[int]], max_tokens: int | Sequence[int] | None = None,
            temperature: float | None = None, stop: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
            then: list[int] | None = None, on_done: Callable[[int, Completion], None] | None = None,
            grammar: str | None = None, on_step: Callable[[int], None] | None = None) -> list[Completion]: ...
    def score_continuations(self, prompt: str, continuations: Sequence[str]) -> list[float]: ...
    def close(self) -> None: ...
    def __enter__(self): ...
    def __exit__(self, *exc) -> None: ...

