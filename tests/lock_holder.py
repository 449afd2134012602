"""A second process that holds a run directory's lock, for tests of what a concurrent run sees."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def lock_held_by_another_process(run_dir: Path) -> Iterator[subprocess.Popen]:
    """Yield a live process holding `run_dir`'s RunLock; on exit it is killed (SIGKILL), so
    its lock file stays behind, stale."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from localalign.rundir import RunLock
            with RunLock({str(run_dir)!r}):
                print("locked", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
