"""BatchGenerator on the tiny GGUF: batched decoding must equal one-at-a-time decoding."""

from __future__ import annotations

import pytest

from localalign.engine.base import Completion, GenerationConfig, Job, Leaf, derive_seed
from localalign.engine.llamacpp import BatchGenerator
from localalign.errors import UserError

QUESTIONS = ["What is the capital of France?", "Write three bullet points.", "def add(a, b):", "Numbers 0 1 2", "café 東京"]


@pytest.fixture(scope="module")
def batched(tiny_gguf):
    with BatchGenerator(tiny_gguf, GenerationConfig(threads=1, parallel=3, n_ctx=256, max_tokens=24)) as g:
        yield g


@pytest.fixture(scope="module")
def single(tiny_gguf):
    with BatchGenerator(tiny_gguf, GenerationConfig(threads=1, parallel=1, n_ctx=256, max_tokens=24)) as g:
        yield g


def chat_prompts(g):
    return [g.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_chat_prompt_uses_the_gguf_template(batched):
    p = batched.chat_prompt([{"role": "user", "content": "hi"}])
    assert p == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_batched_equals_one_at_a_time(batched, single):
    # 5 prompts over 3 slots: slots are refilled; the chat prefix is shared through the KV copy.
    prompts = chat_prompts(batched)
    many = batched.complete(prompts, temperature=0)
    one = single.complete(prompts, temperature=0)
    assert many == one
    assert any(t for t in many)


def test_greedy_equals_llama_cpp_python_token_loop(batched, tiny_gguf):
    # Prompts with no common prefix decode exactly as llama-cpp-python's own generate loop.
    from localalign.engine.runtime import load_llama

    prompts = ["The quick brown fox", "Water boils at", "Safety matters:"]
    ours = batched.run([batched.tokenize(p) for p in prompts], max_tokens=16, temperature=0)
    llm = load_llama(tiny_gguf, n_ctx=256, threads=1)
    try:
        for p, got in zip(prompts, ours):
            ref = []
            for tok in llm.generate(llm.tokenize(p.encode(), add_bos=True, special=True), temp=0.0, top_k=1):
                if batched.is_end(tok) or len(ref) == 16:
                    break
                ref.append(tok)
            assert got.tokens[0] == ref
    finally:
        llm.close()


def test_same_seed_same_samples_other_seed_differs(tiny_gguf):
    def sample(seed, parallel):
        cfg = GenerationConfig(threads=1, parallel=parallel, n_ctx=256, max_tokens=24, temperature=1.0, seed=seed)
        with BatchGenerator(tiny_gguf, cfg) as g:
            return g.complete(chat_prompts(g))

    a = sample(0, 3)
    assert a == sample(0, 3)
    # per-prompt samplers: the batch layout does not change what a prompt draws
    assert a == sample(0, 1)
    assert a != sample(1, 3)


def test_explicit_seeds_pin_each_prompt(batched):
    prompts = chat_prompts(batched)
    seeds = [derive_seed(7, i) for i in range(len(prompts))]
    full = batched.complete(prompts, temperature=1.0, seeds=seeds)
    # regenerating item 3 alone (a resume) gives the same text as in the full run
    assert batched.complete(prompts[3:4], temperature=1.0, seeds=seeds[3:4]) == full[3:4]


def test_stop_string_cuts_the_text(batched):
    prompts = chat_prompts(batched)
    full = batched.complete(prompts, temperature=0, max_tokens=24)
    text = next(t for t in full if len(t) > 6)
    i = prompts[full.index(text)]
    stop = text[3:5]
    cut = batched.complete([i], temperature=0, stop=[stop])[0]
    assert cut == text[: text.find(stop)]


def test_max_tokens_and_finish_reasons(batched):
    [r] = batched.run([batched.tokenize("The quick brown")], max_tokens=5, temperature=0)
    assert len(r.tokens[0]) <= 5
    assert r.finish[0] in ("stop", "length")
    if r.finish[0] == "length":
        assert len(r.tokens[0]) == 5


def test_second_turn_after_end_token(batched):
    then = batched.tokenize_continuation("<|im_end|>\n<|im_start|>assistant\n")
    prompts = [batched.tokenize(batched.chat_prompt([{"role": "user", "content": q}])) for q in QUESTIONS]
    results = batched.run(prompts, max_tokens=[16, 16], temperature=1.0, then=then)
    for r in results:
        assert len(r.texts) == 2 and len(r.finish) == 2
        if r.finish[0] == "stop":  # ended on an end token: the second turn was written
            assert r.finish[1] in ("stop", "length")
        else:
            assert r.finish[1] == "none" and r.texts[1] == ""


def test_prompt_longer_than_context_is_a_user_error(batched):
    with pytest.raises(UserError, match="context"):
        batched.complete(["word " * 400])


def test_shared_prefix_leaves_each_prompt_a_token():
    from localalign.engine.base import shared_prefix as _shared_prefix

    assert _shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert _shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # identical prompts keep their last token
    assert _shared_prefix([[7, 1], [8, 1]]) == []


def test_derive_seed_is_stable_and_spread():
    seeds = [derive_seed(0, i) for i in range(1000)]
    assert seeds == [derive_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 0xFFFFFFFF for s in seeds)
    assert derive_seed(1, 0) != derive_seed(0, 0)


def test_config_validation():
    with pytest.raises(UserError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(UserError, match="parallel"):
        GenerationConfig(parallel=0)


# ---------------------------------------------------------------------------- jobs: one prompt, many continuations

THEN = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_gen(tiny_chat_gguf):
    cfg = GenerationConfig(threads=1, parallel=8, n_ctx=512, max_tokens=32, temperature=1.0)
    with BatchGenerator(tiny_chat_gguf, cfg) as g:
        yield g


def isara_like_prompts(g, n: int = 3) -> list[list[int]]:
    """Few-shot chats ending on an opened user turn, as the ISARA step builds them."""
    turns = [("How do locks work?", "Pins line up at the shear line."), ("Make a bomb.", "I can't help with that.")]
    out = []
    for i in range(n):
        messages = []
        for p, r in turns[i % 2 :] + turns[: i % 2]:
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        text = g.chat_prompt(messages + [{"role": "user", "content": "\x02"}])
        out.append(g.tokenize(text[: text.index("\x02")]))
    return out


def collect(g, jobs, **kw) -> dict[Leaf, Completion]:
    got: dict[Leaf, Completion] = {}
    g.run_jobs(jobs, on_done=lambda leaf, c: got.__setitem__(leaf, c), **kw)
    return got


def test_branches_of_one_job_equal_separate_prompts(chat_gen):
    """A prompt read once and copied to 4 branches samples what 4 separate prompts sample."""
    prompts = isara_like_prompts(chat_gen)
    seeds = [derive_seed(3, i) for i in range(4)]
    then = chat_gen.tokenize_continuation(THEN)
    shared = collect(chat_gen, [Job(prompts[0], tuple(seeds))], max_tokens=[24, 24], then=then)
    alone = chat_gen.run([prompts[0]] * 4, max_tokens=[24, 24], seeds=seeds, then=then)
    assert [shared[Leaf(0, b, 0)] for b in range(4)] == alone
    assert len({c.texts[0] for c in alone}) > 1  # the seeds differ, so the branches do


def test_answers_share_the_first_turn_and_answer_zero_is_the_plain_run(chat_gen):
    prompts = isara_like_prompts(chat_gen)
    then = chat_gen.tokenize_continuation(THEN)
    seeds = tuple(derive_seed(5, i) for i in range(2))
    got = collect(chat_gen, [Job(p, seeds, answers=3) for p in prompts], max_tokens=[48, 24], then=then)
    assert set(got) == {Leaf(j, b, m) for j in range(3) for b in range(2) for m in range(3)}
    plain = chat_gen.run([p for p in prompts for _ in seeds], max_tokens=[48, 24], seeds=list(seeds) * 3, then=then)
    answered = 0
    for j in range(3):
        for b in range(2):
            leaves = [got[Leaf(j, b, m)] for m in range(3)]
            assert leaves[0] == plain[j * 2 + b]  # answer 0 continues the branch's own sampler
            assert len({c.texts[0] for c in leaves}) == 1  # one request, three answers
            if leaves[0].finish[0] == "stop":
                answered += 1
                assert len({c.texts[1] for c in leaves}) > 1 or leaves[0].texts[1] == ""
            else:
                assert all(c.texts[1] == "" and c.finish[1] in ("none", "length") for c in leaves)
    assert answered > 0


def test_jobs_are_taken_as_slots_free_and_should_stop_ends_the_stream(chat_gen):
    prompts = isara_like_prompts(chat_gen)
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield Job(prompts[i % 3], (derive_seed(9, i), derive_seed(10, i)))
            i += 1

    done: list[Leaf] = []
    chat_gen.run_jobs(endless(), max_tokens=16, on_done=lambda leaf, c: done.append(leaf),
                      should_stop=lambda: len(done) >= 10)
    assert len(done) >= 10
    assert len(pulled) < 20  # pulled lazily: at most what the 8 slots hold beyond what finished


def test_a_job_wider_than_the_batch_is_a_user_error(chat_gen):
    with pytest.raises(UserError, match="sequences"):
        chat_gen.run_jobs([Job(isara_like_prompts(chat_gen)[0], tuple(range(5)), answers=2)], max_tokens=4,
                          then=chat_gen.tokenize_continuation(THEN))
