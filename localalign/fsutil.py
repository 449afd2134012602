"""Atomic file writes: a reader never sees a half-written file.

Every file localalign produces goes through `atomic_write`: write to a temp file in the
same directory, fsync, rename over the target, fsync the directory. A crash (or Ctrl-C,
or a full disk) leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Iterator

from localalign.errors import UserError

# Every temp file or directory is named ".<final name>.<random>.tmp": hidden, so directory
# hashes skip it, and recognizable, so `remove_stale_temps` can clear what a killed run left.
TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to `path`; on clean exit, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point("rename", path)
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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-", suffix=TEMP_SUFFIX))
    try:
        yield tmp
        fault_point("rename", path)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        full = disk_full_error(e, path.parent)  # before the clean-up frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise


def disk_full_error(exc: BaseException | None, directory: str | Path) -> OSError | None:
    """The OSError(ENOSPC) that `exc` hides, if the disk under `directory` is full; else None.

    safetensors and torch.save report a full disk as their own exception types (torch's says
    only "unexpected pos 576 vs 534"), numpy's tofile as an OSError without an errno; the CLI
    reports an ENOSPC OSError as one line. Call it before deleting the failed temp file, while
    the disk is still full.
    """
    if (isinstance(exc, OSError) and exc.errno is not None) or (exc is not None and not isinstance(exc, Exception)):
        return None  # Ctrl-C and OSErrors that say what they are pass through as they are
    text = str(exc) if exc is not None else ""
    try:
        full = shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        full = False
    if full or "No space left on device" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return None


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def temp_path_for(path: str | Path) -> Path:
    """A fresh temp path next to `path`, for writers (like llama.cpp's) that need a filename.

    The caller writes there and then calls `commit_temp(tmp, path)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def commit_temp(tmp: str | Path, path: str | Path) -> None:
    """fsync a finished temp file and rename it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    fault_point("rename", path)
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


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files and directories a killed writer left under `directory`.

    Only safe while no other process writes there: the run directory's lock holder calls it.
    """
    stale = [p for p in Path(directory).rglob(f".*{TEMP_SUFFIX}") if p.name.startswith(".")]
    for p in sorted(stale, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            _remove_quietly(p)
    return stale


# ---- test-only fault injection
#
# LOCALALIGN_FAULT="<point>:<glob>[#N][=KILL|INT|SEGV|ILL|...|ENOSPC]" makes the N-th (default:
# first) `fault_point(point, path)` whose path name matches <glob> kill this process with
# SIGKILL (default), SIGINT or another signal by name, or fail with a full-disk error. Points:
# "rename": a finished, fsynced temp file or directory is about to replace its final name, the
# moment an ordinary crash test cannot hit; "decode": the engine process (engine/process.py)
# has decoded a batch with the model whose file name is the path, so a test can end it the
# way a llama.cpp crash does. tests/test_faults.py drives the real CLI with it; unset (as
# always outside those tests) it costs one comparison per file written or batch decoded.
_FAULT = os.environ.get("LOCALALIGN_FAULT") or None
_fault_hits = 0


def fault_point(point: str, path: str | Path) -> None:
    if _FAULT is None:
        return
    global _fault_hits
    spec, _, action = _FAULT.partition("=")
    spec, _, nth = spec.partition("#")
    want_point, _, glob = spec.partition(":")
    if want_point != point or not fnmatch.fnmatch(Path(path).name, glob or "*"):
        return
    _fault_hits += 1
    if _fault_hits != int(nth or 1):
        return
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if action == "INT":
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt here, as on Ctrl-C
        return
    os.kill(os.getpid(), getattr(signal, f"SIG{action or 'KILL'}"))
    signal.pause()  # not reached: the signal's default action ends the process before this returns
