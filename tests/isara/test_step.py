"""The ISARA step (generate_samples) with a scripted model and on the tiny GGUF: every candidate
is accepted or rejected with a reason, the files the stage writes after each pass hold what
the step returns, and a resumed call continues exactly where the first stopped."""

from __future__ import annotations

from localalign.align import GenerationOutput
from localalign.engine.base import GenerationConfig
from localalign.engine.llamacpp import BatchGenerator
from localalign.isara.filters import REASONS, FilterConfig
from localalign.isara.step import IsaraConfig, generate_samples
from localalign.samples import read_rejected, read_samples
from scripted_model import SEEDS, ScriptedGenerator, distinct


def test_pipeline_accepts_distinct_pairs_and_writes_files(embedder, tmp_path):
    gen = ScriptedGenerator(distinct)
    with GenerationOutput(tmp_path / "s.jsonl", tmp_path / "r.jsonl", "generate", 5) as output:
        acc, rej, _ = generate_samples(gen, embedder, SEEDS, n=5, isara=IsaraConfig(k=3, batch_candidates=4), listener=output)
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

    acc, rej, _ = generate_samples(ScriptedGenerator(script), embedder, SEEDS, n=2, isara=IsaraConfig(k=2, batch_candidates=6))
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
    acc, rej, _ = generate_samples(ScriptedGenerator(distinct, rating=" 3, Domain: 9"), embedder, SEEDS, n=2,
                                   isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"low_rating"}
    acc, rej, _ = generate_samples(ScriptedGenerator(distinct, rating=" great"), embedder, SEEDS, n=2,
                                   isara=IsaraConfig(max_candidates_factor=2))
    assert acc == [] and {s.reject_reason for s in rej} == {"unrated"}
    acc, _, _ = generate_samples(ScriptedGenerator(distinct, rating=" great"), embedder, SEEDS, n=2,
                                 filters=FilterConfig(rate=False))
    assert len(acc) == 2


def test_pipeline_resume_continues_after_the_last_index(embedder):
    first_acc, first_rej, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=3,
                                               isara=IsaraConfig(batch_candidates=3))
    full_acc, _, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, isara=IsaraConfig(batch_candidates=3))
    resumed_acc, _, _ = generate_samples(ScriptedGenerator(distinct), embedder, SEEDS, n=6, isara=IsaraConfig(batch_candidates=3),
                                         resume=(first_acc, first_rej))
    assert [s.meta["index"] for s in resumed_acc] == [s.meta["index"] for s in full_acc]
    assert resumed_acc == full_acc


def test_pipeline_on_the_tiny_model(tiny_gguf, embedder, tmp_path):
    # A random model writes noise: the point is that every candidate is accounted for,
    # with a declared reason, and that a second run with the same seed writes the same files.
    def once(out):
        cfg = GenerationConfig(threads=1, parallel=4, n_ctx=512, seed=3)
        with BatchGenerator(tiny_gguf, cfg) as g, GenerationOutput(out / "s.jsonl", out / "r.jsonl", "generate", 2) as output:
            acc, rej, _ = generate_samples(
                g, embedder, SEEDS, n=2, isara=IsaraConfig(k=2, max_prompt_tokens=24, max_response_tokens=24,
                                                          batch_candidates=6, max_candidates_factor=3),
                listener=output,
            )
        return acc, rej, (out / "r.jsonl").read_text()

    acc, rej, text = once(tmp_path / "a")
    assert len(acc) + len(rej) == 6 or len(acc) == 2
    assert all(s.reject_reason in REASONS for s in rej)
    assert text == once(tmp_path / "b")[2]
