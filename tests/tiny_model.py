"""A tiny random Llama with SmolLM2's real tokenizer, built offline in seconds.

Every pipeline test runs on it. It is shaped like SmolLM2 where it matters to the code
under test: SmolLM2's byte-level BPE tokenizer (which llama.cpp's converter recognises), ChatML
special tokens and chat template, grouped-query attention, tied embeddings. Sizes are multiples
of 32 so q8_0/q4_0 apply. The other families' tiny models are in tiny_families.py.
"""

from __future__ import annotations

from pathlib import Path

# The SmolLM2 chat template without its default system prompt (shorter prompts, same shape).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(out_dir: Path):
    """SmolLM2's own byte-level BPE tokenizer (read from the packaged GGUF, tiny_families) with
    the ChatML template above: a tokenizer llama.cpp's converter recognises by its hash."""
    from tiny_families import bpe_tokenizer

    return bpe_tokenizer(out_dir, CHATML_TEMPLATE)


def build_tiny_llama(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a random tiny Llama + tokenizer as an HF directory and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    from tiny_families import save_random

    return save_random(LlamaForCausalLM, config, out_dir, seed)


def fit_tiny_to_chats(hf_dir: Path, out_dir: Path, pairs: list[tuple[str, str]], steps: int = 150, seed: int = 0) -> Path:
    """Fully fine-tune the tiny model on chat-templated pairs, so it writes turns that end.

    A random model never emits <|im_end|>, so every ISARA candidate would be cut off and
    rejected; end-to-end tests of the loop need a model that produces parseable turns.
    Quality is irrelevant: a few hundred steps on the seeds make it babble in their shape.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    rows = []
    for prompt, response in pairs:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        rows.append(torch.tensor(tok(text)["input_ids"][:256]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids = rows[step % len(rows)][None, :]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    import shutil

    from localalign.train.merge import TOKENIZER_FILES

    for name in TOKENIZER_FILES:  # as they are: a transformers round trip loses what the converter reads
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, out_dir / name)
    return out_dir
