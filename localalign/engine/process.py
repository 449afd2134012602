"""llama.cpp in a process of its own: the generator and the parity probe, behind one pipe.

Why. A CUDA llama.cpp and torch's CUDA libraries crashed when they shared a process (two
copies of cuBLAS/cudart: SIGSEGV at model load once `import torch` had run, `free(): invalid
pointer` when torch started CUDA after llama_cpp's import). Ollama runs llama.cpp as a child
process and TRL runs vLLM as a server beside the trainer; here the engine runs in a child
started with multiprocessing's `spawn` (a fresh interpreter: nothing of the parent's torch
comes along) that imports none of `NEVER_IN_ENGINE`. A crash there is an error the parent
reports (`EngineCrashed`, naming the signal and what the engine was doing), not the end of it.

The channel: one duplex Pipe, strictly turn-taking (one side speaks, the other waits for it),
so neither side ever reads a message it did not expect. Five small messages:

    parent -> child   Call(op, args)         run `op` of the hosted engine
                      Answer(value)          the answer to the child's Ask
    child -> parent   Result(value, counts)  a Call's return value, and the engine's TokenCounts
                      Failure(kind, text)    a Call's exception: a UserError or ValueError by its
                                             message, anything else (a bug) with its traceback
                      Ask(what, events)      only inside run_jobs, see below

`run_jobs` decodes in the child with the engine's own loop. Where that loop calls
should_stop() or next(jobs), the child sends Ask("should_stop" | "next_job", events), the
events being the on_step/on_done callbacks due since the last Ask, in the order the engine
made them: ("step", n) and ("done", Leaf, Completion). The parent runs those callbacks, then
answers (its should_stop(), or next(jobs), a Job or None). While it works out the answer it
may Call the child (the ISARA step's job iterator tokenizes, on_done may call anything): the
child, waiting for its Answer, serves those Calls first. So the job iterator stays lazy,
callbacks fire between decodes as they do in-process, and the engine runs the very code it
runs in-process, with the same seeds: the same texts, token for token.

Two hosts: "generator" (llamacpp.BatchGenerator, or openai.OpenAIGenerator, which loads the
GGUF's vocabulary for its tokens and template), behind `ProcessGenerator`, which
`select.open_generator` returns; and "probe" (a GGUF with logits at every position, for the
parity check), behind `Probe` (`open_probe`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from localalign.engine.base import BackendConfig, Completion, Decoder, GenerationConfig, Job, Leaf, TokenCounts
from localalign.engine.build import setup_fix
from localalign.errors import UserError
from localalign.fsutil import fault_point

# Never loaded in the engine process: torch's CUDA libraries beside a CUDA llama.cpp crash.
NEVER_IN_ENGINE = ("torch", "transformers", "sentence_transformers", "peft")
# The parity check compares a few chat prompts of up to ~200 tokens; logits for every position
# cost n_ctx x vocabulary floats (512 x 49k x 4 bytes = 100 MB for SmolLM2).
PROBE_N_CTX = 512
# What the engine was doing, for the message of a crash (by the outermost call in flight).
DOING = {"run_jobs": "decoding", "score_continuations": "scoring continuations", "logits": "computing logits"}


# ============================================================================ the messages


class Call(NamedTuple):
    op: str
    args: tuple


class Answer(NamedTuple):
    value: Any


class Result(NamedTuple):
    value: Any
    counts: tuple[int, int]  # TokenCounts.read, .written after the call


class Failure(NamedTuple):
    kind: str  # "UserError", "ValueError" or "bug"
    text: str  # the message; for a bug, the engine process's traceback


class Ask(NamedTuple):
    what: str  # "should_stop", "next_job", or "flush" (the last events of a run_jobs that raised)
    events: tuple  # ("step", n) and ("done", Leaf, Completion), in the order they happened


def _remote_error(failure: Failure) -> Exception:
    if failure.kind == "UserError":
        return UserError(failure.text)
    if failure.kind == "ValueError":
        return ValueError(failure.text)
    return RuntimeError(f"the engine process raised:\n{failure.text}")


# ============================================================================ a crash


class EngineCrashed(UserError):
    """The engine process ended (a signal, or an exit) while it was working."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name

    def during(self, stage: str) -> EngineCrashed:
        """The same error, its message opened by the stage it ended (align's stages)."""
        return EngineCrashed(f"[{stage}] {self}", self.signal_name)


