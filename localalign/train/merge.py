"""Fold a LoRA adapter into its base model, giving a plain HF directory for export."""

from __future__ import annotations

import shutil
from pathlib import Path

from localalign.checks.hf_files import check_adapter_dir
from localalign.convert.converter import TOKENIZER_GGUF
from localalign.fsutil import atomic_dir

# What a model directory holds of its tokenizer and chat template (and the GGUF tokenizer an HF
# copy of a GGUF keeps, converter.TOKENIZER_GGUF).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   TOKENIZER_GGUF)


def merge_adapter(base_hf_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter, merged, as safetensors in `out_dir`, with the base's tokenizer and
    chat template files (and its tokenizer.gguf, if it has one: its exports carry that tokenizer).

    The directory appears only when complete (temp dir + rename).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_hf_dir, adapter_dir, out_dir = Path(base_hf_dir), Path(adapter_dir), Path(out_dir)
    check_adapter_dir(adapter_dir)
    with atomic_dir(out_dir) as tmp:
        base = AutoModelForCausalLM.from_pretrained(base_hf_dir, dtype=torch.float32, trust_remote_code=False)
        model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        # The base's tokenizer files as they are: a round trip through transformers 5 rewrites
        # tokenizer_config.json without the added_tokens_decoder llama.cpp's converter types
        # special tokens from (Gemma's <start_of_turn> would be exported as text).
        for name in TOKENIZER_FILES:
            if (base_hf_dir / name).is_file():
                shutil.copyfile(base_hf_dir / name, tmp / name)
    return out_dir
