"""Checks of a Hugging Face directory made before anything heavy loads it: safetensors only,
headers that parse, a tokenizer.json, a chat template the sandbox accepts."""

from __future__ import annotations

import json
from pathlib import Path

from localalign.chat import TemplateRefused, read_hf_chat_template, render_chat
from localalign.errors import UserError

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
    template = read_hf_chat_template(d)
    if not template:
        raise UserError(f"{d}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
    # transformers renders it in a sandbox too, but its refusal would surface as a traceback
    # mid-training; a template that reaches for Python internals is refused here, up front.
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
