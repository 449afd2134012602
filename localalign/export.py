"""Export a (tuned) Hugging Face model back to GGUF, and check the result against HF.

The crossing HF -> GGUF is where peer tools break most often: a pre-tokenizer llama.cpp
does not know, a chat template that is not carried over, BOS added twice, an attention
tensor not permuted for llama.cpp's RoPE. This module writes the file with the `gguf`
library (its tensor-name map and `SpecialVocab`), quantizes with llama.cpp's own quantizer,
and then checks every export against the HF model (tokens, special ids, template, logits).

Public entry points:
  write_gguf(hf_dir, out, out_type)          HF dir -> f32/f16/bf16 GGUF
  quantize_gguf(in, out, qtype)              GGUF -> q8_0, q4_k_m, ... (llama.cpp in-process)
  write_lora_gguf(adapter_dir, base_hf, out) PEFT LoRA -> GGUF LoRA adapter
  export_model / export_adapter              the above + parity check + Modelfile
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np

from localalign.errors import UserError
from localalign.fsutil import commit_temp, disk_full_error, temp_path_for
from localalign.models import SUPPORTED_ARCHS

OUT_TYPES = ("f32", "f16", "bf16")


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
assert tuple(ARCHS) == tuple(SUPPORTED_ARCHS)


# ---------------------------------------------------------------------------- reading HF


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
    from tokenizers import Tokenizer

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
    bos_id, eos_id = _special_id(tj, tcfg, "bos"), _special_id(tj, tcfg, "eos")
    add_bos = tcfg.get("add_bos_token") if isinstance(tcfg.get("add_bos_token"), bool) else (
        bos_id is not None and len(ids) > 1 and ids[0] == bos_id
    )
    add_eos = tcfg.get("add_eos_token") if isinstance(tcfg.get("add_eos_token"), bool) else (
        eos_id is not None and len(ids) > 1 and ids[-1] == eos_id
    )
    return VocabInfo(tokens, types, pre, bool(add_bos), bool(add_eos), read_chat_template(hf_dir, tcfg))


def _special_id(tj: dict, tcfg: dict, kind: str) -> int | None:
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


# ---------------------------------------------------------------------------- tensors


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs (as llama.cpp's converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_hf_tensors(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32-or-float16 numpy array) for every tensor in the directory's safetensors."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights (pytorch .bin files are not read: no unpickling)")
    for f in files:
        if _safetensors_dtypes(f) <= {"F32", "F16"}:
            # numpy reads these directly; importing torch would cost seconds (half our runtime).
            with safe_open(f, framework="numpy") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
            continue
        import torch  # bf16 and other types numpy lacks

        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.dtype not in (torch.float32, torch.float16):
                    t = t.to(torch.float32)
                yield name, t.numpy()


def _safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes named in a safetensors header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 100_000_000:
            raise UserError(f"{path}: not a safetensors file")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def gguf_tensors(
    hf_dir: Path, config: dict[str, Any], spec: ArchSpec
) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors renamed, permuted and filtered into llama.cpp's layout (still float)."""
    n_layers = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    name_map = gguf.get_tensor_name_map(_gguf_arch_enum(spec), n_layers)
    tied = config.get("tie_word_embeddings", False)
    if rope_type(config) == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)
    for name, data in iter_hf_tensors(hf_dir):
        if name.endswith(".rotary_emb.inv_freq"):  # recomputed by llama.cpp
            continue
        if tied and name == "lm_head.weight":  # llama.cpp reuses token_embd when output is absent
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"{hf_dir}: tensor {name!r} has no GGUF name for {spec.gguf_arch}; cannot export")
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head)
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_kv)
        yield new, data


def _gguf_arch_enum(spec: ArchSpec):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)


def storage_type(gguf_name: str, data: np.ndarray, out_type: str):
    """GGML type of one tensor: norms and 1-D tensors stay f32 (llama.cpp expects it)."""
    Q = gguf.GGMLQuantizationType

    if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[out_type]


def convert(data: np.ndarray, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType

    if qtype == Q.F32:
        return data.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)  # bf16: gguf's round-to-nearest-even


# ---------------------------------------------------------------------------- writer


