"""MC1 scoring by log-likelihood, on the tiny model (GGUF via llama.cpp, checked against HF)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from localalign.engine.llamacpp import continuation_logprobs, log_softmax
from localalign.engine.runtime import load_llama
from localalign.errors import UserError
from localalign.evaluation.suites.truthfulness import load_mc_items, mc1_pick, per_byte


@pytest.fixture(scope="module")
def scorer(tiny_gguf):
    llm = load_llama(tiny_gguf, n_ctx=256, threads=1, logits_all=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_hf_dir)


def hf_logprob(model, prompt_ids: list[int], cont: list[int]) -> float:
    """Independent reference: one HF forward pass over prompt + continuation."""
    ids = torch.tensor([prompt_ids + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(cont) - 1)
    return float(sum(logp[p, t] for p, t in zip(positions, cont)))


def test_logprobs_match_hf(scorer, hf):
    model, tok = hf
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in ["Paris is the capital.", "Water boils", "x"]]
    ours = continuation_logprobs(scorer, prompt_ids, conts)
    ref = [hf_logprob(model, prompt_ids, c) for c in conts]
    # f32 llama.cpp vs torch: per-token differences ~1e-3 on this large-logit random model;
    # a position off by one would be off by whole nats.
    assert np.allclose(ours, ref, rtol=2e-4, atol=2e-3), (ours, ref)
    # a second call reuses nothing stale: same answers
    assert np.allclose(continuation_logprobs(scorer, prompt_ids, conts[::-1]), ours[::-1], atol=1e-5)


def test_mc1_picks_the_answer_the_model_is_biased_toward(scorer, hf):
    """The model's own greedy continuation must beat random continuations of the same length."""
    model, tok = hf
    prompt_ids = tok("Q: What is the capital of France? A:", add_special_tokens=False)["input_ids"]
    favoured: list[int] = []
    for _ in range(5):  # greedy, from llama.cpp's own logits
        continuation_logprobs(scorer, prompt_ids + favoured, [[0]])
        favoured.append(int(np.argmax(scorer.scores[len(prompt_ids) + len(favoured) - 1])))
    rng = np.random.default_rng(0)
    specials = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in specials]
    others = [[int(t) for t in rng.choice(vocab, size=len(favoured))] for _ in range(3)]
    choices = others[:2] + [favoured] + others[2:]  # the favoured answer at index 2, not 0
    logprobs = continuation_logprobs(scorer, prompt_ids, choices)
    assert mc1_pick(logprobs) == 2, logprobs
    # and the least likely continuation is picked when we flip the sign: the argmax is real
    assert mc1_pick([-x for x in logprobs]) != 2


def test_mc1_pick_ties_go_to_lowest_index():
    assert mc1_pick([-1.0, -0.5, -0.5]) == 1
    assert mc1_pick([-3.0, -2.0, -1.0, -4.0]) == 2


def test_per_byte_normalization_removes_the_length_penalty():
    # A long answer with a lower sum but a higher per-byte likelihood wins after normalizing.
    choices = ["No", "No, warts are caused by a human virus"]
    sums = [-4.0, -20.0]
    assert mc1_pick(sums) == 0
    assert mc1_pick(per_byte(sums, choices)) == 1
    assert per_byte([-6.0], ["caf\u00e9"]) == [-6.0 / 5]  # bytes, not characters


def test_log_softmax_is_normalised():
    x = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    out = log_softmax(x)
    assert np.allclose(np.exp(out).sum(axis=-1), 1.0)
    assert out[0, 0] == pytest.approx(0.0)


def test_load_mc_items_validates(tmp_path, seeds_dir):
    items = load_mc_items(seeds_dir / "truthfulness.heldout.jsonl")
    assert len(items) >= 30 and all(0 <= it.answer < len(it.choices) for it in items)
    bad = tmp_path / "bad.jsonl"
    for row, message in [
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "index"),
        ({"prompt": "q", "choices": ["a", "a"], "answer": 0}, "distinct"),
        ({"prompt": "", "choices": ["a", "b"], "answer": 0}, "prompt"),
        ({"prompt": "q", "choices": "ab", "answer": 0}, "choices"),
    ]:
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(UserError, match=message):
            load_mc_items(bad)
