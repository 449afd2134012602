"""Writing an HF model as a GGUF file of f32, f16 or bf16, with the `gguf` library's tensor-name
map and `SpecialVocab`; the file appears only when complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np

from localalign.convert.hf_reader import (
    ArchSpec,
    VocabInfo,
    arch_spec,
    llama3_rope_factors,
    read_config,
    read_vocab,
    rope_params,
    rope_theta,
    rope_type,
)
from localalign.errors import UserError
from localalign.fsutil import commit_temp, disk_full_error, temp_path_for

# Output float types, and the general.file_type each is recorded as (llama.cpp's llama_ftype).
FLOAT_FILE_TYPES: dict[str, int] = {
    "f32": int(gguf.LlamaFileType.ALL_F32),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
    "bf16": int(gguf.LlamaFileType.MOSTLY_BF16),
}
OUT_TYPES = tuple(FLOAT_FILE_TYPES)


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
    name_map = gguf.get_tensor_name_map(gguf_arch_enum(spec), n_layers)
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


def gguf_arch_enum(spec: ArchSpec):
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

    return write_atomically(out_path, spec.gguf_arch, fill)


def write_atomically(out_path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
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
    w.add_file_type(FLOAT_FILE_TYPES[out_type])


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