def write_gguf(hf_dir: str | Path, out_path: str | Path, out_type: str = "f32") -> Path:
    """Write the HF model in `hf_dir` as a GGUF file of `out_type` (f32, f16 or bf16).

    Unsupported architectures, tokenizers and output types are refused before anything is
    written. The file appears only when complete.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise UserError(f"output type {out_type!r} is not one of {', '.join(OUT_TYPES)} (quantize afterwards)")
    config = read_config(hf_dir)
    spec = arch_spec(config, hf_dir)
    _check_rope(config, hf_dir)
    vocab = read_vocab(hf_dir, config["vocab_size"])

    def fill(w) -> None:
        _add_hparams(w, config, spec, out_type)
        _add_tokenizer(w, hf_dir, vocab, config["vocab_size"])
        for name, data in gguf_tensors(hf_dir, config, spec):
            qtype = storage_type(name, data, out_type)
            w.add_tensor(name, convert(data, qtype), raw_dtype=qtype)

    return _write_atomically(out_path, spec.gguf_arch, fill)


def _write_atomically(out_path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """Run `fill(writer)` on a GGUFWriter for a temp file, write it, rename it to `out_path`."""
    tmp = temp_path_for(out_path)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        commit_temp(tmp, out_path)
    except BaseException as e:
        full = disk_full_error(e, out_path.parent)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    return out_path


def _check_rope(config: dict[str, Any], where: Path) -> None:
    kind = rope_type(config)
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported for export (default, linear, llama3)")


_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama_ftype values (gguf.LlamaFileType)


def _add_hparams(w, config: dict[str, Any], spec: ArchSpec, out_type: str) -> None:
    n_head = config["num_attention_heads"]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(config.get("_name_or_path") or "localalign export"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads", n_head))
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    if config.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_type(config) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope_params(config)["factor"]))
    if spec.gguf_arch == "llama":
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(_FILE_TYPES[out_type])


def _add_tokenizer(w, hf_dir: Path, vocab: VocabInfo, vocab_size: int) -> None:
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below, exactly as read
    special.add_special_token = {}  # decided in read_vocab from the tokenizer's behaviour
    special.add_to_gguf(w, quiet=True)
    # Written explicitly both ways: llama.cpp's default for a missing flag depends on the
    # pre name, and a wrong default is the classic double-BOS export.
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)



# ---------------------------------------------------------------------------- quantization

# Quantization types offered, as llama.cpp's llama_ftype values (llama.h). K-quants (_k)
# work on 256-value super-blocks: tensors whose rows are not a multiple of 256 fall back
# to another type inside llama.cpp.
QUANT_TYPES: dict[str, int] = {
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_0": 8,
    "q5_1": 9,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_0": 2,
    "q4_1": 3,
    "q3_k_m": 12,
    "q3_k_s": 11,
    "q3_k_l": 13,
    "q2_k": 10,
}


def quantize_gguf(in_path: str | Path, out_path: str | Path, qtype: str = "q8_0") -> Path:
    """Quantize a float GGUF with llama.cpp's own quantizer, in-process (no external binary)."""
    from localalign.gguf_check import check_gguf_file
    from localalign.runtime import default_threads, llama_cpp

    in_path, out_path = Path(in_path), Path(out_path)
    if qtype not in QUANT_TYPES:
        raise UserError(f"quantization type {qtype!r} is not one of {', '.join(QUANT_TYPES)}")
    check_gguf_file(in_path)
    module = llama_cpp()
    params = module.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = default_threads()
    tmp = temp_path_for(out_path)
    try:
        rc = module.llama_model_quantize(str(in_path).encode(), str(tmp).encode(), params)
        if rc != 0 and (full := disk_full_error(None, out_path.parent)) is not None:
            raise full
        if rc != 0:
            raise UserError(
                f"llama.cpp could not quantize {in_path} to {qtype} (code {rc}; "
                "set LOCALALIGN_LLAMA_LOG=1 to see its log)"
            )
        commit_temp(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


# ---------------------------------------------------------------------------- LoRA adapters


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir}: adapter type {cfg.get('peft_type')!r} is not LoRA")
    # Each of these changes what the adapter computes in a way a GGUF LoRA cannot express:
    # refused rather than exported as a different model.
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    if bad := [k for k, v in unsupported.items() if v]:
        raise UserError(
            f"{adapter_dir}: adapter uses {', '.join(bad)}, which a GGUF LoRA adapter cannot carry; "
            "export the merged model instead (drop --adapter-only)"
        )
    return cfg


