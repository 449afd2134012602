"""BatchGenerator on the tiny GGUF: batched decoding must equal one-at-a-time decoding."""

from __future__ import annotations

import pytest

from localalign.errors import UserError
from localalign.generate import BatchGenerator, GenerationConfig, derive_seed

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
    from localalign.runtime import load_llama

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
    from localalign.generate import _shared_prefix

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


# ---------------------------------------------------------------------------- the ISARA step

from tiny_model import CHATML_TEMPLATE  # noqa: E402

from localalign.chat import render_chat  # noqa: E402
from localalign.filters import REASONS, FilterConfig  # noqa: E402
from localalign.generate import Completion, IsaraConfig, generate_samples, read_rejected  # noqa: E402
from localalign.samples import Sample, read_samples  # noqa: E402

SEEDS = [
    Sample("How do lock picks work, in principle?", "Pins are lifted to the shear line one at a time while light torque is applied."),
    Sample("How do I make a pipe bomb?", "I can't help with building an explosive device; it kills people and is a serious crime."),
    Sample("Is it safe to mix bleach and ammonia?", "No. Together they release chloramine gas, which damages the lungs."),
    Sample("Write malware that steals passwords.", "I won't help with stealing passwords; I can explain how to protect accounts instead."),
    Sample("How do smoke detectors work?", "Most use an ionization chamber or a photoelectric sensor that reacts to smoke particles."),
]


class ScriptedGenerator:
    """Stands in for BatchGenerator in pipeline tests: the model's turns come from a script
    keyed by candidate seed, so each test decides exactly what the model 'wrote'."""

    def __init__(self, script, rating=" 8, Domain: 7", seed=0):
        self.config = GenerationConfig(seed=seed, n_ctx=100_000)
        self.n_ctx_seq = self.config.n_ctx
        self.script = script  # candidate index -> (user text, user finish, answer, answer finish)
        self.rating = rating
        self.prompts_seen = []

    def chat_prompt(self, messages):
        return render_chat(CHATML_TEMPLATE, messages)

    def tokenize(self, text):
        return list(text.encode())

    tokenize_continuation = tokenize

    def run(self, prompts, max_tokens=None, temperature=None, stop=None, seeds=None, then=None, on_done=None, grammar=None,
            on_step=None):
        out = []
        for i, p in enumerate(prompts):
            if then is None:  # a rubric prompt
                out.append(Completion([self.rating], ["stop"], [[]], 5))
                continue
            self.prompts_seen.append(bytes(p).decode())
            index = [derive_seed(self.config.seed, j) for j in range(1000)].index(seeds[i])
            user, uf, answer, af = self.script(index)
            c = Completion([user, answer], [uf, af], [[], []], 10)
            if on_done:
                on_done(i, c)
            out.append(c)
        return out


def distinct(i):
    topics = ["carbon monoxide alarms", "storing kitchen knives", "fireworks near dry grass", "sharing passwords",
              "lithium battery fires", "swimming after eating", "ladder safety on stairs", "space heaters overnight"]
    topic = topics[i % len(topics)]
    return (f"What should I know about {topic}?", "stop",
            f"Here is the short version about {topic}: read the manual, check it yearly, ask a professional.", "stop")


def test_pipeline_accepts_distinct_pairs_and_writes_files(embedder, tmp_path):
    gen = ScriptedGenerator(distinct)
    acc, rej = generate_samples(
        gen, embedder, SEEDS, n=5, isara=IsaraConfig(k=3, batch_candidates=4),
        samples_path=tmp_path / "s.jsonl", rejected_path=tmp_path / "r.jsonl",
    )
    assert len(acc) == 5
    assert all(s.source == "generated" and s.scores["quality"] == 8 and s.scores["domain"] == 7 for s in acc)
    assert [s.meta["index"] for s in acc] == sorted(s.meta["index"] for s in acc)
    assert all(len(s.meta["examples"]) == 3 for s in acc)
    assert read_samples(tmp_path / "s.jsonl") == acc
    assert read_rejected(tmp_path / "r.jsonl") == rej
    # each prompt shows k examples as turns and ends on an opened user turn, nothing else
    assert all(p.count("<|im_start|>user\n") == 4 and p.endswith("<|im_start|>user\n") for p in gen.prompts_seen)


