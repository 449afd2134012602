"""Atomic file writes: a reader never sees a half-written file.

Every file localalign produces goes through `atomic_write`: write to a temp file in the
same directory, fsync, rename over the target, fsync the directory. A crash (or Ctrl-C,
or a full disk) leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from localalign.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to `path`; on clean exit, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; free some space and run again") from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temp directory next to `path`; on clean exit it replaces `path` whole.

    For outputs that are directories (an HF model, a merged model): a reader sees the old
    directory or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def temp_path_for(path: str | Path) -> Path:
    """A fresh temp path next to `path`, for writers (like llama.cpp's) that need a filename.

    The caller writes there and then calls `commit_temp(tmp, path)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def commit_temp(tmp: str | Path, path: str | Path) -> None:
    """fsync a finished temp file and rename it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(p: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
