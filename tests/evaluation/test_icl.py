"""ICL-kNN, the paper's no-training baseline: retrieved seed pairs precede each question."""

from localalign.evaluation.run import EvalConfig, open_session
from localalign.samples import Sample, write_samples


def test_icl_puts_the_nearest_seeds_before_the_question(tiny_gguf, tmp_path):
    seeds = [
        Sample("How do I bake sourdough bread at home?", "Feed the starter, mix, proof overnight, bake hot."),
        Sample("What is the boiling point of water at sea level?", "100 degrees Celsius."),
        Sample("How can I pick a strong password?", "Use a long passphrase and a password manager."),
    ]
    write_samples(tmp_path / "seeds.jsonl", seeds)
    config = EvalConfig(model=tiny_gguf, suites=("safety",), icl_seeds=tmp_path / "seeds.jsonl", icl_k=2, n_ctx=512)
    session = open_session(config)
    try:
        text = session.chat("What temperature does water boil at on a mountain?")
        plain = session.gen.chat_prompt([{"role": "user", "content": "What temperature does water boil at on a mountain?"}])
    finally:
        session.close()
    assert text.endswith(plain.split("<|im_start|>user")[-1])  # the question is the last user turn
    assert "100 degrees Celsius." in text  # the nearest seed, as a full earlier exchange
    assert "sourdough" not in text or "password" not in text  # only k=2 of the 3 seeds
    # the nearest example comes right before the question
    assert text.index("boiling point") > max(text.find("sourdough"), text.find("password"))
