"""Fold a LoRA adapter into its base model, giving a plain HF directory for export."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from localalign.errors import UserError


def merge_adapter(base_hf_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter, merged, as safetensors + tokenizer + chat template in `out_dir`.

    The directory appears only when complete (temp dir + rename).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_hf_dir, adapter_dir, out_dir = Path(base_hf_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        base = AutoModelForCausalLM.from_pretrained(base_hf_dir, dtype=torch.float32, trust_remote_code=False)
        model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_hf_dir, trust_remote_code=False).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
