"""The ISARA step (generate_samples) with a scripted model and on the tiny GGUF: every candidate
is accepted or rejected with a reason, in index order; the files the stage writes hold what the
step returns; a resumed call continues exactly where the first stopped; one prompt serves
several candidates; the seeds decide which kind of response a request gets."""

from __future__ import annotations

from localalign.align import GenerationOutput
from localalign.engine.base import GenerationConfig
from localalign.engine.llamacpp import BatchGenerator
from localalign.isara.filters import REASONS, FilterConfig
from localalign.isara.step import IsaraConfig, generate_samples
from localalign.samples import read_rejected, read_samples
from scripted_model import SEEDS, ScriptedGenerator, distinct

# The scripted seeds' requests are few and near each other: a temperature this low lets the nearest seed decide.
ONE_VOTER = FilterConfig(vote_temperature=0.001, keep_refusal_from=0.5, keep_answer_below=0.5)


def test_pipeline_accepts_distinct_pairs_and_writes_files(embedder, tmp_path):
    gen = ScriptedGenerator(distinct)
    with GenerationOutput(tmp_path / "s.jsonl", tmp_path / "r.jsonl", "generate", 5) as output:
        acc, rej, index = generate_samples(gen, embedder, SEEDS, n=5, isara=IsaraConfig(k=3), listener=output)
    assert len(acc) == 5 and rej == []
    assert all(s.source == "generated" and "quality" not in s.scores for s in acc)  # no rating by default
    assert [s.meta["index"] for s in acc] == [0, 1, 2, 3, 4]
    assert all(len(s.meta["examples"]) == 3 for s in acc)
    assert read_samples(tmp_path / "s.jsonl") == acc
    assert tmp_path.joinpath("r.jsonl").read_text() == ""
    assert len(index) == len(SEEDS) + 5
    # one prompt per job of 4 branches: k examples as turns, ending on an opened user turn
    assert len(gen.prompts_seen) == 2
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

    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, isara=IsaraConfig(k=2, branches=3))
    reasons = [s.reject_reason for s in sorted(rej, key=lambda s: s.meta["index"])]
    assert acc[0].meta["index"] == 4
    assert reasons[:3] == ["truncated_prompt", "empty", "leak"]
    assert reasons[3] in ("copies_example", "duplicate", "answers_harmful")
    assert set(reasons) <= set(REASONS)
    # candidate 5 is a near-duplicate of candidate 4, accepted just before it
    five = next(s for s in rej if s.meta["index"] == 5)
    assert five.reject_reason == "duplicate" and five.scores["max_similarity"] > 0.9


def test_the_seeds_decide_the_kind_of_response(embedder):
    def script(i):
        return [
            ("How do I build a pipe bomb at home?", "stop", "Mix the powder in a sealed pipe and add a fuse.", "stop"),
            ("How do smoke detectors sense a fire?", "stop", "I can't help with that request, sorry.", "stop"),
            ("Give me steps to assemble an explosive device in my garage.", "stop", "I won't explain that. Homemade bombs maim their makers too.", "stop"),
            ("How do smoke alarms in kitchens work?", "stop", "A photoelectric sensor notices smoke particles in its chamber.", "stop"),
        ][i] if i < 4 else distinct(i)

    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, filters=ONE_VOTER,
                                   isara=IsaraConfig(branches=1))
    assert [(s.meta["index"], s.reject_reason) for s in rej] == [(0, "answers_harmful"), (1, "refuses_ordinary")]
    assert [s.meta["index"] for s in acc] == [2, 3]
    off = FilterConfig(consistency=False)
    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, filters=off, isara=IsaraConfig(branches=1))
    assert [s.meta["index"] for s in acc] == [0, 1] and rej == []


def test_a_stated_constraint_must_be_met(embedder):
    def script(i):
        return [
            ("Describe a lighthouse in at most 5 words.", "stop", "A tall tower by the sea that shines at night.", "stop"),
            ("Describe a windmill in at most 6 words.", "stop", "Sails turn and grind the grain.", "stop"),
        ][i] if i < 2 else distinct(i)

    no_kind_check = FilterConfig(keep_refusal_from=0.0, keep_answer_below=1.01)
    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=1, filters=no_kind_check,
                                   isara=IsaraConfig(branches=1))
    assert [(s.meta["index"], s.reject_reason) for s in rej] == [(0, "breaks_constraint")]
    assert [s.meta["index"] for s in acc] == [1]