def crash_error(exitcode: int, pid: int, model: str, doing: str) -> EngineCrashed:
    """The one line a crash of the engine process becomes: the signal (or exit code), what it
    was doing, and what to do; for SIGILL, the command that rebuilds llama.cpp for this CPU."""
    name = None
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
    how = f"was killed by {name}" if name else f"exited with code {exitcode}"
    message = f"the llama.cpp engine process (pid {pid}, {model}) {how} while {doing}"
    if name == "SIGILL":
        message += (f": this llama.cpp build uses an instruction this CPU lacks; rebuild it for this machine "
                    f"({setup_fix()}), then run the same command again: finished work is kept")
    else:
        if name == "SIGKILL":
            message += " (the kernel's out-of-memory killer sends SIGKILL)"
        message += "; finished work is kept: run the same command again to resume"
    return EngineCrashed(message, name)


# ============================================================================ the parent's end


class EngineProcess:
    """One engine process seen from the parent: start it, call it, notice when it dies, end it."""

    def __init__(self, host: str, args: tuple, what: str):
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe(duplex=True)
        self._proc = context.Process(target=_engine_main, args=(child_end, host, args), daemon=True,
                                     name=f"localalign-engine ({what})")
        with _interrupts_ignored():  # inherited from the child's first instruction on: Ctrl-C is the parent's
            self._proc.start()
        child_end.close()  # the child now holds the only other end: its death is EOF here
        self.pid = self._proc.pid
        self.what = what
        self.counts = TokenCounts()
        # Calls sent whose Result or Failure has not come back; the first reply answers the start.
        self._unanswered = 1
        self._doing: str | None = "loading it"
        try:
            self.info: dict = self._reply(None)
        except BaseException:  # it could not load, or an interrupt came first: no process left behind
            self.close()
            raise
        finally:
            self._doing = None

    def call(self, op: str, *args, answer: Callable[[Ask], Any] | None = None) -> Any:
        """`op(*args)` in the engine process; `answer` answers its Asks (run_jobs)."""
        outermost = self._doing is None
        if outermost:
            self._doing = DOING.get(op, op.replace("_", " "))
        try:
            self._send(Call(op, args))
            self._unanswered += 1
            return self._reply(answer)
        finally:
            if outermost:
                self._doing = None

    def heavy_modules(self) -> list[str]:
        """The modules of NEVER_IN_ENGINE the engine process has loaded (none, ever)."""
        return self.call("heavy_modules")

    def _reply(self, answer: Callable[[Ask], Any] | None) -> Any:
        while True:
            message = self._recv()
            if isinstance(message, Ask):
                self._send(Answer(answer(message)))  # answering may Call the child: it serves that first
                continue
            self._unanswered -= 1
            if isinstance(message, Failure):
                raise _remote_error(message)
            self.counts.read, self.counts.written = message.counts
            return message.value

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise self._crashed() from None

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._crashed() from None

    def _crashed(self) -> EngineCrashed:
        self._proc.join(timeout=30)
        if self._proc.exitcode is None:  # the channel broke under a live process: end it
            self._proc.kill()
            self._proc.join()
        return crash_error(self._proc.exitcode, self.pid, self.what, self._doing or "idle")

    def close(self) -> None:
        """End the engine process: asked to close when the channel is at rest, killed otherwise
        (a call left unanswered by an interrupt: what it was doing is unknown)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if self._unanswered == 0 and proc.exitcode is None:
                self._conn.send(Call("close", ()))
                self._conn.recv()
                proc.join(timeout=30)
        except (OSError, EOFError):
            pass  # it died meanwhile: nothing left to close
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
            self._conn.close()


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT ignored while the engine process is started, so that it starts ignoring it (a
    Ctrl-C reaches the whole process group; the parent handles it and ends the engine)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the engine process then ignores it itself
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ProcessGenerator(Decoder):
    """A `Generator` whose engine (BatchGenerator, or OpenAIGenerator for `backend.kind` openai)
    runs in an engine process of its own; see the module docstring."""

    def __init__(self, gguf_path: str | Path, config: GenerationConfig, backend: BackendConfig | None = None,
                 lora_path: str | Path | None = None):
        self.config = config
        self.gguf_path = Path(gguf_path)
        backend = backend or BackendConfig()
        lora = str(lora_path) if lora_path and backend.kind == "llama-cpp" else None
        self.engine = EngineProcess("generator", (str(gguf_path), config, backend, lora), self.gguf_path.name)
        self.counts = self.engine.counts
        self.pid = self.engine.pid
        self.n_ctx_seq: int = self.engine.info["n_ctx_seq"]
        self.template: str = self.engine.info["template"]
        self.parallel: int = self.engine.info["parallel"]

    def close(self) -> None:
        self.engine.close()

    def tokenize(self, text: str) -> list[int]:
        return self.engine.call("tokenize", text)

    def tokenize_continuation(self, text: str) -> list[int]:
        return self.engine.call("tokenize_continuation", text)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.engine.call("chat_prompt", messages)

    def score_continuations(self, prompt: str, continuations: Sequence[str]) -> list[float]:
        return self.engine.call("score_continuations", prompt, list(continuations))

    def run_jobs(self, jobs: Iterable[Job], max_tokens: int | Sequence[int] | None = None,
                 temperature: float | None = None, stop: Sequence[str] | None = None, then: list[int] | None = None,
                 grammar: str | None = None, on_done: Callable[[Leaf, Completion], None] | None = None,
                 on_step: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 prefix: Sequence[int] = ()) -> None:
        """BatchGenerator.run_jobs (see there), decoded in the engine process; `jobs` is pulled here,
        lazily, and the callbacks run here. An exception in one of them (or in the iterator) stops
        the decoding at its next step and is raised once the engine has let go of the run."""
        settings = {"max_tokens": max_tokens, "temperature": temperature, "stop": list(stop) if stop else stop,
                    "then": list(then) if then is not None else None, "grammar": grammar, "prefix": list(prefix)}
        stream = iter(jobs)
        failed: list[Exception] = []

        def answer(ask: Ask) -> Any:
            if failed:
                return True if ask.what == "should_stop" else None
            try:
                for event in ask.events:
                    if event[0] == "step":
                        on_step(event[1])
                    else:
                        on_done(event[1], event[2])
                if ask.what == "should_stop":
                    return bool(should_stop()) if should_stop is not None else False
                return next(stream, None) if ask.what == "next_job" else None
            except Exception as e:  # stop decoding at the next step, then raise it
                failed.append(e)
                return True if ask.what == "should_stop" else None

        try:
            self.engine.call("run_jobs", settings, on_step is not None, on_done is not None, answer=answer)
        except Exception:
            if failed:
                raise failed[0] from None
            raise
        if failed:
            raise failed[0]


class Probe:
    """A GGUF (optionally with a LoRA adapter) in an engine process, with logits for every
    position: what the parity check asks of llama.cpp. A context manager; `open_probe` makes one."""

    def __init__(self, gguf: str | Path, lora: str | Path | None = None, n_ctx: int = PROBE_N_CTX,
                 threads: int | None = None):
        what = Path(gguf).name + (f" with {Path(lora).name}" if lora else "")
        self.engine = EngineProcess("probe", (str(gguf), str(lora) if lora else None, n_ctx, threads), what)
        self.n_ctx: int = self.engine.info["n_ctx"]
        self.n_vocab: int = self.engine.info["n_vocab"]

    def metadata(self) -> dict[str, str]:
        """The GGUF's key/values as llama-cpp-python exposes them (`Llama.metadata`: strings)."""
        return self.engine.call("metadata")

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """llama.cpp's tokens of `text` (`add_bos`: the special tokens the vocabulary asks for)."""
        return self.engine.call("tokenize", text, add_bos, special)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits at every position of `ids` (len(ids) x n_vocab), from an empty cache."""
        return self.engine.call("logits", list(ids))

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation in llama.cpp (end of turn, end of text, ...)."""
        return self.engine.call("is_eog", int(token))

    def token_eos(self) -> int:
        return self.engine.call("token_eos")

    def token_bos(self) -> int:
        return self.engine.call("token_bos")

    def apply_chat_template(self, template: str | None, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str | None:
        """`messages` rendered by llama.cpp's own chat-template code (`llama_chat_apply_template`),
        with `template` (None: the GGUF's tokenizer.chat_template); None where llama.cpp does not
        recognise the template (it matches known templates, it runs no Jinja)."""
        return self.engine.call("apply_chat_template", template, messages, add_generation_prompt)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_probe(gguf: str | Path, lora: str | Path | None = None, n_ctx: int = PROBE_N_CTX,
               threads: int | None = None) -> Probe:
    """`gguf` (with the GGUF LoRA adapter `lora`) loaded in an engine process for probing:
    `with open_probe(path) as probe: probe.logits(probe.tokenize(text))`."""
    return Probe(gguf, lora, n_ctx, threads)


# ============================================================================ the engine process


def _engine_main(conn, host: str, args: tuple) -> None:
    """The engine process: open the engine, then serve the parent until it says close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as inherited, unless started from another thread
    server = _Server(conn)
    try:
        server.reply(lambda: server.open(host, args))
        if server.engine is not None:
            server.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: so is the reason to run
    finally:
        if server.engine is not None:
            server.engine.close()


class _Server:
    """The engine process's end: the engine, the calls it answers, and run_jobs' side of the turns."""

    def __init__(self, conn):
        self.conn = conn
        self.engine = None
        self.ops: tuple[str, ...] = ()
        self.running = False

    def open(self, host: str, args: tuple) -> dict:
        if host == "generator":
            self.engine, self.ops, info = _open_generator(*args)
        else:
            self.engine = _ProbeModel(*args)
            self.ops, info = _ProbeModel.OPS, {"n_ctx": self.engine.llm.n_ctx(), "n_vocab": self.engine.llm.n_vocab()}
        return info

    def counts(self) -> tuple[int, int]:
        counts = getattr(self.engine, "counts", None)
        return (counts.read, counts.written) if counts is not None else (0, 0)

    def reply(self, work: Callable[[], Any]) -> None:
        """Send `work()`'s Result, or its exception as a Failure."""
        try:
            value = work()
        except UserError as e:
            self.conn.send(Failure("UserError", str(e)))
        except ValueError as e:
            self.conn.send(Failure("ValueError", str(e)))
        except Exception:
            self.conn.send(Failure("bug", traceback.format_exc()))
        else:
            self.conn.send(Result(value, self.counts()))

    def serve(self) -> None:
        while True:
            call = self.conn.recv()
            if call.op == "close":
                self.conn.send(Result(None, self.counts()))
                return
            self.reply(lambda: self.dispatch(call))

    def dispatch(self, call: Call) -> Any:
        if call.op == "heavy_modules":
            return sorted(m for m in sys.modules if m.partition(".")[0] in NEVER_IN_ENGINE)
        if call.op == "run_jobs" and "run_jobs" in self.ops:
            if self.running:
                raise RuntimeError("run_jobs called from inside run_jobs")
            return self.run_jobs(*call.args)
        if call.op not in self.ops:
            raise RuntimeError(f"the engine process has no operation {call.op!r}")
        return getattr(self.engine, call.op)(*call.args)

    def ask(self, what: str, events: tuple) -> Any:
        """Ask the parent and wait for its Answer, serving the Calls it makes meanwhile."""
        self.conn.send(Ask(what, events))
        while True:
            message = self.conn.recv()
            if isinstance(message, Answer):
                return message.value
            self.reply(lambda: self.dispatch(message))

    def run_jobs(self, settings: dict, report_steps: bool, report_done: bool) -> None:
        """The engine's run_jobs with the parent's iterator and callbacks behind Asks."""
        events: list[tuple] = []
        gguf = self.engine.gguf_path

        def take() -> tuple:
            due = tuple(events)
            events.clear()
            return due

        def on_step(n: int) -> None:
            fault_point("decode", gguf)  # test-only: a crash of the engine, on demand (fsutil)
            if report_steps:
                events.append(("step", n))

        def on_done(leaf: Leaf, completion: Completion) -> None:
            events.append(("done", leaf, completion))

        def jobs():
            while (job := self.ask("next_job", take())) is not None:
                yield job

        self.running = True
        try:
            self.engine.run_jobs(jobs(), **settings, on_done=on_done if report_done else None, on_step=on_step,
                                 should_stop=lambda: self.ask("should_stop", take()))
        finally:
            self.running = False
            if events:  # the engine raised after callbacks it had not handed over yet
                self.ask("flush", take())


GENERATOR_OPS = ("tokenize", "tokenize_continuation", "chat_prompt", "score_continuations", "run_jobs")


def _open_generator(gguf: str, config: GenerationConfig, backend: BackendConfig, lora: str | None):
    if backend.kind == "llama-cpp":
        from localalign.engine.llamacpp import BatchGenerator

        engine = BatchGenerator(gguf, config, lora_path=lora)
        parallel = engine.parallel
    else:
        from localalign.engine.openai import OpenAIGenerator

        engine = OpenAIGenerator(gguf, config, backend)
        parallel = backend.concurrency
    return engine, GENERATOR_OPS, {"n_ctx_seq": engine.n_ctx_seq, "template": engine.template, "parallel": parallel}


class _ProbeModel:
    """The probe's engine: a GGUF loaded with logits for every position (`Probe` has the docs)."""

    OPS = ("metadata", "tokenize", "logits", "is_eog", "token_eos", "token_bos", "apply_chat_template")

    def __init__(self, gguf: str, lora: str | None, n_ctx: int, threads: int | None):
        from localalign.engine.runtime import llama_cpp, load_llama

        self.lib = llama_cpp()
        self.llm = load_llama(gguf, n_ctx=n_ctx, threads=threads, logits_all=True, lora_path=lora)
        self.vocab = self.lib.llama_model_get_vocab(self.llm.model)

    def close(self) -> None:
        self.llm.close()

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def logits(self, ids: list[int]) -> np.ndarray:
        if not ids:
            raise ValueError("no tokens to compute logits for")
        if len(ids) > self.llm.n_ctx():
            raise UserError(f"{len(ids)} tokens do not fit the probe's {self.llm.n_ctx()}-token context")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def token_eos(self) -> int:
        return int(self.llm.token_eos())

    def token_bos(self) -> int:
        return int(self.llm.token_bos())

    def apply_chat_template(self, template: str | None, messages: list[dict[str, str]],
                            add_generation_prompt: bool) -> str | None:
        lib = self.lib
        if template is None:
            template = self.llm.metadata.get("tokenizer.chat_template", "")
        chat = (lib.llama_chat_message * len(messages))(
            *[lib.llama_chat_message(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages])
        size = 2 * sum(len(m["role"]) + len(m["content"]) for m in messages) + 1024
        for _ in range(2):  # the second time with the size llama.cpp asked for
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_chat_apply_template(template.encode("utf-8"), chat, len(messages), add_generation_prompt,
                                              buf, size)
            if n < 0:
                return None  # a template llama.cpp does not recognise
            if n <= size:
                return buf.raw[:n].decode("utf-8")
            size = n
        raise RuntimeError("llama_chat_apply_template kept asking for a larger buffer")