def lora_alpha_for_gguf(cfg: dict[str, Any]) -> float:
    """The alpha llama.cpp needs: it scales by alpha / r, PEFT by alpha / r or alpha / sqrt(r)."""
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def lora_pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """{HF module weight name: {"A": (r, in), "B": (out, r)}} from adapter_model.safetensors."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors (pickled .bin adapters are not read)")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(path, framework="pt") as st:
        for key in st.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if m is None:
                raise UserError(f"{path}: tensor {key!r} is not a LoRA A/B weight; cannot export as a GGUF adapter")
            pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = st.get_tensor(key).float().numpy()
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{path}: {name} has LoRA {''.join(pair)} but not both A and B")
    return pairs


def write_lora_gguf(adapter_dir: str | Path, base_hf_dir: str | Path, out_path: str | Path) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA that llama.cpp applies on the base GGUF.

    A is stored as (r, in) and B as (out, r), as llama.cpp's own converter does; B of the
    Q/K projections gets the same row permutation as the base weights.
    """
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    lcfg = read_adapter_config(adapter_dir)
    config = read_config(base_hf_dir)
    spec = arch_spec(config, base_hf_dir)
    pairs = lora_pairs(adapter_dir)
    name_map = gguf.get_tensor_name_map(_gguf_arch_enum(spec), config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    tensors = []
    for name, pair in sorted(pairs.items()):
        new = name_map.get_name(name, try_suffixes=(".weight",))
        if new is None or name.startswith(("lm_head", "model.embed_tokens")):
            raise UserError(f"{adapter_dir}: LoRA on {name!r} cannot be exported as a GGUF adapter")
        a, b = pair["A"], pair["B"]
        if spec.permute_qk and name.endswith("q_proj.weight"):
            b = permute_qk(b, n_head)
        elif spec.permute_qk and name.endswith("k_proj.weight"):
            b = permute_qk(b, n_kv)
        tensors += [(new + ".lora_a", a), (new + ".lora_b", b)]

    def fill(w) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha_for_gguf(lcfg))
        for name, data in tensors:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    return _write_atomically(out_path, spec.gguf_arch, fill)


# ---------------------------------------------------------------------------- parity

# Tolerances for the parity check, measured with llama-cpp-python 0.3.36 on this CPU on the
# probe prompts of localalign.parity (139 positions on SmolLM2-135M, 186 on the tiny fixture).
# max |logit diff| HF vs GGUF, worst seen:
#   f32:  tiny 0.013, SmolLM2 0.050 (0.042 merged with a random LoRA; f32 base + LoRA 0.033)
#   f16:  tiny 0.036, SmolLM2 0.089 (merged) / 0.061; f16 base + trained LoRA 0.085
#   bf16: tiny 0.167, SmolLM2 0.415
# llama.cpp keeps its KV cache in f16 even for an f32 model, so an f32 file does not match HF
# to float32 precision. The bounds are about 2x the worst value seen: a wrong tensor layout
# (Q/K not permuted, a transposed weight) moves logits by whole units (tests show 1-7).
MAX_ABS_LOGIT_DIFF = {"f32": 0.1, "f16": 0.2, "bf16": 0.8}
# Share of probe positions whose top-1 token agrees with HF, worst seen:
#   f32 1.0 / 1.0, f16 0.995 (tiny) / 1.0, bf16 0.962 (tiny) / 1.0 (SmolLM2);
#   q8_0 0.941 (tiny) / 0.978-0.993 (SmolLM2); q4_k_m 0.871-0.935 (SmolLM2);
#   trained LoRA on the shipped Q4_1 SmolLM2 vs merged HF 0.928.
# The random tiny model has near-flat logits, so its ties flip easily; its 4-bit files fall
# to 0.4-0.7 and are tested for loading and tokens, not top-1.
MIN_TOP1 = {"f32": 0.97, "f16": 0.97, "bf16": 0.9, "q8": 0.9, "quant": 0.8}

_FLOAT_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}  # general.file_type -> out type


def tolerances_for(gguf_meta: dict[str, Any]) -> tuple[float | None, float]:
    """(max |logit diff| or None, min top-1 agreement) for a GGUF, by its general.file_type."""
    ftype = gguf_meta.get("general.file_type", 0)
    if ftype in _FLOAT_FILE_TYPES:
        return MAX_ABS_LOGIT_DIFF[_FLOAT_FILE_TYPES[ftype]], MIN_TOP1[_FLOAT_FILE_TYPES[ftype]]
    return None, MIN_TOP1["q8" if ftype == QUANT_TYPES["q8_0"] else "quant"]


