"""Writing a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp applies on the base GGUF."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localalign.convert.gguf_writer import gguf_arch_enum, permute_qk, write_atomically
from localalign.convert.hf_reader import arch_spec, read_config
from localalign.errors import UserError


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
    name_map = gguf.get_tensor_name_map(gguf_arch_enum(spec), config["num_hidden_layers"])
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

    return write_atomically(out_path, spec.gguf_arch, fill)
