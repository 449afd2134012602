"""The run directory: its lock and its manifest.

A run directory holds everything an alignment run made. Two things keep it sound:

- a lock file naming the PID that uses it, so two runs never write into one directory
  (a lock whose process is gone is stale and is taken over, with the temp files its
  process left behind);
- `manifest.json`, which records, for each finished stage, the hashes of what went in and
  what came out. On resume a stage is skipped only if its inputs are unchanged and its
  outputs still hash to what was recorded; anything else runs again. The manifest is
  rewritten atomically after each stage, so a crash loses at most the stage in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localalign.errors import UserError
from localalign.fsutil import atomic_write_text, remove_stale_temps, sha256_file

LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"


def _process_start_time(pid: int) -> str | None:
    """Kernel start time of `pid` (Linux), to tell a live lock holder from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start_time is None or _process_start_time(pid) in (None, start_time)


class RunLock:
    """Exclusive use of a run directory by this process; `with RunLock(dir, log):`."""

    def __init__(self, run_dir: Path, log=print):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log

    def __enter__(self) -> "RunLock":
        me = {"pid": os.getpid(), "start": _process_start_time(os.getpid()), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder and holder.get("host") == me["host"] and _alive(holder["pid"], holder.get("start")):
                    raise UserError(
                        f"{self.path.parent} is in use by another localalign run (PID {holder['pid']}); "
                        "wait for it or stop it first"
                    ) from None
                self.log(f"removing a stale lock left by PID {holder.get('pid') if holder else '?'}")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:  # read-only, not ours, no such directory
                raise UserError(f"{self.path.parent}: cannot write the run directory ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            # Nobody else writes here now: what temp files remain were left by a killed run.
            stale = remove_stale_temps(self.path.parent)
            if stale:
                self.log(f"removed {len(stale)} temp file(s) left by an interrupted run")
            return self
        raise UserError(f"could not lock {self.path.parent}")

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, json.JSONDecodeError):
            return None  # a lock half-written by a killed process is stale

    def __exit__(self, *exc) -> None:
        holder = self._read_holder()
        if holder and holder["pid"] == os.getpid():
            self.path.unlink(missing_ok=True)


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's relative file names and contents (sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def hash_value(value: Any) -> str:
    """sha256 of a JSON-able value (a config section, a list of names)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Manifest:
    """What each finished stage consumed and produced; see the module docstring."""

    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = Path(run_dir) / MANIFEST_NAME
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            return cls(path, dict(data["stages"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}: corrupt manifest; move the run directory aside and start a new run") from None

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"version": 1, "stages": self.stages}, indent=2) + "\n")

    def is_done(self, stage: str, inputs: dict[str, str]) -> bool:
        """True if `stage` finished with these inputs and its outputs are intact."""
        entry = self.stages.get(stage)
        if not entry or entry.get("status") != "done" or entry.get("inputs") != inputs:
            return False
        root = self.path.parent
        for rel, digest in entry.get("outputs", {}).items():
            try:
                if hash_path(root / rel) != digest:
                    return False
            except FileNotFoundError:
                return False
        return True

    def record(self, stage: str, inputs: dict[str, str], outputs: list[Path], seconds: float, **info: Any) -> None:
        root = self.path.parent
        self.stages[stage] = {
            "status": "done",
            "inputs": inputs,
            "outputs": {str(Path(p).relative_to(root)): hash_path(p) for p in outputs},
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info,
        }
        self.save()

    def output_hash(self, stage: str, rel: str) -> str:
        return self.stages[stage]["outputs"][rel]
