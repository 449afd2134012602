"""The `openai` generation backend against a real server (llama-cpp-python's own
llama_cpp.server on 127.0.0.1, serving the tiny fixture model), compared with the embedded
backend; and every failure a server can cause, against a tiny http.server that misbehaves."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from localalign.engine.base import BackendConfig, Completion, GenerationConfig, Job, Leaf
from localalign.engine.llamacpp import BatchGenerator
from localalign.engine.local_server import llama_cpp_server
from localalign.engine.select import open_generator
from localalign.errors import UserError

pytest.importorskip("uvicorn", reason="llama_cpp.server needs the server extra (pip install -e .[dev])")

N_CTX = 512
GREEDY = dict(threads=1, n_ctx=N_CTX, temperature=0.0, max_tokens=16, parallel=3)
MESSAGES = [
    [{"role": "user", "content": "How do smoke detectors work?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it safe to mix bleach and ammonia?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a fact."}],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    """llama_cpp.server on a free port with the tiny model; its base URL."""
    with llama_cpp_server(tiny_gguf, n_ctx=N_CTX, threads=1) as url:
        yield url


@pytest.fixture(scope="module")
def embedded(tiny_gguf):
    with BatchGenerator(tiny_gguf, GenerationConfig(**GREEDY)) as g:
        yield g


@pytest.fixture(scope="module")
def remote(tiny_gguf, server):
    with open_generator(tiny_gguf, GenerationConfig(**GREEDY), BackendConfig("openai", server, concurrency=3)) as g:
        yield g


# ---------------------------------------------------------------------------- against llama_cpp.server


def same_greedy_text(server_text: str, server_finish: str, ours: str, our_finish: str) -> bool:
    """Equal, or the one divergence llama_cpp.server has by design: while its text ends inside
    a multi-byte UTF-8 character it decodes past max_tokens (llama_cpp/llama.py
    _create_completion, `multibyte_fix` skips the max_tokens check). Greedy, the token stream
    is the same, so its text then extends ours. The random tiny model emits stray byte
    tokens often; a real model rarely ends a reply mid-character."""
    if (server_text, server_finish) == (ours, our_finish):
        return True
    return server_finish == our_finish == "length" and server_text.startswith(ours)


def assert_same_greedy(theirs, ours):
    for a, b in zip(theirs, ours, strict=True):
        for turn in range(len(b.texts)):
            assert same_greedy_text(a.texts[turn], a.finish[turn], b.texts[turn], b.finish[turn]), (a, b)


def test_greedy_texts_equal_the_embedded_backend(embedded, remote):
    # Chat-templated prompts sent to the raw completions endpoint: the server tokenizes the
    # same text the same way (special tokens parsed, the model's BOS rule), decodes greedily
    # with min_p 0 and repeat_penalty 1 (sent explicitly), so the token streams are equal.
    prompts = [embedded.chat_prompt(m) for m in MESSAGES] + ["The quick brown fox"]
    assert [remote.chat_prompt(m) for m in MESSAGES] == prompts[:-1]
    ours = embedded.run([embedded.tokenize(p) for p in prompts])
    theirs = remote.run([remote.tokenize(p) for p in prompts])
    assert_same_greedy(theirs, ours)
    assert sum(a.texts == b.texts for a, b in zip(theirs, ours)) >= 3  # equality is the rule, not the exception


def test_two_turns_and_stop_strings_equal_the_embedded_backend(embedded, remote):
    # ISARA's shape: the model writes a user turn, `then` opens the assistant turn, the model
    # answers. The server gets prompt + first turn + `then` as text for the second request.
    then_text = "<|im_end|>\n<|im_start|>assistant\n"
    prompts = [embedded.chat_prompt(m).rsplit("<|im_start|>assistant\n", 1)[0] + "<|im_start|>user\n" for m in MESSAGES]
    ours = embedded.run([embedded.tokenize(p) for p in prompts], max_tokens=[8, 8],
                        then=embedded.tokenize_continuation(then_text))
    theirs = remote.run([remote.tokenize(p) for p in prompts], max_tokens=[8, 8],
                        then=remote.tokenize_continuation(then_text))
    assert_same_greedy(theirs, ours)

    # Stop strings: llama_cpp.server skips its stop check while the bytes so far end in a
    # partial UTF-8 character, which the random tiny model writes all the time; a grammar
    # holds both sides to ASCII letters.
    letters = 'root ::= [a-z ]+\n'
    texts = embedded.run([embedded.tokenize(p) for p in prompts], max_tokens=12, grammar=letters)
    stops = [r.texts[0][2:4] for r in texts]
    for p, stop in zip(prompts, stops):
        ours = embedded.run([embedded.tokenize(p)], max_tokens=12, stop=[stop], grammar=letters)
        theirs = remote.run([remote.tokenize(p)], max_tokens=12, stop=[stop], grammar=letters)
        assert (theirs[0].texts, theirs[0].finish) == (ours[0].texts, ours[0].finish)
        assert ours[0].finish == ["stop"] and len(ours[0].texts[0]) == 2


def test_sampling_is_reproducible_per_seed(remote):
    prompts = [remote.tokenize(remote.chat_prompt(m)) for m in MESSAGES]
    first = remote.run(prompts, temperature=1.0, seeds=[1, 2, 3, 4])
    again = remote.run(prompts, temperature=1.0, seeds=[1, 2, 3, 4])
    assert [r.texts for r in first] == [r.texts for r in again]
    assert all(r.n_generated >= 1 for r in first)


def test_grammar_is_honoured(remote):
    digits = 'root ::= " " [1-9] ", " [1-9]\n'
    prompt = remote.chat_prompt([{"role": "user", "content": "Rate this."}])
    (r,) = remote.run([remote.tokenize(prompt)], max_tokens=16, temperature=0, grammar=digits)
    assert len(r.texts[0]) == 5 and r.texts[0][1].isdigit() and r.texts[0][4].isdigit(), r.texts


def test_multiple_choice_scores_equal_the_embedded_backend(embedded, remote):
    prompt = embedded.chat_prompt([{"role": "user", "content": "What happens if you crack your knuckles?"}])
    choices = ["Nothing harmful happens.", "You get arthritis.", "Your fingers grow.", "It breaks bones."]
    ours = embedded.score_continuations(prompt, choices)
    theirs = remote.score_continuations(prompt, choices)
    assert theirs == pytest.approx(ours, abs=1e-3)


def test_generate_samples_through_the_server_equals_embedded(tiny_gguf, server, embedder):
    from localalign.isara.filters import FilterConfig
    from localalign.isara.step import IsaraConfig, generate_samples
    from scripted_model import SEEDS

    cfg = GenerationConfig(threads=1, n_ctx=N_CTX, temperature=0.0, parallel=4)
    isara = IsaraConfig(k=2, max_prompt_tokens=16, max_response_tokens=16, branches=2, max_candidates_factor=2)
    filters = FilterConfig(min_prompt_chars=1, min_response_chars=1, min_rating=1)
    out = {}
    for backend in (BackendConfig(), BackendConfig("openai", server, concurrency=4)):
        with open_generator(tiny_gguf, cfg, backend) as g:
            accepted, rejected, _ = generate_samples(g, embedder, SEEDS, 2, isara=isara, filters=filters)
        out[backend.kind] = sorted(accepted + rejected, key=lambda s: s.meta["index"])
    assert len(out["openai"]) == len(out["llama-cpp"]) >= 2
    for a, b in zip(out["openai"], out["llama-cpp"]):
        assert (a.reject_reason, a.scores) == (b.reject_reason, b.scores)
        # Cut turns may run past max_tokens on llama_cpp.server (see same_greedy_text).
        cut = b.reject_reason in ("truncated_prompt", "truncated_response")
        assert (a.prompt, a.response) == (b.prompt, b.response) or (
            cut and a.prompt.startswith(b.prompt) and a.response.startswith(b.response)), (a, b)


def test_evaluation_through_the_server_equals_embedded(tiny_gguf, server, seeds_dir, tmp_path):
    import shutil

    from localalign.evaluation.run import EvalConfig, evaluate

    for name in ("safety", "truthfulness"):
        shutil.copy(seeds_dir / f"{name}.heldout.jsonl", tmp_path)
    results = {}
    for backend in (BackendConfig(), BackendConfig("openai", server)):
        config = EvalConfig(model=tiny_gguf, suites=("safety", "truthfulness"), limit=2, seeds_dir=tmp_path, max_tokens=8,
                            refusal_max_tokens=8, parallel=2, threads=1, n_ctx=N_CTX, backend=backend)
        results[backend.kind] = evaluate(config)
    ours, theirs = results["llama-cpp"]["suites"], results["openai"]["suites"]
    assert [i["reply"] for i in theirs["safety"]["items"]] == [i["reply"] for i in ours["safety"]["items"]]
    for a, b in zip(theirs["truthfulness"]["items"], ours["truthfulness"]["items"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
    assert results["openai"]["backend"]["kind"] == "openai"


def test_a_server_serving_another_model_is_refused(tiny_gguf, tmp_path):
    # --model says the tiny Llama (SmolLM2's tokenizer), the server serves a tiny Gemma (a
    # SentencePiece vocabulary of its own): the start-up tokenizer probe differs.
    from localalign.convert.converter import convert_hf
    from tiny_families import build_tiny_family

    gemma = convert_hf(build_tiny_family("gemma3", tmp_path / "tiny-gemma3"), tmp_path / "gemma.gguf", "f32")
    with llama_cpp_server(gemma, n_ctx=N_CTX, threads=1) as url:
        with pytest.raises(UserError, match="tokenizes differently"):
            open_generator(tiny_gguf, GenerationConfig(**GREEDY), BackendConfig("openai", url))


# ---------------------------------------------------------------------------- failures


class Misbehaving(BaseHTTPRequestHandler):
    """Answers every request as `self.server.mode` says."""

    def _reply(self, status: int, body: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits += 1
        self._reply(200, json.dumps({"data": [{"id": "fake"}]}).encode())

    def do_POST(self):
        self.server.hits += 1
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        mode = self.server.mode
        if self.path != "/v1/completions":
            self._reply(404, b"not found", "text/plain")
        elif mode == "garbage":
            self._reply(200, b"<html>proxy login</html>", "text/html")
        elif mode == "500":
            self._reply(500, b"internal\nerror", "text/plain")
        elif mode == "400":
            self._reply(400, json.dumps({"error": {"message": "prompt too long"}}).encode())
        elif mode == "empty":
            self._reply(200, json.dumps({"choices": []}).encode())
        elif mode == "schema":
            self._reply(200, json.dumps({"choices": [{"message": "hi"}]}).encode())
        elif mode == "templated":
            reply = {"choices": [{"text": "x", "finish_reason": "stop"}], "usage": {"prompt_tokens": 999, "completion_tokens": 1}}
            self._reply(200, json.dumps(reply).encode())
        elif mode == "misaligned" and not body.get("echo"):
            self._reply(200, json.dumps({"choices": [{"text": "\n", "finish_reason": "length"}]}).encode())
        elif mode == "misaligned":  # the greedy token listed with another position's log-probabilities
            lp = {"tokens": ["Q", "\n", "!"], "token_logprobs": [None, -3.0, -1.0],
                  "top_logprobs": [None, {"a": -0.2, "\n": -3.0}, {"!": -1.0}]}
            self._reply(200, json.dumps({"choices": [{"text": "x", "finish_reason": "length", "logprobs": lp}]}).encode())
        elif mode == "no-echo" and body.get("echo"):  # llama-server's answer to echo
            self._reply(500, json.dumps({"error": {"code": 500, "message": "Only no echo is supported"}}).encode())
        elif mode == "no-echo":
            self._reply(200, json.dumps({"choices": [{"text": "\n", "finish_reason": "length"}]}).encode())
        elif mode == "no-logprobs":
            self._reply(200, json.dumps({"choices": [{"text": "x", "finish_reason": "length", "logprobs": None}]}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    httpd.mode, httpd.hits = "garbage", 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def remote_on(url, tiny_gguf, **kw):
    return open_generator(tiny_gguf, GenerationConfig(**GREEDY), BackendConfig("openai", url, backoff_s=0.01, **kw))


@pytest.mark.parametrize(
    "mode, message",
    [
        ("garbage", "the reply is not JSON: <html>proxy login</html>"),
        ("500", "HTTP 500 Internal Server Error: internal error"),
        ("400", "HTTP 400 Bad Request: .*prompt too long"),
        ("empty", "the reply has no choices"),
        ("schema", "the reply's choice has no text"),
        ("templated", "read 999 prompt tokens where tiny.f32.gguf gives 1: the server wraps prompts in a template"),
    ],
)
def test_bad_replies_are_one_line_user_errors(fake, tiny_gguf, mode, message):
    fake.mode = mode
    with remote_on(f"http://127.0.0.1:{fake.server_port}", tiny_gguf, retries=2) as g:
        hits = fake.hits
        with pytest.raises(UserError, match=message) as e:
            g.complete(["Hello"])
    assert "\n" not in str(e.value)
    assert fake.hits - hits == (3 if mode == "500" else 1)  # 5xx retried, the rest not


def test_a_model_the_server_does_not_list_is_refused(fake, tiny_gguf):
    # A single-model server answers any name: asking for a round it does not list must stop.
    with pytest.raises(UserError, match=r"does not serve 'la-round-1' \(it serves fake\): serve .*tiny.f32.gguf under that name"):
        remote_on(f"http://127.0.0.1:{fake.server_port}", tiny_gguf, served_model="la-round-1")
    from localalign.engine.openai import OpenAIGenerator  # the client itself, as the engine process hosts it

    backend = BackendConfig("openai", f"http://127.0.0.1:{fake.server_port}", served_model="fake")
    with OpenAIGenerator(tiny_gguf, GenerationConfig(**GREEDY), backend) as g:
        assert g.model_name == "fake"


@pytest.mark.parametrize("mode", ["no-logprobs", "no-echo"])
def test_a_server_without_prompt_logprobs_is_a_clear_error(fake, tiny_gguf, mode):
    fake.mode = mode
    with remote_on(f"http://127.0.0.1:{fake.server_port}/v1", tiny_gguf) as g:
        with pytest.raises(UserError, match=r"returns no prompt log-probabilities .*\(the truthfulness suite\)") as e:
            g.score_continuations("Q: ", ["yes", "no"])
    assert "\n" not in str(e.value)


def test_rating_through_the_server_equals_embedded(embedded, remote):
    """The self-rating reads P(" Yes") vs P(" No") from prompt log-probabilities: the server's
    echo gives the embedded scorer's numbers."""
    from localalign.isara.rating import rate_samples
    from localalign.samples import Sample
    from scripted_model import SEEDS

    def rated(g):
        samples = [Sample("How do fuses work?", "A thin wire melts.")]
        rate_samples(g, samples, SEEDS[:1])  # one domain example: the rubric fits the server's small context
        return samples[0].scores["rating"]

    ours = rated(embedded)
    assert 0.0 <= ours <= 1.0  # the random tiny model is sure of nearly everything: often 0.0 or 1.0
    assert rated(remote) == pytest.approx(ours, abs=1e-3)


