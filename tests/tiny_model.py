"""A tiny random Llama with a real byte-level BPE tokenizer, built offline in seconds.

Every pipeline test runs on it. It is shaped like SmolLM2 where it matters to the code
under test: a GPT-2-style byte-level BPE tokenizer, ChatML special tokens and chat template,
grouped-query attention, tied embeddings. Sizes are multiples of 32 so q8_0/q4_0 apply.
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
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "I can't help with that, because it could hurt someone. I can suggest a safer option instead.",
    "Water boils at 100 degrees Celsius at sea level; at altitude it boils at a lower temperature.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Write exactly three bullet points:\n- one\n- two\n- three\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 and unicode café naïve 東京 🙂",
    "Q: What is the capital of France? A: Paris is the capital of France.",
    "Safety matters: never mix bleach and ammonia, they release toxic chloramine gas.",
    "user assistant system prompt response question answer helpful honest harmless",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer (its regex), which llama.cpp knows as "gpt-2".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        add_bos_token=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a random tiny Llama + tokenizer as an HF directory and return it."""
    import torch
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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits; a larger scale makes the tiny model
    # prefer some tokens, so greedy decoding and top-1 comparisons test something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


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
    tok.save_pretrained(out_dir)
    return out_dir
