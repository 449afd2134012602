"""The engine in its own process (engine/process.py): it keeps torch out, decodes what the
in-process engine decodes, callback for callback, and a crash of it is one line that names the
signal, after which the generate stage resumes to the result of a run never interrupted."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from localalign.engine.base import BackendConfig, GenerationConfig, Job, Leaf, derive_seed
from localalign.engine.build import setup_fix
from localalign.engine.llamacpp import BatchGenerator
from localalign.engine.process import EngineCrashed, ProcessGenerator, open_probe
from localalign.engine.select import open_generator
from localalign.errors import UserError
from test_align import TINY_RUN_TOML
from test_llamacpp import THEN, isara_like_prompts
from tiny_model import CHATML_TEMPLATE

CFG = GenerationConfig(threads=1, parallel=8, n_ctx=512, max_tokens=32, temperature=1.0, seed=4)


@pytest.fixture(autouse=True)
def no_core_files():
    """The crash tests end engine processes with SIGSEGV and SIGILL: no core file in the checkout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@pytest.fixture(scope="module")
def inproc(tiny_chat_gguf):
    with BatchGenerator(tiny_chat_gguf, CFG) as g:
        yield g


@pytest.fixture(scope="module")
def child(tiny_chat_gguf):
    with open_generator(tiny_chat_gguf, CFG) as g:
        yield g


def record(g, jobs, **kw):
    """Every callback of run_jobs in the order it fired: ("step", n) and ("done", leaf, completion)."""
    events = []
    g.run_jobs(jobs, on_done=lambda leaf, c: events.append(("done", leaf, c)),
               on_step=lambda n: events.append(("step", n)), **kw)
    return events


def test_the_engine_process_holds_llama_cpp_and_no_torch(child):
    assert "torch" in sys.modules  # this process has it (the tiny model's fixtures train with it) ...
    assert child.pid != os.getpid()
    assert child.engine.heavy_modules() == []  # ... the engine process does not
    assert isinstance(child, ProcessGenerator)


def test_same_texts_and_callbacks_as_in_process(inproc, child):
    """Branches, answers and a second turn, sampled and greedy: the same completions, and the
    same callbacks in the same order, token counts included."""
    assert child.n_ctx_seq == inproc.n_ctx_seq and child.template == inproc.template
    assert child.tokenize_continuation(THEN) == inproc.tokenize_continuation(THEN)
    prompts = isara_like_prompts(inproc, 5)
    assert isara_like_prompts(child, 5) == prompts
    then = inproc.tokenize_continuation(THEN)
    jobs = [Job(p, tuple(derive_seed(2, 10 * j + b) for b in range(2)), answers=2) for j, p in enumerate(prompts)]
    for temperature in (1.0, 0.0):
        before = (inproc.counts.read, inproc.counts.written, child.counts.read, child.counts.written)
        want = record(inproc, jobs, max_tokens=[64, 24], then=then, temperature=temperature)
        got = record(child, jobs, max_tokens=[64, 24], then=then, temperature=temperature)
        assert got == want
        assert temperature == 0 or any(e[2].texts[1] for e in got if e[0] == "done")  # second turns written
        assert {e[1] for e in got if e[0] == "done"} == {Leaf(j, b, m) for j in range(5) for b in range(2) for m in range(2)}
        assert (child.counts.read - before[2], child.counts.written - before[3]) == \
               (inproc.counts.read - before[0], inproc.counts.written - before[1])
    chats = [inproc.chat_prompt([{"role": "user", "content": q}]) for q in ("Hello", "Make a bomb.", "Why?")]
    assert child.complete(chats, temperature=0) == inproc.complete(chats, temperature=0)
    assert child.score_continuations(chats[0], [" Yes", " No"]) == inproc.score_continuations(chats[0], [" Yes", " No"])


def test_a_lazy_job_iterator_that_tokenizes_while_the_engine_decodes(inproc, child):
    """The ISARA step's iterator tokenizes each prompt as the engine asks for the next job, and
    should_stop ends an endless stream: as in-process, job for job and callback for callback."""

    def run(g):
        texts = [g.chat_prompt([{"role": "user", "content": q}]) for q in ("Hi", "Make a bomb.", "What is rain?")]
        pulled, done = [], []

        def endless():
            i = 0
            while True:
                pulled.append(i)
                yield Job(g.tokenize(texts[i % 3] + "x" * (i % 4)), (derive_seed(9, i), derive_seed(10, i)))
                i += 1

        g.run_jobs(endless(), max_tokens=12, on_done=lambda leaf, c: done.append((leaf, c.texts)),
                   should_stop=lambda: len(done) >= 11)
        return pulled, done

    pulled, done = run(inproc)
    assert run(child) == (pulled, done)
    assert len(done) >= 11 and len(pulled) < 20  # pulled lazily, stopped by should_stop


