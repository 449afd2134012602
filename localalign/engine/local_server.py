"""llama-cpp-python's own OpenAI-compatible server on 127.0.0.1, for the tests, the benchmark,
and trying `--backend openai` without another server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from localalign.engine.openai import one_line
from localalign.engine.runtime import default_threads
from localalign.errors import UserError


@contextmanager
def llama_cpp_server(gguf: str | Path, n_ctx: int = 2048, threads: int | None = None, alias: str | None = None,
                     startup_s: float = 120.0):
    """llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, the
    `server` extra) on 127.0.0.1 at a free port, serving `gguf` (named `alias` in /v1/models
    if given, else by its path); yields its base URL.

    For the tests, the benchmark, and trying `--backend openai` without another server. It
    decodes one request at a time (see docs/scaling.md).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = threads or default_threads()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False",
         *(["--model_alias", alias] if alias else [])],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                tail = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]  # the exception
                raise UserError(f"llama_cpp.server exited ({proc.returncode}): {one_line(' '.join(tail), 400)}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise UserError(f"llama_cpp.server did not answer within {startup_s:.0f} s") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