AUTO = "auto"  # check_export: take the bound for the file's type from the tables above


def check_export(
    hf_dir: str | Path,
    gguf_path: str | Path,
    max_abs_tol: float | None | str = AUTO,
    min_top1: float | str = AUTO,
    lora_path: str | Path | None = None,
):
    """Parity of an exported GGUF (optionally with a LoRA adapter applied) against the HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localalign.parity import (
        ParityReport,
        compare_logits,
        compare_special_tokens,
        compare_tokenizers,
        read_gguf_metadata,
    )
    from localalign.runtime import load_llama

    # Read once: GGUFReader parses the whole vocabulary (seconds for a 49k-token model).
    meta = read_gguf_metadata(gguf_path)
    auto_abs, auto_top1 = tolerances_for(meta)
    max_abs_tol = auto_abs if max_abs_tol == AUTO else max_abs_tol
    min_top1 = auto_top1 if min_top1 == AUTO else min_top1
    report = ParityReport()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False).eval()
    llm = load_llama(gguf_path, n_ctx=512, logits_all=True, lora_path=lora_path)
    try:
        compare_tokenizers(tokenizer, llm, report)
        compare_special_tokens(tokenizer, meta, report)
        compare_stop_tokens(model, tokenizer, llm, report)
        compare_logits(model, tokenizer, llm, report, max_abs_tol=max_abs_tol, min_top1=min_top1)
    finally:
        llm.close()
    report.details["gguf"] = str(gguf_path)
    report.details["hf_dir"] = str(hf_dir)
    if lora_path is not None:
        report.details["adapter"] = str(lora_path)
    return report


def compare_stop_tokens(hf_model, hf_tokenizer, llm, report) -> None:
    """Every id HF stops generation on must end generation in llama.cpp too.

    An exported model that "never stops" is one whose end-of-turn token llama.cpp does not
    treat as end-of-generation.
    """
    from localalign.runtime import llama_cpp

    module = llama_cpp()
    hf_stops = set(_ids(hf_model.generation_config.eos_token_id if hf_model.generation_config else None))
    hf_stops |= set(_ids(hf_tokenizer.eos_token_id))
    vocab = module.llama_model_get_vocab(llm.model)
    not_eog = sorted(i for i in hf_stops if not module.llama_vocab_is_eog(vocab, i))
    report.details["stop_ids"] = {"hf": sorted(hf_stops), "gguf_eos": llm.token_eos()}
    report.record(
        "stop_tokens",
        bool(hf_stops) and not not_eog,
        f"HF stop id(s) {not_eog} do not end generation in llama.cpp" if not_eog else "HF defines no stop token",
    )


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# ---------------------------------------------------------------------------- export


def export_model(
    hf_dir: str | Path,
    out_path: str | Path,
    quant: str | None = None,
    out_type: str = "f16",
    check: bool = True,
):
    """Write `out_path` (GGUF of `out_type`, quantized to `quant` if given), its Modelfile
    and `<out>.parity.json`; returns the ParityReport.

    The file reaches `out_path` only after it passed the parity check. A file that fails is
    kept for inspection as `<stem>.parity-failed.gguf` with its report beside it, and a
    UserError says what differed.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if quant is not None and quant not in QUANT_TYPES:
        raise UserError(f"quantization type {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    if out_type not in OUT_TYPES:
        raise UserError(f"output type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    unchecked = out_path.with_name(f".{out_path.name}.unchecked")
    try:
        if quant is None:
            write_gguf(hf_dir, unchecked, out_type)
        else:
            intermediate = out_path.with_name(f".{out_path.name}.{out_type}")
            try:
                write_gguf(hf_dir, intermediate, out_type)
                quantize_gguf(intermediate, unchecked, quant)
            finally:
                intermediate.unlink(missing_ok=True)
        report = _check_or_skip(check, hf_dir, unchecked)
        report.details.update({"out_type": out_type, "quant": quant})
        _finish(report, unchecked, out_path, _modelfile(hf_dir, f"./{out_path.name}"))
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    return report


def export_adapter(
    base_hf_dir: str | Path,
    adapter_dir: str | Path,
    out_path: str | Path,
    base_gguf: str | Path,
    check: bool = True,
):
    """Write a PEFT adapter as a GGUF LoRA for `base_gguf`, check base+adapter against the
    merged HF model, and write a Modelfile (FROM base, ADAPTER this) and the parity JSON."""
    import shutil
    import tempfile

    from localalign.gguf_check import check_gguf_file
    from localalign.merge import merge_adapter

    base_hf_dir, adapter_dir, out_path, base_gguf = map(Path, (base_hf_dir, adapter_dir, out_path, base_gguf))
    check_gguf_file(base_gguf)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    unchecked = out_path.with_name(f".{out_path.name}.unchecked")
    try:
        write_lora_gguf(adapter_dir, base_hf_dir, unchecked)
        if check:
            scratch = Path(tempfile.mkdtemp(prefix=".merged-", dir=out_path.parent))
            try:
                merged = merge_adapter(base_hf_dir, adapter_dir, scratch / "merged")
                report = _check_or_skip(True, merged, base_gguf, lora_path=unchecked)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            report = _check_or_skip(False, base_hf_dir, base_gguf)
        report.details.update({"base_gguf": str(base_gguf), "adapter_dir": str(adapter_dir)})
        same_dir = base_gguf.resolve().parent == out_path.resolve().parent
        from_path = f"./{base_gguf.name}" if same_dir else str(base_gguf.resolve())
        modelfile = _modelfile(base_hf_dir, from_path, adapter=f"./{out_path.name}")
        _finish(report, unchecked, out_path, modelfile, key="adapter")
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    return report


def _check_or_skip(check: bool, hf_dir: Path, gguf_path: Path, lora_path: Path | None = None):
    from localalign.parity import ParityReport

    if not check:
        report = ParityReport()
        report.details["checked"] = False
        return report
    report = check_export(hf_dir, gguf_path, lora_path=lora_path)
    report.details["checked"] = True
    return report


def parity_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + ".parity.json")


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def _finish(report, unchecked: Path, out_path: Path, modelfile: str, key: str = "gguf") -> None:
    """Move a checked file into place (or aside, if it failed) and write its JSON/Modelfile."""
    import os

    from localalign.export_modelfile import write_modelfile

    if report.ok:
        os.replace(unchecked, out_path)
        report.details[key] = str(out_path)
        report.write(parity_path(out_path))
        write_modelfile(modelfile_path(out_path), modelfile)
        return
    failed = out_path.with_name(out_path.stem + ".parity-failed" + out_path.suffix)
    os.replace(unchecked, failed)
    report.details[key] = str(failed)
    report.details["status"] = f"FAILED parity: not written to {out_path}; kept as {failed} for inspection"
    report.write(parity_path(failed))
    raise UserError(
        f"export failed its parity check, {report.summary()} (file kept as {failed}, report {parity_path(failed)})"
    )


def _modelfile(hf_dir: Path, from_path: str, adapter: str | None = None) -> str:
    """Modelfile text for an export of `hf_dir`: template and stop strings from its tokenizer."""
    from localalign.export_modelfile import chat_affixes, modelfile_text

    config = read_config(hf_dir)
    vocab = read_vocab(hf_dir, config["vocab_size"])
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    bos_id, eos_id = _special_id(tj, tcfg, "bos"), _special_id(tj, tcfg, "eos")
    bos = vocab.tokens[bos_id] if bos_id is not None else ""
    eos = vocab.tokens[eos_id] if eos_id is not None else ""
    stop_ids = _ids(eos_id) + _ids(gen.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    stops = list(dict.fromkeys(vocab.tokens[i] for i in stop_ids))
    if vocab.chat_template:
        # The special token that opens a user turn: a model that starts writing the user's
        # next turn has finished its own (Ollama's ChatML models stop on it too).
        try:
            user_prefix = chat_affixes(vocab.chat_template, bos, eos).prefix["user"]
            control = [t for t, ty in zip(vocab.tokens, vocab.types) if ty == gguf.TokenType.CONTROL and t]
            stops += [t for t in control if user_prefix.startswith(t) and t not in stops][:1]
        except (ValueError, UserError):
            pass
    return modelfile_text(from_path, vocab.chat_template, stops, bos, eos, adapter_path=adapter)
