"""The model families localalign aligns, and every fact that differs between them, in one table.

A family is named by the HF `model_type` of its config and by the `general.architecture`
llama.cpp's converter writes for it. What varies by family and matters to us:

- whether transformers' GGUF loader reads it (so a GGUF of it can be given as the model: its
  HF copy, the one the trainer tunes, is made from the GGUF);
- the linear layers a LoRA adapter trains (Phi-3 fuses q/k/v and gate/up into one layer each);
- the tokens that close an assistant turn (the trainer's loss ends there, generation stops there);
- variables every chat-template rendering passes (Qwen3 and SmolLM3 think unless told not to:
  `enable_thinking = False` makes them write an empty think block, in training data, in
  generation prompts and in the parity probes alike);
- whether the template has a system role (Gemma 2's raises on one: the system prompt is folded
  into the first user turn instead);
- a template for a model that carries none (a pretrained base model's GGUF), used and said so.

Export itself (tensor names, norm offsets, tied embeddings, RoPE variants, pre-tokenizers) is
llama.cpp's converter's business (convert/converter.py); it registers families by HF
architecture, and a family not in this table is refused before anything is written, with one
line naming the families that are here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from localalign.errors import UserError

# Every projection of an attention block and its MLP (Llama, Qwen, Gemma, SmolLM3, Granite,
# OLMo 2, Mistral). Not lm_head or the embeddings: with tied embeddings an adapter on them
# cannot be exported as a GGUF LoRA.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 / Phi-4-mini: one fused q/k/v projection and one fused gate/up projection per block.
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# Gemma 3's instruction-tuned template (string contents only): no system role of its own (a
# system prompt opens the first user turn), "model" as the assistant's role, <end_of_turn> after
# every turn. For Gemma base models, whose GGUFs carry no template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# ChatML, as Qwen's instruction-tuned models write it, for Qwen base models.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# The date a template that prints today's date is given (Llama 3.x: "Today Date: ..."):
# fixed, so the same seeds give the same training data on any day. It is Llama 3.2's own
# default `date_string`.
TEMPLATE_DATE = datetime.date(2024, 7, 26)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF config.json `model_type`
    gguf_archs: tuple[str, ...]  # `general.architecture` of its GGUFs (as llama.cpp's converter writes them)
    examples: str  # the models users know by this family
    hf_from_gguf: bool  # transformers' GGUF loader reads it: a GGUF of it can be aligned
    end_of_turn: tuple[str, ...]  # tokens that close an assistant turn (those in the vocabulary count)
    lora_targets: tuple[str, ...] = LLAMA_TARGETS
    template_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    system_role: bool = True  # False: the system prompt is folded into the first user turn
    fallback_template: str | None = None  # for a model that carries no chat template

    def __post_init__(self) -> None:
        object.__setattr__(self, "template_kwargs", MappingProxyType(dict(self.template_kwargs)))


NO_THINKING = {"enable_thinking": False}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), ("llama",), "Llama 3.x, SmolLM2", True,
           ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "</s>")),
    # llama.cpp's converter writes Mistral models as `llama` (one architecture in llama.cpp).
    # A Mistral GGUF says architecture `llama` (one architecture in llama.cpp) and is read as the
    # llama family; transformers 5.23 reads one named "Mistral" as a model type gguf 0.19 lacks,
    # and the HF copy is refused in one line: give the HF folder.
    Family("mistral", ("mistral",), (), "Mistral 7B, Ministral", False, ("</s>",), system_role=False),
    Family("qwen2", ("qwen2",), ("qwen2",), "Qwen2, Qwen2.5", True, ("<|im_end|>",),
           fallback_template=CHATML_TEMPLATE),
    Family("qwen3", ("qwen3",), ("qwen3",), "Qwen3", True, ("<|im_end|>",), template_kwargs=NO_THINKING,
           fallback_template=CHATML_TEMPLATE),
    Family("gemma2", ("gemma2",), ("gemma2",), "Gemma 2", True, ("<end_of_turn>",), system_role=False,
           fallback_template=GEMMA_TEMPLATE),
    Family("gemma3", ("gemma3_text",), ("gemma3",), "Gemma 3 (text: 270M, 1B)", True, ("<end_of_turn>",),
           fallback_template=GEMMA_TEMPLATE),
    Family("phi3", ("phi3",), ("phi3",), "Phi-3, Phi-3.5, Phi-4-mini", True, ("<|end|>",), lora_targets=PHI3_TARGETS),
    Family("smollm3", ("smollm3",), ("smollm3",), "SmolLM3", False, ("<|im_end|>",), template_kwargs=NO_THINKING),
    Family("granite", ("granite",), ("granite",), "Granite 3.x", False, ("<|end_of_text|>",)),
    Family("olmo2", ("olmo2",), ("olmo2",), "OLMo 2", False, ("<|endoftext|>",)),
)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_GGUF_ARCH = {a: f for f in FAMILIES for a in f.gguf_archs}
assert len(_BY_MODEL_TYPE) == sum(len(f.model_types) for f in FAMILIES), "a model_type in two families"
assert len(_BY_GGUF_ARCH) == sum(len(f.gguf_archs) for f in FAMILIES), "a GGUF architecture in two families"


def supported() -> str:
    """The families, for an error message: "llama (Llama 3.x, SmolLM2), ..."."""
    return ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES)


def family_of_config(config: Mapping[str, Any], where: object = "the model") -> Family:
    """The family of an HF config.json, or a UserError naming the families that are supported."""
    model_type = config.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(f"{where}: model type {model_type!r} is not a family localalign supports; supported: {supported()}")
    return _BY_MODEL_TYPE[model_type]


def family_of_gguf(arch: str | None, where: object = "the model") -> Family:
    """The family of a GGUF's general.architecture, or a UserError naming those supported."""
    if arch not in _BY_GGUF_ARCH:
        raise UserError(f"{where}: GGUF architecture {arch!r} is not a family localalign supports; supported: {supported()}")
    return _BY_GGUF_ARCH[arch]


def find_gguf_family(arch: str | None) -> Family | None:
    """The family of a GGUF architecture, or None (evaluating any GGUF needs no family)."""
    return _BY_GGUF_ARCH.get(arch)


def _fixed_strftime(fmt: str) -> str:
    return TEMPLATE_DATE.strftime(fmt)


def template_variables(family: Family | None) -> dict[str, Any]:
    """What every chat-template rendering passes besides the messages: a fixed date (both as
    Llama 3's `date_string` and as the `strftime_now` transformers offers templates: the
    variable shadows it) and the family's own variables."""
    variables: dict[str, Any] = {"date_string": TEMPLATE_DATE.strftime("%d %b %Y"), "strftime_now": _fixed_strftime}
    if family is not None:
        variables.update(family.template_kwargs)
    return variables


def fold_system(messages: list[dict[str, str]], family: Family | None) -> list[dict[str, str]]:
    """`messages` as a template without a system role takes them: the system prompt opens the
    first user turn (as Gemma 3's own template does). Unchanged for every other family."""
    if family is None or family.system_role or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}] + rest


def end_of_turn_ids(family: Family | None, vocab: Mapping[str, int], eos_ids: Iterable[int | None]) -> list[int]:
    """The ids that end an assistant turn: the model's own eos ids (tokenizer, config,
    generation config) and the family's end-of-turn tokens its vocabulary holds."""
    ids = [int(i) for i in eos_ids if i is not None]
    if family is not None:
        ids += [vocab[t] for t in family.end_of_turn if t in vocab]
    return list(dict.fromkeys(ids))
