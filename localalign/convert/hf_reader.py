"""Reading a Hugging Face model directory the way llama.cpp will need it: config, RoPE,
tokenizer vocabulary and pre-tokenizer, chat template. No file is written here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localalign.errors import UserError

# Architectures the whole pipeline (HF copy, training, export back to GGUF) supports.
SUPPORTED_ARCHS = ("llama", "qwen2")


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # llama.cpp's name for the architecture
    # llama.cpp applies RoPE to interleaved (re, im) pairs, HF llama to two halves; Q and K
    # rows are permuted at conversion so that both compute the same thing. Qwen2 uses
    # llama.cpp's NEOX RoPE, which matches HF's halves directly.
    permute_qk: bool


# HF `model_type` -> how llama.cpp stores it. The keys must be the pipeline's SUPPORTED_ARCHS.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2", permute_qk=False),
}
assert tuple(ARCHS) == SUPPORTED_ARCHS


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def arch_spec(config: dict[str, Any], where: Path | str) -> ArchSpec:
    """The export spec for a config, or a UserError naming the supported architectures."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UserError(
            f"{where}: architecture {model_type!r} cannot be exported to GGUF "
            f"(supported: {', '.join(ARCHS)})"
        )
    return ARCHS[model_type]


def rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 moved rope settings into `rope_parameters`; older configs have them on top.
    return float(rope_params(config).get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_type(config: dict[str, Any]) -> str:
    params = rope_params(config)
    return params.get("rope_type", params.get("type", "default")) or "default"


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3's RoPE scaling, stored as `rope_freqs.weight`.

    The same formula as transformers' `_compute_llama3_parameters` and llama.cpp's converter:
    high frequencies kept, low ones divided by `factor`, a smooth blend between.
    """
    p = rope_params(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(np.float32)


# Pre-tokenizer regexes as they appear in HF tokenizer.json `Split` pre-tokenizers, and the
# name llama.cpp gives the same split (llama-vocab.cpp implements each name by its own regex).
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_SPLIT_REGEX_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# Normalizers that leave the text llama.cpp sees unchanged for practical input. Qwen2 ships
# NFC; llama.cpp does not normalize, which differs only on non-NFC input (rare, and the
# parity check's probes would show it).
_HARMLESS_NORMALIZERS = (None, "NFC")


def llama_cpp_pre_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for an HF byte-level BPE tokenizer, from its structure.

    llama.cpp's own converter identifies the pre-tokenizer by hashing the token ids of a
    probe string, which needs a table entry per released model. A fine-tuned copy keeps the
    structure of its tokenizer.json, so the structure is what we recognise. Anything else is
    refused: a GGUF with the wrong pre name loads fine and tokenizes wrong.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"tokenizer model {model.get('type')!r} is not supported for export "
            "(only byte-level BPE tokenizers, as in SmolLM2, Llama 3 and Qwen2)"
        )
    norm = tokenizer_json.get("normalizer")
    if (norm or {}).get("type") not in _HARMLESS_NORMALIZERS:
        raise UserError(f"tokenizer normalizer {norm.get('type')!r} is not supported for export")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def byte_level(step: dict, regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and bool(step.get("use_regex", True)) == regex
            and not step.get("add_prefix_space", False)
        )

    if kinds == ["ByteLevel"] and byte_level(steps[0], regex=True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and byte_level(steps[1], regex=True)
    ):
        # Digits one by one, then GPT-2's regex: what llama.cpp calls "smollm" (also StarCoder).
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], regex=False):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEX_PRE and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return _SPLIT_REGEX_PRE[regex]
    raise UserError(
        f"pre-tokenizer {json.dumps(pre, ensure_ascii=False)[:200]} has no known llama.cpp equivalent; "
        "refusing to write a GGUF that would tokenize differently"
    )


@dataclass
class VocabInfo:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def read_vocab(hf_dir: Path, vocab_size: int) -> VocabInfo:
    """Tokens, token types, pre name, add-BOS/EOS flags and chat template of an HF tokenizer.

    Read from tokenizer.json / tokenizer_config.json with the `tokenizers` library (not
    transformers: importing it costs seconds); the parity check then compares the result
    with transformers' own tokenizer.
    """
    from tokenizers import Tokenizer  # not transformers: importing it costs seconds

    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{hf_dir}: no tokenizer.json (only fast byte-level BPE tokenizers can be exported)")
    tj = json.loads(tok_path.read_text(encoding="utf-8"))
    pre = llama_cpp_pre_name(tj)
    cfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise UserError(f"{hf_dir}: tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            # The same rule as llama.cpp's converter: special added tokens (and ones that
            # look like <|...|>) are CONTROL, and only match when parsing specials.
            text = added[i]["content"]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)

    # Whether HF adds BOS/EOS: tokenizer_config's flag wins (transformers rebuilds the
    # post-processor from it); otherwise whatever tokenizer.json's post-processor does.
    ids = Tokenizer.from_file(str(tok_path)).encode("a", add_special_tokens=True).ids
    bos_id, eos_id = special_id(tj, tcfg, "bos"), special_id(tj, tcfg, "eos")
    add_bos = tcfg.get("add_bos_token") if isinstance(tcfg.get("add_bos_token"), bool) else (
        bos_id is not None and len(ids) > 1 and ids[0] == bos_id
    )
    add_eos = tcfg.get("add_eos_token") if isinstance(tcfg.get("add_eos_token"), bool) else (
        eos_id is not None and len(ids) > 1 and ids[-1] == eos_id
    )
    return VocabInfo(tokens, types, pre, bool(add_bos), bool(add_eos), read_chat_template(hf_dir, tcfg))


def special_id(tj: dict, tcfg: dict, kind: str) -> int | None:
    entry = tcfg.get(f"{kind}_token")
    text = entry.get("content") if isinstance(entry, dict) else entry
    for t in tj.get("added_tokens", []):
        if t["content"] == text:
            return t["id"]
    return tj["model"]["vocab"].get(text) if text else None


def read_chat_template(hf_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The template as transformers 5 loads it: chat_template.jinja, else tokenizer_config's."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        # newline="" keeps \r\n as written: the GGUF copy must be byte-identical.
        with open(jinja, encoding="utf-8", newline="") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's default is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def id_list(value) -> list[int]:
    """A token id or a list of them (as configs write either) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
