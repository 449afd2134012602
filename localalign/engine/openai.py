"""The `openai` backend: generation through a server with an OpenAI-style /v1/completions
endpoint (llama.cpp's llama-server, vLLM, Ollama, llama-cpp-python's llama_cpp.server).

How the `openai` backend keeps prompts identical to the embedded one:
- Prompts are rendered here, from the local GGUF's chat template (`--model`, loaded
  vocab-only: no weights), and sent to the raw completions endpoint, never to
  /v1/chat/completions. ISARA prompts end mid-conversation (an opened user turn, then the
  assistant turn the model answers); a chat endpoint would close the turn itself.
- Tokens (prompt lengths, the context budget) come from the same local vocabulary. When the
  server can tokenize (llama-server /tokenize, llama_cpp.server /extras/tokenize) a probe
  string is compared once at start, so a server serving another model is refused.
- `run` takes token ids, as the embedded generator does; the server gets the text those ids
  were made from (remembered by `tokenize`), or the local detokenization of ids made
  otherwise.
- Requests go out `concurrency` at a time (threads): a server with continuous batching
  (llama-server -np N, vLLM, Ollama with OLLAMA_NUM_PARALLEL) decodes them together.
- Sampling: temperature, top_p, top_k and a seed per request; min_p 0 and repeat_penalty 1
  are sent explicitly because llama.cpp servers default to 0.05 and 1.1, which would make
  greedy decoding differ from the embedded backend. Sampled texts are reproducible per
  server, not equal to the embedded backend's (another sampler chain); greedy texts are.
- The self-rating sends `grammar` (llama.cpp servers honour it); a server that ignores it
  answers in free text, which the ISARA step reads and records.
- Multiple choice needs the log-probabilities of prompt tokens (`echo` with `logprobs`):
  vLLM and llama_cpp.server return them; llama-server and Ollama do not, and scoring then
  stops with one line saying so. A one-time probe checks that the values line up with the
  tokens (see `_check_prompt_logprobs`).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

from localalign.engine.base import (
    chat_template_of,
    BackendConfig,
    Completion,
    Decoding,
    GenerationConfig,
    GGUFText,
    Job,
    Leaf,
    TokenCounts,
    answer_seed,
    check_prompt,
    decoding,
)
from localalign.engine.runtime import load_llama
from localalign.errors import UserError

NO_PROMPT_LOGPROBS = (
    "{url} returns no prompt log-probabilities (echo with logprobs), which multiple-choice scoring "
    "(the truthfulness suite) needs: use --backend llama-cpp, or a vLLM or llama_cpp.server endpoint"
)


# ============================================================================ HTTP


class ServerHTTPError(UserError):
    """The server answered with an HTTP error status (it is there, but refused the request)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class OpenAIClient:
    """JSON over HTTP with retries; every failure the user can fix is one UserError line."""

    RETRY_STATUS = (408, 429, 500, 502, 503, 504)

    def __init__(self, config: BackendConfig):
        self.config = config
        self.root = config.base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise UserError(f"--api-key-env {config.api_key_env}: that environment variable is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def request(self, path: str, body: dict | None = None, retry: bool = True) -> dict:
        url = self.root + path
        data = json.dumps(body).encode() if body is not None else None
        attempts = self.config.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                req = urllib.request.Request(url, data=data, headers=self.headers, method="POST" if data else "GET")
                with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = one_line(e.read().decode("utf-8", "replace"))
                if e.code in self.RETRY_STATUS and not last:
                    self._sleep(attempt)
                    continue
                raise ServerHTTPError(f"{url}: HTTP {e.code} {e.reason}: {detail}", e.code) from None
            except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timeout
                if not last:
                    self._sleep(attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise UserError(f"cannot reach {url} ({one_line(str(reason))}) after {attempts} attempt(s); is the server running?") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise UserError(f"{url}: the reply is not JSON: {one_line(raw.decode('utf-8', 'replace'))}") from None
        if not isinstance(reply, dict):
            raise UserError(f"{url}: expected a JSON object, got {type(reply).__name__}")
        return reply

    def _sleep(self, attempt: int) -> None:
        # Jitter keeps many threads from retrying in lockstep against a recovering server.
        time.sleep(self.config.backoff_s * (2**attempt) * (0.5 + random.random() / 2))


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ============================================================================ the generator


class OpenAIGenerator(GGUFText):
    """Generation through an OpenAI-compatible completions endpoint (see the module docstring)."""

    def __init__(self, gguf_path: str | Path, config: GenerationConfig, backend: BackendConfig):
        self.config = config
        self.backend = backend
        self.counts = TokenCounts()
        self.gguf_path = Path(gguf_path)
        self.llm = load_llama(gguf_path, vocab_only=True)
        self.template, self.family = chat_template_of(self.llm.metadata)
        self.n_ctx_seq = config.n_ctx
        self.client = OpenAIClient(backend)
        self.url = self.client.root + "/v1/completions"
        self.model_name = self._served_model()
        self._texts: OrderedDict[tuple, str] = OrderedDict()  # token ids -> the text they came from
        self._texts_lock = threading.Lock()
        self._logprobs_checked = False
        self._check_tokenizer()
        self._pool = ThreadPoolExecutor(backend.concurrency, thread_name_prefix="openai")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.llm.close()

    # ------------------------------------------------------------------ set-up checks

    def _served_model(self) -> str:
        """The request's model name: as configured (and listed by the server), or its first model.

        A single-model server (llama-server, llama_cpp.server) answers whatever name is asked
        for, so a name it does not list would silently get another model: refused.
        """
        try:
            reply = self.client.request("/v1/models")
        except ServerHTTPError:
            if not self.backend.served_model:
                raise
            reply = {}  # there, but no model list: trust the configured name
        data = reply.get("data")
        names = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m] if isinstance(data, list) else []
        wanted = self.backend.served_model
        if wanted is None:
            if not names:
                raise UserError(f"{self.client.root}/v1/models lists no model; pass the served model's name (--served-model)")
            return names[0]
        if names and wanted not in names:
            raise UserError(
                f"{self.client.root} does not serve {wanted!r} (it serves {', '.join(names[:5])}): serve {self.gguf_path} "
                "under that name (docs/scaling.md) and run the same command again"
            )
        return wanted

    def _check_tokenizer(self) -> None:
        """Refuse a server whose tokenizer differs from --model's (where it can tell us)."""
        # Plain text only: older llama-server versions cannot parse special tokens in /tokenize.
        probe = "Hello, world! 1234 naïve café"
        ours = self.tokenize_continuation(probe)
        for path, body, key in (
            ("/tokenize", {"content": probe, "add_special": False, "parse_special": True}, "tokens"),  # llama-server
            ("/extras/tokenize", {"input": probe}, "tokens"),  # llama_cpp.server (adds BOS if the model does)
            ("/tokenize", {"prompt": probe, "add_special_tokens": False}, "tokens"),  # vLLM
        ):
            try:
                reply = self.client.request(path, body, retry=False)
            except ServerHTTPError:
                continue  # this server has no such endpoint (or another request body)
            except UserError:
                continue  # an answer that is not JSON: no tokenizer to compare with
            theirs = reply.get(key)
            if not isinstance(theirs, list):
                continue
            theirs = [t["id"] if isinstance(t, dict) else t for t in theirs]
            if theirs in (ours, self.tokenize(probe)):
                return
            raise UserError(
                f"{self.client.root} tokenizes differently from {self.gguf_path}: pass the served model's GGUF as --model"
            )

    # ------------------------------------------------------------------ text <-> tokens

    def tokenize(self, text: str) -> list[int]:
        with self._texts_lock:  # one tokenizer, called from the request threads too
            return self._remember(super().tokenize(text), text)

    def tokenize_continuation(self, text: str) -> list[int]:
        with self._texts_lock:
            return self._remember(super().tokenize_continuation(text), text)

    def _reply_ids(self, text: str) -> list[int]:
        """A reply's tokens (not remembered: only prompts need their text back)."""
        with self._texts_lock:
            return super().tokenize_continuation(text)

    def _remember(self, ids: list[int], text: str) -> list[int]:
        """Keep `text` for `ids` (the caller holds the lock); the 4096 latest are kept."""
        self._texts[tuple(ids)] = text
        self._texts.move_to_end(tuple(ids))
        while len(self._texts) > 4096:
            self._texts.popitem(last=False)
        return ids

    def text_of(self, ids: Sequence[int]) -> str:
        """The text `ids` were tokenized from, or the local detokenization of them."""
        with self._texts_lock:
            text = self._texts.get(tuple(ids))
        if text is not None:
            return text
        bos = self.llm.token_bos()
        ids = list(ids[1:]) if ids and ids[0] == bos and self.llm._model.add_bos_token() else list(ids)
        with self._texts_lock:
            return self.llm._model.detokenize(ids, special=True).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ decoding

    def run_jobs(self, jobs, max_tokens=None, temperature=None, stop=None, then=None, grammar=None, on_done=None,
                 on_step=None, should_stop=None, prefix=()) -> None:
        """As BatchGenerator.run_jobs; each branch is one request for its first turn and one per answer
        (the server's own prompt cache, if it has one, is what saves re-reading), `concurrency`
        branches at a time. `prefix` is for the embedded backend's cache and is not needed here."""
        d = decoding(self.config, max_tokens, temperature, stop, then, grammar)
        if d.then is not None and d.stop:
            raise ValueError("a second turn follows an end token; with stop strings the server cannot tell which ended a turn")
        then_text = self.text_of(d.then) if d.then is not None else None
        sampling = {"temperature": d.temperature, "top_k": self.config.top_k, "top_p": self.config.top_p}
        if d.grammar is not None:
            sampling["grammar"] = d.grammar
        if d.stop:
            sampling["stop"] = list(d.stop)
        branches = ((number, job, b) for number, job in enumerate(jobs) for b in range(len(job.seeds)))
        in_flight: dict = {}
        try:
            while True:
                stopping = should_stop is not None and should_stop()
                while not stopping and len(in_flight) < self.backend.concurrency:
                    item = next(branches, None)
                    if item is None:
                        break
                    number, job, b = item
                    check_prompt(number, job.prompt, self.n_ctx_seq)
                    fut = self._pool.submit(self._branch, job, b, d, then_text, sampling)
                    in_flight[fut] = (number, b)
                if stopping or not in_flight:
                    return
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    number, b = in_flight.pop(fut)
                    for m, completion in enumerate(fut.result()):  # a failed request raises its UserError here
                        if on_step is not None:
                            on_step(completion.n_generated)
                        if on_done is not None:
                            on_done(Leaf(number, b, m), completion)
        finally:
            for fut in in_flight:
                fut.cancel()

    def _branch(self, job: Job, b: int, d: Decoding, then_text: str | None, sampling: dict) -> list[Completion]:
        """One branch of a job: its first turn, then (after an end token) each of its answers."""
        seed = job.seeds[b]
        first = self._complete_turn(self.text_of(job.prompt), d.budgets[0], seed, sampling, n_prompt=len(job.prompt))
        answers = job.answers if d.then is not None else 1
        if len(d.budgets) == 1:
            return [first]
        if first.finish[0] != "stop" or len(job.prompt) + first.n_generated + len(d.then) + 1 >= self.n_ctx_seq:
            why = "none" if first.finish[0] != "stop" else "length"
            return [_with_turn(first, "", why, [], 0) for _ in range(answers)]
        prompt = self.text_of(job.prompt) + first.texts[0] + then_text
        out = []
        for m in range(answers):
            second = self._complete_turn(prompt, d.budgets[1], seed if m == 0 else answer_seed(seed, m), sampling)
            out.append(_with_turn(first, second.texts[0], second.finish[0], second.tokens[0], second.n_generated))
        return out

    def _complete_turn(self, prompt: str, budget: int, seed: int, sampling: dict, n_prompt: int | None = None) -> Completion:
        choice, n = self._completion(self._body(prompt, budget, seed=seed, **sampling), n_prompt=n_prompt)
        text = choice["text"]
        return Completion([text], [choice["finish_reason"]], [self._reply_ids(text)], n)  # re-tokenized: servers return text

    def _body(self, prompt: str, max_tokens: int, seed: int = 0, temperature: float = 0.0, top_k: int = 1,
              **extra) -> dict:
        """A /v1/completions request; greedy unless told otherwise. min_p 0 and repeat_penalty 1
        are always sent: llama.cpp servers default to 0.05 and 1.1 (see the module docstring)."""
        return {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
                "temperature": temperature, "top_k": top_k, "min_p": 0.0, "repeat_penalty": 1.0, **extra}

    def _completion(self, body: dict, n_prompt: int | None = None) -> tuple[dict, int]:
        """POST /v1/completions; the first choice (text, finish_reason) and tokens generated.

        `n_prompt`: the prompt's length in local tokens. A server that counts more wrapped the
        prompt in a template of its own (Ollama's /v1/completions does, unless the model's
        TEMPLATE is just the prompt); fewer can be prompt caching, and is not an error.
        """
        reply = self.client.request("/v1/completions", body)
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        counted = usage.get("prompt_tokens")
        if n_prompt is not None and isinstance(counted, int) and counted > n_prompt:
            raise UserError(
                f"{self.url} read {counted} prompt tokens where {self.gguf_path.name} gives {n_prompt}: the server "
                "wraps prompts in a template of its own (Ollama: serve a model whose TEMPLATE is {{ .Prompt }}, docs/scaling.md)"
            )
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{self.url}: the reply has no choices: {one_line(json.dumps(reply))}")
        choice = choices[0]
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            raise UserError(f"{self.url}: the reply's choice has no text: {one_line(json.dumps(choice))}")
        # "length" is the only finish that matters (cut at max_tokens or the context);
        # servers name the others "stop", "eos" or null.
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        n = usage.get("completion_tokens")
        if not isinstance(n, int):
            n = len(self._reply_ids(choice["text"]))
        with self._texts_lock:  # request threads count here too
            self.counts.read += counted if isinstance(counted, int) else 0
            self.counts.written += n
        return {**choice, "finish_reason": finish}, n

    # ------------------------------------------------------------------ multiple choice

    def score_continuations(self, prompt: str, continuations: Sequence[str]) -> list[float]:
        """Sum of log p(continuation | prompt) from the server's prompt log-probabilities."""
        if not self._logprobs_checked:
            self._check_prompt_logprobs()
            self._logprobs_checked = True
        return list(self._pool.map(lambda c: self._continuation_logprob(prompt, c), continuations))

    def _prompt_logprobs(self, text: str) -> tuple[list[str], list]:
        """Token strings and log-probabilities of `text` as a prompt (echo), one token generated."""
        choice, _ = self._completion(self._body(text, 1, echo=True, logprobs=1))
        lp = choice.get("logprobs")
        if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list) or not isinstance(lp.get("tokens"), list):
            raise UserError(NO_PROMPT_LOGPROBS.format(url=self.url))
        return lp["tokens"], lp["token_logprobs"]

    def _tail(self, text: str, continuation_ids: list[int], continuation: str) -> list[float] | None:
        """The log-probabilities of the continuation tokens at the end of `text`'s echo, or None."""
        tokens, logprobs = self._prompt_logprobs(text)
        n = len(continuation_ids)
        # The generated token may or may not be listed after the prompt (llama_cpp.server
        # leaves out an end token): try both placements, the continuation must read back.
        for end in (len(tokens) - 1, len(tokens)):
            start = end - n
            if start < 1 or end > len(logprobs):
                continue
            window = logprobs[start:end]
            if "".join(map(str, tokens[start:end])) == continuation and all(isinstance(v, (int, float)) for v in window):
                return [float(v) for v in window]
        return None

    def _continuation_logprob(self, prompt: str, continuation: str) -> float:
        ids = self.tokenize_continuation(continuation)
        if not ids:
            raise ValueError("empty continuation")
        if len(self.tokenize(prompt)) + len(ids) >= self.n_ctx_seq:
            raise UserError(f"a multiple-choice item needs more than the {self.n_ctx_seq}-token context")
        window = self._tail(prompt + continuation, ids, continuation)
        if window is None:
            raise UserError(
                f"{self.url}: the prompt log-probabilities do not line up with the answer's tokens "
                f"({continuation[:40]!r}); multiple-choice scoring needs them token for token"
            )
        return sum(window)

    def _check_prompt_logprobs(self) -> None:
        """Once: are the echoed log-probabilities those of the tokens they are listed with?

        Greedy decoding picks the most likely next token g; echoed back as part of a prompt,
        g's log-probability must be the highest of its position (its top_logprobs entry). A
        server that pairs each token with the wrong position (llama_cpp.server 0.3.x does,
        for prompts not starting with the BOS token) fails this.
        """
        for probe in (self.chat_prompt([{"role": "user", "content": "Name a colour."}]), "The capital of France is"):
            choice, _ = self._completion(self._body(probe, 1))
            g = choice["text"]
            ids = self.tokenize_continuation(g) if g else []
            if len(ids) != 1 or self.tokenize(probe + g) != self.tokenize(probe) + ids:
                continue  # an end token or a token that merges with the probe: try the other probe
            try:
                reply_choice, _ = self._completion(self._body(probe + g, 1, echo=True, logprobs=1))
            except UserError as e:  # llama-server: HTTP 500 "Only no echo is supported"
                raise UserError(f"{NO_PROMPT_LOGPROBS.format(url=self.url)} ({e})") from None
            lp = reply_choice.get("logprobs")
            lists = isinstance(lp, dict) and all(isinstance(lp.get(k), list) for k in ("tokens", "token_logprobs", "top_logprobs"))
            if not lists or len(lp["tokens"]) <= 1:  # no logprobs, or those of the generated token only (echo ignored)
                raise UserError(NO_PROMPT_LOGPROBS.format(url=self.url))
            for end in (len(lp["tokens"]) - 1, len(lp["tokens"])):
                k = end - 1
                if k < 1 or lp["tokens"][k] != g:
                    continue
                top, value = lp["top_logprobs"][k], lp["token_logprobs"][k]
                if isinstance(top, dict) and top and isinstance(value, (int, float)) and value >= max(top.values()) - 1e-4:
                    return
            raise UserError(
                f"{self.url}: the echoed log-probabilities are not those of their tokens (a greedy token is not the "
                "most likely at its own position); multiple-choice scoring would be wrong: use --backend llama-cpp or vLLM"
            )


def _with_turn(first: Completion, text: str, finish: str, tokens: list[int], n: int) -> Completion:
    """`first`'s first turn followed by a second one."""
    return Completion(first.texts + [text], first.finish + [finish], first.tokens + [tokens], first.n_generated + n)
