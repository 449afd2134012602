"""Fold a LoRA adapter into its base model, giving a plain HF directory for export."""

from __future__ import annotations

from pathlib import Path

from localalign.checks.hf_files import check_adapter_dir
from localalign.fsutil import atomic_dir


def merge_adapter(base_hf_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter, merged, as safetensors + tokenizer + chat template in `out_dir`.

    The directory appears only when complete (temp dir + rename).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_hf_dir, adapter_dir, out_dir = Path(base_hf_dir), Path(adapter_dir), Path(out_dir)
    check_adapter_dir(adapter_dir)
    with atomic_dir(out_dir) as tmp:
        base = AutoModelForCausalLM.from_pretrained(base_hf_dir, dtype=torch.float32, trust_remote_code=False)
        model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_hf_dir, trust_remote_code=False).save_pretrained(tmp)
    return out_dir
