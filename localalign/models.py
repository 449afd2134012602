"""The model registry and the materialized model files under models/.

A model is named either by a registry name (models/registry.toml) or by a path: a GGUF file
or a Hugging Face model directory. `pull` puts a registry model in place:

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

from localalign.errors import UserError
from localalign.fsutil import atomic_dir, commit_temp, temp_path_for

# The registry ships inside the repository; models are materialized next to it.
MODELS_DIR = Path(os.environ.get("LOCALALIGN_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))
REGISTRY_PATH = Path(__file__).resolve().parents[1] / "models" / "registry.toml"

# Tolerances for the copy check. Measured on SmolLM2-135M, Q4_1 GGUF against its dequantized
# f32 HF copy, 139 positions of 3 chat prompts: mean |logit diff| 0.19-0.21, max 1.77 (logits
# have a spread of ~7-8), top-1 agreement 0.971. The gap is llama.cpp multiplying Q4_1 weights
# with 8-bit-quantized activations, not a bug; a wrong tensor layout gives differences of 10+
# and top-1 agreement near chance.
COPY_CHECK_MAX_ABS = 2.5
COPY_CHECK_MIN_TOP1 = 0.90


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
        from localalign.gguf_check import check_gguf_file

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


# Formats that unpickle, and so can run code on load; localalign never reads them.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_hf_dir(d: Path) -> None:
    """Refuse an HF model directory the pipeline cannot use safely or at all, before loading it.

    Weights must be safetensors (a pickled `pytorch_model.bin` can run code when loaded), each
    with a header that parses; the tokenizer must be a `tokenizer.json`, and a chat template
    must be there: training, generation and export all format turns with it.
    """
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: not a Hugging Face model directory (no config.json)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickled = [q.name for pattern in PICKLED_WEIGHTS for q in d.glob(pattern)]
        if pickled:
            raise UserError(f"{d}: weights only in a pickle format ({pickled[0]}); localalign loads safetensors only")
        raise UserError(f"{d}: no model weights (*.safetensors)")
    for w in weights:
        check_safetensors_header(w)
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"{d}: no tokenizer (tokenizer.json)")
    template = _chat_template(d)
    if not template:
        raise UserError(f"{d}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
    # transformers renders it in a sandbox too, but its refusal would surface as a traceback
    # mid-training; a template that reaches for Python internals is refused here, up front.
    from localalign.chat import TemplateRefused, render_chat

    try:
        render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    except TemplateRefused as e:
        raise UserError(f"{d}: {e}") from None
    except UserError:
        pass  # a template that rejects this probe conversation may still serve ours


def check_adapter_dir(d: Path) -> None:
    """A PEFT LoRA adapter directory: adapter_config.json and safetensors weights (never a .bin)."""
    if not (d / "adapter_config.json").is_file():
        raise UserError(f"{d}: not a PEFT adapter directory (no adapter_config.json)")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{d}: no adapter_model.safetensors (pickled .bin adapters are not read)")
    check_safetensors_header(weights)


def check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")


def _chat_template(d: Path) -> str | None:
    """The template as transformers 5 loads it (export.read_chat_template), or None."""
    from localalign.export import read_chat_template

    try:
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    try:
        template = read_chat_template(d, config if isinstance(config, dict) else {})
    except UnicodeDecodeError:
        raise UserError(f"{d / 'chat_template.jinja'}: not valid UTF-8") from None
    return template if isinstance(template, str) else None


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


def make_hf_copy(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into an HF directory with transformers' own GGUF reader.

    Written to a temp directory and renamed, so an interrupted copy is never taken as done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localalign.gguf_check import gguf_architecture, read_gguf_header

    arch = gguf_architecture(gguf)
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"{gguf}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    with atomic_dir(out_dir) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        model.hf_quantizer = None  # the weights are dequantized; save_pretrained refuses otherwise
        if hasattr(model.config, "quantization_config"):
            # Left in, it makes every later load look for the GGUF again.
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _restore_pre_tokenizer(tmp / "tokenizer.json", read_gguf_header(gguf).get("tokenizer.ggml.pre"))


# transformers rebuilds a GGUF's BPE tokenizer with GPT-2's pre-tokenizer whatever the GGUF's
# `tokenizer.ggml.pre` says. For these pre-tokenizers llama.cpp first splits every digit on
# its own (llama-vocab.cpp puts "\\p{N}" before the GPT-2 regex). SmolLM2's vocab happens to
# hold no merges across digits, so its probes agree either way, but a vocab that has them
# would tokenize "2024" differently; we restore the original pre-tokenizer so the HF copy
# is the model's real tokenizer, and the exporter recognizes it when writing a GGUF back.
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def _restore_pre_tokenizer(tokenizer_json: Path, gguf_pre: str | None) -> None:
    if gguf_pre not in _DIGIT_SPLITTING_PRE:
        return
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# Architectures the whole pipeline (HF copy, training, export back to GGUF) supports.
SUPPORTED_ARCHS = ("llama", "qwen2")


def check_copy(gguf: Path, hf_dir: Path):
    """Parity of an HF copy against the GGUF it was made from: the exporter's check (tokens,
    special tokens, stop tokens, logits), with tolerances for the GGUF's own type."""
    from localalign.export import check_export, tolerances_for
    from localalign.parity import read_gguf_metadata

    max_abs, min_top1 = tolerances_for(read_gguf_metadata(gguf))
    if max_abs is None:  # a quantized source: the Q4_1 measurements above
        max_abs, min_top1 = COPY_CHECK_MAX_ABS, COPY_CHECK_MIN_TOP1
    return check_export(hf_dir, gguf, max_abs_tol=max_abs, min_top1=min_top1)


def read_copy_check(name: str) -> dict | None:
    p = model_dir(name) / "copy-check.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
