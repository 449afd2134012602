"""The other way: a GGUF dequantized into a Hugging Face directory (the copy the trainer
fine-tunes), with transformers' own GGUF reader.

The copy keeps the GGUF's tokenizer as it came, in `tokenizer.gguf` (converter.TOKENIZER_GGUF),
so that every export of the copy writes that tokenizer back unchanged; transformers' rebuild
of a GGUF tokenizer serves the trainer, and the copy check (checks/parity.check_copy) holds the
two to the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from localalign.convert.converter import TOKENIZER_GGUF, extract_vocab
from localalign.errors import UserError
from localalign.families import Family, family_of_gguf
from localalign.fsutil import atomic_dir
from localalign.gguf_header import read_gguf_header


def make_hf_copy(gguf: Path, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Dequantize a GGUF into an HF directory with transformers' own GGUF reader.

    Refused in one line for a family transformers cannot read from GGUF, or a model without a
    chat template whose family has none to lend. Written to a temp directory and renamed, so
    an interrupted copy is never taken as done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    header = read_gguf_header(gguf)
    family = family_of_gguf(header.get("general.architecture"), gguf)
    if not family.hf_from_gguf:
        raise UserError(
            f"{gguf}: transformers cannot read a {family.name} GGUF ({family.examples}), so it cannot be trained "
            "from this file; give the model's Hugging Face folder (safetensors) instead"
        )
    template = header.get("tokenizer.chat_template") or None
    if template is None and family.fallback_template is None:
        raise UserError(f"{gguf}: the model has no chat template, and the {family.name} family has none to lend")
    with atomic_dir(out_dir) as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
            config = config_from_gguf(gguf, header)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32, trust_remote_code=False
            )
        except (NotImplementedError, ValueError, RuntimeError, KeyError, OSError) as e:
            raise UserError(f"{gguf}: transformers could not read this {family.name} GGUF: {str(e).splitlines()[0][:300]}") from None
        model.hf_quantizer = None  # the weights are dequantized; save_pretrained refuses otherwise
        if hasattr(model.config, "quantization_config"):
            # Left in, it makes every later load look for the GGUF again.
            del model.config.quantization_config
        if template is None:
            tokenizer.chat_template = family.fallback_template
            log(f"{gguf.name}: the model has no chat template; using the {family.name} family's "
                "(localalign/families.py), which its exports will carry")
        _stop_at_end_of_turn(model, tokenizer, family)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _restore_pre_tokenizer(tmp / "tokenizer.json", header.get("tokenizer.ggml.pre"))
        extract_vocab(gguf, tmp / TOKENIZER_GGUF)


def config_from_gguf(gguf: Path, header: dict):
    """transformers' config of a GGUF, with what its reader leaves at a default set from the
    header as llama.cpp reads it: the attention head size (transformers assumes Qwen3's 128), and
    for Gemma the query scale, which llama.cpp takes from the head size (all but the 27B)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    arch = header.get("general.architecture")
    key_length = header.get(f"{arch}.attention.key_length")
    if key_length is not None and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = int(key_length)
    if key_length is not None and hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = int(key_length)
    return config


def _stop_at_end_of_turn(model, tokenizer, family: Family) -> None:
    """Add the family's end-of-turn tokens to the generation config's stop ids: a base model's
    GGUF names only its end-of-text token, and Gemma's turns end with <end_of_turn>."""
    gen = model.generation_config
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [i for i in stops if i is not None]
    vocab = tokenizer.get_vocab()
    for token in family.end_of_turn:
        if token in vocab and vocab[token] not in stops:
            stops.append(vocab[token])
    if stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]


# transformers rebuilds a GGUF's BPE tokenizer with GPT-2's pre-tokenizer whatever the GGUF's
# `tokenizer.ggml.pre` says. For these pre-tokenizers llama.cpp first splits every digit on
# its own (llama-vocab.cpp puts "\\p{N}" before the GPT-2 regex). SmolLM2's vocab happens to
# hold no merges across digits, so its probes agree either way, but a vocab that has them
# would tokenize "2024" differently; we restore the original pre-tokenizer so the HF copy
# is the model's real tokenizer.
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