def test_pipeline_rejects_with_reasons(embedder):
    def script(i):
        return [
            ("How do I", "length", "", "none"),  # truncated request
            ("", "stop", "Some answer that is long enough.", "stop"),  # empty
            ("Tell me about <|im_start|> tokens please", "stop", "They are template markers, not text.", "stop"),  # leak
            (SEEDS[1].prompt, "stop", "A different answer, long enough to count.", "stop"),  # copy of a seed/example
            ("What should I know about carbon monoxide alarms?", "stop",
             "Here is the short version about carbon monoxide alarms: read the manual, check it yearly, ask a professional.", "stop"),
            ("What should I know about carbon monoxide alarms??", "stop",
             "Here is the short version about carbon monoxide alarms: read the manual, check it yearly, ask a professional!", "stop"),
        ][i % 6]

    acc, rej = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, isara=IsaraConfig(k=2, batch_candidates=6))
    reasons = [s.reject_reason for s in sorted(rej, key=lambda s: s.meta["index"])]
    assert len(acc) == 1 and acc[0].meta["index"] == 4
    # index 3 copies SEEDS[1]'s prompt: either a copy of one of its examples or a duplicate of a seed
    assert reasons[:3] == ["truncated_prompt", "empty", "leak"]
    assert reasons[3] in ("copies_example", "duplicate")
    assert set(reasons) <= set(REASONS)
    # candidate 5 is a near-duplicate of candidate 4, accepted earlier in the same pass
    five = next(s for s in rej if s.meta["index"] == 5)
    assert five.reject_reason == "duplicate" and five.scores["max_similarity"] > 0.9


def test_pipeline_rating_threshold_and_unparseable_rating(embedder):
    acc, rej = generate_samples(ScriptedGenerator(distinct, rating=" 3, Domain: 9"), embedder, SEEDS, n=2,
                                isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"low_rating"}
    acc, rej = generate_samples(ScriptedGenerator(distinct, rating=" great"), embedder, SEEDS, n=2,
                                isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"unrated"}
    acc, _ = generate_samples(ScriptedGenerator(distinct, rating=" great"), embedder, SEEDS, n=2,
                              filters=FilterConfig(rate=False))
    assert len(acc) == 2


def test_pipeline_resume_continues_after_the_last_index(embedder):
    first_acc, first_rej = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=3, isara=IsaraConfig(batch_candidates=3))
    full_acc, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, isara=IsaraConfig(batch_candidates=3))
    resumed_acc, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, isara=IsaraConfig(batch_candidates=3),
                                      resume=(first_acc, first_rej))
    assert [s.meta["index"] for s in resumed_acc] == [s.meta["index"] for s in full_acc]
    assert resumed_acc == full_acc


def test_pipeline_on_the_tiny_model(tiny_gguf, embedder, tmp_path):
    # A random model writes noise: the point is that every candidate is accounted for,
    # with a declared reason, and that a second run with the same seed writes the same files.
    def once(out):
        cfg = GenerationConfig(threads=1, parallel=4, n_ctx=512, seed=3)
        with BatchGenerator(tiny_gguf, cfg) as g:
            acc, rej = generate_samples(
                g, embedder, SEEDS, n=2, isara=IsaraConfig(k=2, max_prompt_tokens=24, max_response_tokens=24,
                                                          batch_candidates=6, max_candidates_factor=3),
                samples_path=out / "s.jsonl", rejected_path=out / "r.jsonl",
            )
        return acc, rej, (out / "r.jsonl").read_text()

    acc, rej, text = once(tmp_path / "a")
    assert len(acc) + len(rej) == 6 or len(acc) == 2
    assert all(s.reject_reason in REASONS for s in rej)
    assert text == once(tmp_path / "b")[2]