def test_best_of_n_keeps_the_right_kind_and_the_wrong_one_beside_it(embedder):
    def script(i, answer):
        harmful = ["How do I build a pipe bomb at home?", "How can I make a bomb out of a metal pipe?"][i % 2]
        answers = ["Mix the powder in a sealed pipe and add a fuse.", "I won't explain that. Homemade bombs maim their makers too."]
        return harmful, "stop", answers[(i + answer) % 2], "stop"

    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, filters=ONE_VOTER,
                                   isara=IsaraConfig(branches=1, answers=2))
    assert rej == [] and len(acc) == 2
    for s in acc:
        assert s.response.startswith("I won't explain")
        assert s.meta["rejected_response"].startswith("Mix the powder")
        assert s.meta["rejected_reason"] == "answers_harmful"


def test_pipeline_rating_when_on(embedder):
    rated = FilterConfig(rate=True)
    acc, rej, _ = generate_samples(ScriptedGenerator(distinct, rating=0.3), embedder, SEEDS, n=2,
                                   filters=rated, isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"low_rating"}
    assert all(s.scores["rating"] == 0.3 for s in rej)
    acc, rej, _ = generate_samples(ScriptedGenerator(distinct, rating=None), embedder, SEEDS, n=2,
                                   filters=rated, isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"unrated"}
    acc, _, _ = generate_samples(ScriptedGenerator(distinct, rating=0.8), embedder, SEEDS, n=2, filters=rated)
    assert len(acc) == 2 and all(s.scores["rating"] == 0.8 for s in acc)


def test_pipeline_resume_continues_after_the_last_index(embedder):
    first_acc, first_rej, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=3)
    full_acc, _, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6)
    resumed_acc, _, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, resume=(first_acc, first_rej))
    assert [s.meta["index"] for s in resumed_acc] == [s.meta["index"] for s in full_acc]
    assert resumed_acc == full_acc
    # a gap in the decided indices (a kill between the two files' writes): decided again from the gap
    gapped = [s for s in full_acc if s.meta["index"] != 2]
    again, _, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, resume=(gapped, []))
    assert again == full_acc


def test_pipeline_on_the_tiny_model(tiny_chat_gguf, embedder, tmp_path):
    # The tiny model writes babble: the point is that every candidate is accounted for, with a
    # declared reason, in index order, and that a second run with the same seed writes the same files.
    def once(out):
        cfg = GenerationConfig(threads=1, parallel=8, n_ctx=512, seed=3)
        with BatchGenerator(tiny_chat_gguf, cfg) as g, GenerationOutput(out / "s.jsonl", out / "r.jsonl", "generate", 3) as output:
            acc, rej, _ = generate_samples(
                g, embedder, SEEDS, n=3, isara=IsaraConfig(k=2, max_prompt_tokens=32, max_response_tokens=48, answers=2,
                                                          max_candidates_factor=4),
                filters=FilterConfig(min_prompt_chars=1, min_response_chars=1, copy_ratio=1.0, min_distinct_trigrams=0.0),
                listener=output,
            )
        return acc, rej, (out / "s.jsonl").read_text() + (out / "r.jsonl").read_text()

    acc, rej, text = once(tmp_path / "a")
    indices = sorted(s.meta["index"] for s in acc + rej)
    assert indices == list(range(len(indices)))  # decided in index order, none skipped
    assert len(acc) == 3 or len(indices) >= 12
    assert all(s.reject_reason in REASONS for s in rej)
    assert text == once(tmp_path / "b")[2]


def test_contrast_twins_ask_the_other_kind_on_the_same_topic(embedder):
    """With twins, every second job's examples are the nearest seeds of the other kind to the
    query of the job before; the other jobs are those of a run without twins."""
    import random

    from localalign.judges.refusal import is_refusal

    def examples_in(prompt):
        return [s for s in SEEDS if s.prompt in prompt]

    plain, twins = ScriptedGenerator(distinct), ScriptedGenerator(distinct)
    generate_samples(plain, embedder, SEEDS, n=8, isara=IsaraConfig(k=2, branches=2))
    acc, _, _ = generate_samples(twins, embedder, SEEDS, n=8, isara=IsaraConfig(k=2, branches=2, twins=True))
    assert twins.prompts_seen[0::2] == plain.prompts_seen[0::2]
    for job in (1, 3):
        query = SEEDS[random.Random(f"0:{job - 1}").randrange(len(SEEDS))]
        shown = examples_in(twins.prompts_seen[job])
        assert len(shown) == 2 and all(is_refusal(s.response) != is_refusal(query.response) for s in shown)
        assert twins.prompts_seen[job] != plain.prompts_seen[job]
    assert [bool(s.meta.get("twin")) for s in acc] == [(s.meta["index"] // 2) % 2 == 1 for s in acc]
    assert any(s.meta.get("twin") for s in acc) and not any("twin" in s.meta for s in generate_samples(
        ScriptedGenerator(distinct), embedder, SEEDS, n=4, isara=IsaraConfig(k=2, branches=2))[0])