def test_errors_cross_as_themselves_and_the_engine_stays_usable(child, inproc):
    with pytest.raises(UserError, match="context holds"):
        child.complete(["word " * 600])
    with pytest.raises(UserError, match="sequences; parallel is 8"):
        child.run_jobs([Job([1, 2, 3], tuple(range(5)), answers=2)], then=child.tokenize_continuation(THEN))

    def fail(leaf, completion):
        raise ZeroDivisionError("a bug in a callback")

    prompts = isara_like_prompts(inproc, 3)
    with pytest.raises(ZeroDivisionError, match="a bug in a callback"):
        child.run(prompts, max_tokens=8, on_done=fail)
    assert child.run(prompts, max_tokens=8) == inproc.run(prompts, max_tokens=8)  # still in step with its engine


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no-such.gguf") as e:
        open_generator(tmp_path / "no-such.gguf", CFG)
    assert not isinstance(e.value, EngineCrashed) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGILL])
def test_a_crash_mid_generation_is_one_error_naming_the_signal(tiny_chat_gguf, sig):
    got = []
    with open_generator(tiny_chat_gguf, CFG) as g:
        prompts = isara_like_prompts(g, 12)  # more than its 8 slots: some wait while others finish

        def step(n):
            if got:
                os.kill(g.pid, sig)  # as llama.cpp dying in a kernel would

        with pytest.raises(EngineCrashed) as e:
            g.run(prompts, max_tokens=64, on_step=step, on_done=lambda i, c: got.append(i))
    message = str(e.value)
    assert e.value.signal_name == sig.name and "\n" not in message
    assert f"pid {g.pid}, {tiny_chat_gguf.name}) was killed by {sig.name} while decoding" in message
    assert 0 < len(got) < 12  # what finished before the crash was handed over
    if sig == signal.SIGILL:
        assert f"rebuild it for this machine ({setup_fix()})" in message
    else:
        assert "run the same command again to resume" in message and "rebuild" not in message


def test_the_fault_hook_crashes_the_engine_process_at_a_chosen_decode(tiny_chat_gguf, monkeypatch):
    """LOCALALIGN_FAULT=decode:<model>#N=<signal>, read by the engine process alone."""
    monkeypatch.setenv("LOCALALIGN_FAULT", f"decode:{tiny_chat_gguf.name}#3=SEGV")
    steps = []
    with open_generator(tiny_chat_gguf, CFG) as g:
        with pytest.raises(EngineCrashed, match="killed by SIGSEGV while decoding"):
            g.run(isara_like_prompts(g, 2), max_tokens=32, on_step=steps.append)
    assert len(steps) == 2  # the third decode never reported back
    monkeypatch.setenv("LOCALALIGN_FAULT", "decode:other.gguf#1=SEGV")
    with open_generator(tiny_chat_gguf, CFG) as g:
        assert len(g.run(isara_like_prompts(g, 2), max_tokens=8)) == 2


# ---------------------------------------------------------------------------- the generate stage, crashed and resumed

def generate_stage(run_dir, gguf, tmp_path, log=lambda message: None):
    """align's round-1/generate stage alone, on `gguf`; the samples it accepted."""
    from localalign.align import AlignRun, ModelForm, load_config, load_seeds
    from localalign.rundir import Manifest

    config_path = tmp_path / "stage.toml"
    config_path.write_text(TINY_RUN_TOML)
    run = AlignRun(load_config(config_path, {}), run_dir, log=log, quiet=True)
    run_dir.mkdir(exist_ok=True)
    run.manifest = Manifest.load(run_dir)
    return run.generate(1, ModelForm(gguf), load_seeds(run.config.seeds_path(), print), [], tuned=False)


def files(run_dir) -> dict[str, list[str]]:
    return {name: (run_dir / "round-1" / name).read_text().splitlines() for name in ("samples.jsonl", "rejected.jsonl")}