def test_misaligned_prompt_logprobs_are_refused(fake, tiny_gguf):
    fake.mode = "misaligned"
    with remote_on(f"http://127.0.0.1:{fake.server_port}", tiny_gguf) as g:
        with pytest.raises(UserError, match="echoed log-probabilities are not those of their tokens"):
            g.score_continuations("Q: ", ["yes", "no"])


@pytest.mark.parametrize("served_model", [None, "la-base"])
def test_unreachable_server(tiny_gguf, served_model):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"cannot reach {url}/v1/models .* after 2 attempt"):
        remote_on(url, tiny_gguf, retries=1, served_model=served_model)


def test_api_key_comes_from_the_named_variable(fake, tiny_gguf, monkeypatch):
    monkeypatch.delenv("LA_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="LA_TEST_KEY: that environment variable is not set"):
        remote_on(f"http://127.0.0.1:{fake.server_port}", tiny_gguf, api_key_env="LA_TEST_KEY")


def test_config_validation_and_stage_names():
    with pytest.raises(UserError, match="needs --base-url"):
        BackendConfig("openai")
    with pytest.raises(UserError, match="backend must be one of"):
        BackendConfig("vllm")
    with pytest.raises(UserError, match="concurrency"):
        BackendConfig("openai", "http://x", concurrency=0)
    fixed = BackendConfig("openai", "http://x", served_model="m")
    assert fixed.for_model("base") is fixed
    with pytest.raises(UserError, match="round-1 is a trained model"):
        fixed.for_model("round-1")
    assert BackendConfig("openai", "http://x", served_model="la-{name}").for_model("round-1").served_model == "la-round-1"
    assert BackendConfig().for_model("round-1").kind == "llama-cpp"
    # The address and transport settings are not part of a run's identity; the model is.
    assert BackendConfig("openai", "http://a", concurrency=1) == BackendConfig("openai", "http://b:8000", retries=0)
    assert BackendConfig("openai", "http://a", served_model="x") != BackendConfig("openai", "http://a")


def test_align_on_a_server_needs_a_name_per_model():
    from localalign.align import load_config

    with pytest.raises(UserError, match="served-model to a pattern with {name}"):
        load_config(None, {"backend": {"kind": "openai", "base_url": "http://127.0.0.1:8080"}})
    config = load_config(None, {"backend": {"kind": "openai", "base_url": "http://h:1", "served_model": "la-{name}"}})
    assert config.backend.for_model("round-2").served_model == "la-round-2"


def test_cli_unreachable_server_is_one_line(tiny_gguf, tmp_path):
    from localalign.cli import main
    from localalign.samples import write_samples
    from scripted_model import SEEDS

    write_samples(tmp_path / "seeds.jsonl", SEEDS)
    url = f"http://127.0.0.1:{free_port()}"
    args = ["generate", "--model", str(tiny_gguf), "--seeds", str(tmp_path / "seeds.jsonl"), "--n", "1",
            "--out", str(tmp_path / "out.jsonl"), "--base-url", url, "--n-ctx", "512"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: cannot reach {url}/v1/models")


# ---------------------------------------------------------------------------- align on a server


@pytest.mark.slow
def test_align_on_a_server_stops_for_each_model_and_resumes(tiny_hf_dir, seeds_dir, tmp_path):
    """`align --backend openai`: each stage asks the server for its own model by name; a model
    it does not serve stops the run with the file to serve, and the same command resumes."""
    import json
    import subprocess
    import sys

    from test_align import TINY_RUN_TOML
    from tiny_model import fit_tiny_to_chats

    pairs = [(json.loads(line)["prompt"], json.loads(line)["response"]) for line in open(seeds_dir / "safety.jsonl")]
    model = fit_tiny_to_chats(tiny_hf_dir, tmp_path / "chat", pairs, steps=200)
    run = tmp_path / "run"

    def align(url):
        config = tmp_path / "run.toml"
        config.write_text(TINY_RUN_TOML.replace("rounds = 2", "rounds = 1")
                          + f'\n[backend]\nkind = "openai"\nbase_url = "{url}"\nserved_model = "la-{{name}}"\nconcurrency = 4\n')
        cmd = [sys.executable, "-m", "localalign", "align", "--domain", "safety", "--model", str(model),
               "--run-dir", str(run), "--config", str(config)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "LOCALALIGN_THREADS": "1"})

    stops = []
    for served, alias in ((None, "other"), (run / "base" / "model.gguf", "la-base"), (run / "round-1" / "model.gguf", "la-round-1")):
        assert served is None or served.exists(), stops
        with llama_cpp_server(served or model_gguf(model, tmp_path), n_ctx=1024, threads=1, alias=alias) as url:
            r = align(url)
        if r.returncode == 0:
            break
        assert r.returncode == 2, r.stderr[-3000:]
        stops.append(r.stderr.strip().splitlines()[-1])
    assert [s.split(" does not serve ")[1].split(" (")[0] for s in stops] == ["'la-base'", "'la-round-1'"], stops
    assert str(run / "base" / "model.gguf") in stops[0] and str(run / "round-1" / "model.gguf") in stops[1]
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "final.gguf").exists() and (run / "round-1" / "samples.jsonl").stat().st_size > 0
    assert json.loads((run / "round-1" / "eval.json").read_text())["backend"]["served_model"] == "la-round-1"
    assert 'served_model = "la-{name}"' in (run / "config.toml").read_text()


