"""localalign as a user installs it: a wheel built from this source tree, installed into a fresh
virtual environment and run away from any checkout (the fixtures in conftest.py use this).

The new environment gets the heavy dependencies (torch, transformers, llama_cpp, ...) from the
environment running the tests, by a .pth line naming that one's site-packages; `venv
--system-site-packages` would not do it, because a venv made from a venv takes the base
interpreter's packages, not the outer venv's. The line names the folder only: Python does not
read the .pth files inside it, so the outer environment's editable install of localalign (a
.pth hook) stays out, and `import localalign` finds the wheel's copy.

Nothing is downloaded: the wheel is built without build isolation from what is installed, and
installed with --no-index --no-deps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from test_align import TINY_RUN_TOML as ALIGN_TOML

REPO = Path(__file__).resolve().parents[1]

# The tiny end-to-end run: tests/test_align.py's settings, smaller (2 rounds of 4 samples, 4
# rehearsal samples, 3 items per suite, 1 epoch), so that the report has rounds, rehearsal data
# and rejects to show.
TINY_RUN_TOML = (ALIGN_TOML.replace("samples = 6", "samples = 4\nrehearsal = 4").replace("eval_limit = 4", "eval_limit = 3")
                 .replace("epochs = 2", "epochs = 1").replace("checkpoint_every = 1\n", ""))


@dataclass
class Installed:
    venv: Path
    python: Path
    cli: Path
    home: Path  # LOCALALIGN_HOME for the commands run by `run`
    workdir: Path  # a directory outside the checkout, the commands' working directory

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user who installed the tool: no PYTHONPATH, no checkout, one home."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "LOCALALIGN_MODELS_DIR", "LOCALALIGN_CACHE_DIR", "LOCALALIGN_HOME")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LOCALALIGN_HOME"] = str(self.home)
        env.update(extra)
        return {k: v for k, v in env.items() if v != ""}  # extra KEY="" removes KEY

    def run(self, *args: str, timeout: int = 120, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
                              env=self.env(**extra_env))


def build_wheel(out: Path) -> Path:
    """The wheel of this source tree, built in a copy of it (setuptools writes build/ beside its input)."""
    src = out / "src"
    shutil.copytree(REPO / "localalign", src / "localalign", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(src), "-w", str(out / "dist")], check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("localalign-*.whl")
    return wheel


def install(wheel: Path, root: Path) -> Installed:
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps",
                    str(wheel)], check=True, capture_output=True, text=True)
    # After the install, so that pip does not take the outer environment's localalign for this one's.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "outer-environment.pth").write_text("\n".join(sorted(outer)) + "\n")
    (root / "home").mkdir()
    (root / "work").mkdir()
    return Installed(venv, python, venv / "bin" / "localalign", root / "home", root / "work")
