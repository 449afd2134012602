"""A user's model, checked loudly before anything is written: its family, its size, its
tokenizer, chat template and end-of-turn tokens. Read from the files alone (GGUF header,
config.json, safetensors headers, tokenizer.json): nothing heavy loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from localalign.chat import read_hf_chat_template
from localalign.errors import UserError
from localalign.families import Family, family_of_config, family_of_gguf
from localalign.gguf_header import read_gguf_layout


@dataclass(frozen=True)
class ModelDims:
    """What sizes a model's costs: parameters and the shapes its cost formulas take."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # output layer shares the token embeddings

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def config(self) -> dict:
        """The HF config.json fields that train/layout.model_dims reads."""
        return {"hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab}


@dataclass
class ModelReport:
    name: str
    kind: str  # "GGUF" or "HF folder"
    family: Family
    dims: ModelDims
    template: str  # where the chat template comes from
    end_of_turn: list[str]
    quant: str = ""  # a GGUF's file type
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        d = self.dims
        lines = [f"  family:       {self.family.name} ({self.family.examples})",
                 f"  form:         {self.kind}" + (f", {self.quant}" if self.quant else ""),
                 f"  size:         {d.params / 1e9:.2f} B parameters ({d.layers} layers, hidden {d.hidden}, "
                 f"vocabulary {d.vocab}{', tied embeddings' if d.tied else ''})",
                 f"  chat template: {self.template}",
                 f"  end of turn:  {', '.join(self.end_of_turn)}"]
        return "\n".join(lines + [f"  note:         {n}" for n in self.notes])


def inspect_model(name: str, gguf: Path | None, hf_dir: Path | None) -> ModelReport:
    """The report for a model given as an HF folder (preferred: it is what is trained) or a GGUF."""
    if hf_dir is not None:
        return inspect_hf(name, hf_dir)
    if gguf is not None:
        return inspect_gguf(name, gguf)
    raise UserError(f"{name}: neither a GGUF nor an HF folder")


def inspect_gguf(name: str, path: Path) -> ModelReport:
    """A GGUF as the way in: a family transformers can read back (its HF copy is what trains), a
    tokenizer, a chat template (its own or its family's), an end-of-turn token in its vocabulary."""
    layout = read_gguf_layout(path)
    meta = layout.meta
    family = family_of_gguf(meta.get("general.architecture"), path)
    if not family.hf_from_gguf:
        raise UserError(f"{path}: transformers cannot read a {family.name} GGUF ({family.examples}), so it cannot be "
                        "trained from this file; give the model's Hugging Face folder (safetensors) instead")
    if "tokenizer.ggml.model" not in meta or not layout.array_lengths.get("tokenizer.ggml.tokens"):
        raise UserError(f"{path}: the GGUF carries no tokenizer")
    arch = meta["general.architecture"]
    hidden, heads = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.attention.head_count"])
    dims = ModelDims(
        params=sum(layout.tensors.values()), hidden=hidden, intermediate=int(meta.get(f"{arch}.feed_forward_length", 0)),
        layers=int(meta[f"{arch}.block_count"]), heads=heads,
        kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        vocab=layout.array_lengths["tokenizer.ggml.tokens"], tied="output.weight" not in layout.tensors)
    template = "its own" if meta.get("tokenizer.chat_template") else _fallback(family, path)
    eot = _gguf_end_of_turn(path, family, meta)
    from gguf import LlamaFileType

    try:
        quant = LlamaFileType(int(meta.get("general.file_type", -1))).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        quant = f"file type {meta.get('general.file_type')}"
    notes = [] if meta.get("tokenizer.chat_template") else [
        "a GGUF without a chat template is often a pretrained base model, whose turn tokens were never "
        "trained: measured on gemma3-270m, it never ended a turn and no sample passed the filters "
        "(docs/benchmarks.md); an instruction-tuned checkpoint aligns"]
    return ModelReport(name, "GGUF", family, dims, template, eot, quant=quant, notes=notes)


def _fallback(family: Family, where: Path) -> str:
    if family.fallback_template is None:
        raise UserError(f"{where}: the model has no chat template, and the {family.name} family has none to lend")
    return f"none of its own: the {family.name} family's (localalign/families.py) will be used and exported"


def _gguf_end_of_turn(path: Path, family: Family, meta: dict) -> list[str]:
    """The family's end-of-turn tokens in the GGUF's vocabulary, and its eos token."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    wanted = set(family.end_of_turn)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    found = []
    for i, part in enumerate(field.data):
        if i == eos or len(field.parts[part]) < 40:
            text = bytes(field.parts[part]).decode("utf-8", "replace")
            if text in wanted or i == eos:
                found.append(text)
    if not found:
        raise UserError(f"{path}: no end-of-turn token ({', '.join(family.end_of_turn)}) and no eos token in its vocabulary")
    return list(dict.fromkeys(found))


def inspect_hf(name: str, hf_dir: Path) -> ModelReport:
    """An HF folder (check_hf_dir has checked its files): a family in the table, a chat template,
    an end-of-turn token in the tokenizer's vocabulary."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    family = family_of_config(config, hf_dir)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    shapes = _safetensors_shapes(hf_dir)
    params = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        params += n
    dims = ModelDims(
        params=params, hidden=hidden, intermediate=int(config.get("intermediate_size", 0)),
        layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=int(config.get("head_dim") or hidden // heads),
        vocab=int(config["vocab_size"]), tied="lm_head.weight" not in shapes)
    template = read_hf_chat_template(hf_dir)
    if not template:
        raise UserError(f"{hf_dir}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
    origin = ("the " + family.name + " family's (localalign/families.py: the model came without one)"
              if template == family.fallback_template else "its own")
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t["content"] for t in tj.get("added_tokens", [])} | set((tj.get("model") or {}).get("vocab") or {})
    eot = [t for t in family.end_of_turn if t in vocab]
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    eos = tcfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and eos in vocab and eos not in eot:
        eot.append(eos)
    if not eot:
        raise UserError(f"{hf_dir}: no end-of-turn token ({', '.join(family.end_of_turn)}) and no eos token in the tokenizer")
    return ModelReport(name, "HF folder", family, dims, origin, eot)


def _safetensors_shapes(hf_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes
