"""The other way: a GGUF dequantized into a Hugging Face directory (the copy the trainer
fine-tunes), with transformers' own GGUF reader."""

from __future__ import annotations

import json
from pathlib import Path

from localalign.convert.hf_reader import SUPPORTED_ARCHS
from localalign.errors import UserError
from localalign.fsutil import atomic_dir
from localalign.gguf_header import gguf_architecture, read_gguf_header


def make_hf_copy(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into an HF directory with transformers' own GGUF reader.

    Written to a temp directory and renamed, so an interrupted copy is never taken as done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