def model_gguf(hf_dir, tmp_path):
    """Something for the first server to serve before the run has made its base GGUF."""
    from localalign.convert.converter import convert_hf

    return convert_hf(hf_dir, tmp_path / "first.gguf", out_type="f32")


def test_cli_eval_lora_on_a_server_is_refused(tiny_gguf, tmp_path):
    from localalign.cli import main

    args = ["eval", "--model", str(tiny_gguf), "--lora", str(tiny_gguf), "--suite", "safety", "--out", str(tmp_path / "e.json"),
            "--base-url", "http://127.0.0.1:9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "error: --lora applies to the embedded backend" in result.output


def test_jobs_on_a_server_are_requests_per_branch_and_answer(remote):
    """A job's branches and answers become separate requests; answer 0 of a branch is the plain
    two-turn run with the branch's seed, and the answers share the branch's first turn."""
    then = remote.tokenize_continuation("<|im_end|>\n<|im_start|>assistant\n")
    prompt = remote.tokenize(remote.chat_prompt(MESSAGES[0]).rsplit("<|im_start|>assistant\n", 1)[0] + "<|im_start|>user\n")
    seeds = (11, 12)
    got: dict[Leaf, Completion] = {}
    remote.run_jobs([Job(prompt, seeds, answers=2)], max_tokens=[8, 8], temperature=1.0, then=then,
                    on_done=lambda leaf, c: got.__setitem__(leaf, c))
    assert set(got) == {Leaf(0, b, m) for b in range(2) for m in range(2)}
    for b, seed in enumerate(seeds):
        [plain] = remote.run([prompt], max_tokens=[8, 8], temperature=1.0, seeds=[seed], then=then)
        assert got[Leaf(0, b, 0)].texts == plain.texts
        assert got[Leaf(0, b, 1)].texts[0] == plain.texts[0]