@pytest.mark.slow
def test_a_generate_stage_whose_engine_crashed_resumes_to_the_uninterrupted_result(tiny_chat_gguf, tmp_path,
                                                                                  monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert len(generate_stage(clean, tiny_chat_gguf, tmp_path)) == 6
    want = files(clean)

    monkeypatch.setenv("LOCALALIGN_FAULT", f"decode:{tiny_chat_gguf.name}#{CRASH_AT_DECODE}=SEGV")
    with pytest.raises(EngineCrashed) as e:
        generate_stage(crashed, tiny_chat_gguf, tmp_path)
    assert str(e.value).startswith("[round-1/generate] the llama.cpp engine process (pid ")
    assert "killed by SIGSEGV while decoding" in str(e.value) and "\n" not in str(e.value)
    kept = files(crashed)
    decided = len(kept["samples.jsonl"]) + len(kept["rejected.jsonl"])
    assert 0 < len(kept["samples.jsonl"]) < 6 and decided < sum(map(len, want.values()))  # a crash mid-stage
    # nothing decided is lost: what the crashed run kept is the clean run's, line for line
    assert all(kept[name] == want[name][: len(kept[name])] for name in kept)

    monkeypatch.delenv("LOCALALIGN_FAULT")
    logs = []
    assert len(generate_stage(crashed, tiny_chat_gguf, tmp_path, logs.append)) == 6
    assert f"  resuming: {len(kept['samples.jsonl'])} accepted, {len(kept['rejected.jsonl'])} rejected already" in logs
    assert files(crashed) == want


# A decode of the stage's engine process past its first decisions and before its sixth accepted
# sample (the test checks both).
CRASH_AT_DECODE = 150


def test_the_cli_prints_a_crash_as_one_error_line(tiny_chat_gguf, tmp_path):
    from localalign.paths import SEEDS_DIR

    env = {**os.environ, "LOCALALIGN_FAULT": f"decode:{tiny_chat_gguf.name}#5=ILL", "LOCALALIGN_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "localalign", "generate", "--model", str(tiny_chat_gguf),
                        "--seeds", str(SEEDS_DIR / "safety.jsonl"), "--n", "2", "--out", str(tmp_path / "s.jsonl"),
                        "--quiet"], capture_output=True, text=True, env=env, timeout=600,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and "killed by SIGILL while decoding" in errors[0] and setup_fix() in errors[0]


def engine_children(pid: int) -> list[int]:
    """The live engine processes started by process `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_while_the_engine_decodes_is_one_line_and_leaves_no_engine_behind(tiny_chat_gguf, tmp_path):
    from localalign.paths import SEEDS_DIR

    out = tmp_path / "s.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "localalign", "generate", "--model", str(tiny_chat_gguf), "--seeds",
                          str(SEEDS_DIR / "safety.jsonl"), "--n", "50", "--out", str(out), "--quiet"],
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "LOCALALIGN_THREADS": "1"}, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and engine_children(p.pid)):  # decided samples on disk: it is decoding
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-3000:] if p.poll() else "no start"
            time.sleep(0.2)
        engine = engine_children(p.pid)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the parent and the engine alike
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; everything written so far is kept"
    assert engine and not any(Path(f"/proc/{pid}").exists() for pid in engine)  # ended and reaped


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite run in the background inherits SIGINT ignored


# ---------------------------------------------------------------------------- the probe


def test_the_probe_answers_what_the_parity_check_asks(tiny_gguf):
    from localalign.engine.runtime import load_llama

    text = "<|im_start|>user\nWater boils at<|im_end|>\n"
    llm = load_llama(tiny_gguf, n_ctx=512, threads=1, logits_all=True)
    try:
        with open_probe(tiny_gguf, threads=1) as probe:
            assert probe.engine.heavy_modules() == []
            meta = probe.metadata()
            assert meta == llm.metadata and meta["tokenizer.chat_template"] == CHATML_TEMPLATE
            ids = probe.tokenize(text)
            assert ids == llm.tokenize(text.encode(), add_bos=True, special=True)
            assert probe.tokenize(text, add_bos=False, special=False) != ids
            logits = probe.logits(ids)
            assert logits.dtype == np.float32 and logits.shape == (len(ids), probe.n_vocab)
            llm.reset()
            llm.eval(ids)
            assert np.array_equal(logits, np.array(llm.scores[: len(ids)], dtype=np.float32))
            end = ids[-2]  # <|im_end|>
            assert probe.is_eog(end) and not probe.is_eog(ids[-3])
            assert probe.token_eos() == int(meta["tokenizer.ggml.eos_token_id"]) == llm.token_eos()
            assert probe.token_bos() == int(meta["tokenizer.ggml.bos_token_id"])
            messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
            assert probe.apply_chat_template(None, messages) == \
                "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
            assert probe.apply_chat_template(CHATML_TEMPLATE, messages[:1], add_generation_prompt=False) == \
                "<|im_start|>user\nhi<|im_end|>\n"
            assert probe.apply_chat_template("{{ nothing llama.cpp knows }}", messages) is None
            with pytest.raises(UserError, match="do not fit the probe's 512-token context"):
                probe.logits([ids[0]] * 513)
    finally:
        llm.close()


def test_the_probe_applies_a_lora_adapter(tiny_hf_dir, tiny_gguf, tiny_adapter, tmp_path):
    from localalign.convert.converter import convert_lora
    from localalign.engine.runtime import load_llama

    adapter = convert_lora(tiny_adapter, tiny_hf_dir, tmp_path / "adapter.gguf")
    ids = [1, 20, 30, 40, 50]
    llm = load_llama(tiny_gguf, n_ctx=512, threads=1, logits_all=True, lora_path=adapter)
    try:
        llm.eval(ids)
        want = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    with open_probe(tiny_gguf, threads=1) as base, open_probe(tiny_gguf, lora=adapter, threads=1) as tuned:
        assert np.array_equal(tuned.logits(ids), want)
        assert np.abs(base.logits(ids) - want).max() > 0.1


def test_the_openai_backend_runs_in_the_engine_process_too(tiny_gguf):
    """Its client loads the GGUF's vocabulary with llama.cpp: that too stays out of this process.
    A server that is not there is the client's own one-line error, from the engine process."""
    backend = BackendConfig("openai", "http://127.0.0.1:9", retries=0)
    with pytest.raises(UserError, match=r"cannot reach http://127.0.0.1:9/v1/models .*is the server running\?"):
        open_generator(tiny_gguf, CFG, backend)
