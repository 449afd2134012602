"""Bad inputs through the real CLI: one clear line, a non-zero exit, nothing written changed.

Every case runs `localalign` (click's runner on the real `main` group, or a subprocess where
the case needs a second process or another user) and checks the same four things: the exit
code is not 0, stderr holds exactly one `error:` line naming the problem, no traceback is
printed, and every file that existed before the command still has the same bytes.
A few inputs are odd but valid (a byte-order mark, CRLF line ends, more than 100 seeds): those
cases check that the input is read, and fail on purpose later with an unknown model name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from localalign.cli import main
from localalign.fsutil import sha256_file
from localalign.samples import read_samples
from lock_holder import lock_held_by_another_process

SEED = {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes, then cool it in cold water."}


# ---------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


class Outcome:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr


def cli(*args, input: str | None = None) -> Outcome:
    """The real CLI in this process (fast: the heavy imports happen once per test session)."""
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # an uncaught exception: the traceback a user would have seen
    return Outcome(r.exit_code, r.stdout, r.stderr)


def cli_process(*args, prefix: tuple[str, ...] = (), env: dict | None = None) -> Outcome:
    """The real CLI as its own process (for cases that need another process or user)."""
    cmd = [*prefix, sys.executable, "-m", "localalign", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return Outcome(r.returncode, r.stdout, r.stderr)


def assert_refused(out: Outcome, message: str) -> None:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.code != 0, out.stderr
    assert len(errors) == 1, out.stderr
    assert message in errors[0], errors[0]


@contextlib.contextmanager
def unchanged(root: Path):
    """Every file under `root` before the block has the same bytes after it."""
    before = snapshot(root)
    yield
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def ws(tmp_path) -> Path:
    """A workspace with good seeds and an earlier output that no failure may touch."""
    write_jsonl(tmp_path / "good.jsonl", [SEED] * 3)
    (tmp_path / "out.jsonl").write_text('{"prompt": "earlier", "response": "output"}\n')
    return tmp_path


def generate_with(ws: Path, seeds: Path, model: str = "smollm2-135m-instruct") -> Outcome:
    return cli("generate", "--seeds", seeds, "--n", 2, "--out", ws / "out.jsonl", "--model", model)


class Payload:
    """A pickle that runs `touch <marker>` when unpickled: proof that nothing unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


# ---------------------------------------------------------------------------- JSONL


def test_jsonl_truncated_line(ws):
    (ws / "seeds.jsonl").write_text(json.dumps(SEED) + '\n{"prompt": "c", "respo')
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:2: invalid JSON")


def test_jsonl_wrong_types(ws):
    write_jsonl(ws / "seeds.jsonl", [SEED, {"prompt": 3, "response": "x"}])
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:2: 'prompt' must be a string, got int")


def test_jsonl_missing_key(ws):
    write_jsonl(ws / "seeds.jsonl", [{"prompt": "only a prompt"}])
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:1: missing key 'response'")


def test_jsonl_line_that_is_not_an_object(ws):
    (ws / "seeds.jsonl").write_text('["prompt", "response"]\n')
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:1: expected a JSON object, got list")


def test_jsonl_with_a_byte_order_mark_is_read(ws):
    (ws / "seeds.jsonl").write_bytes(b"\xef\xbb\xbf" + (ws / "good.jsonl").read_bytes())
    assert [s.prompt for s in read_samples(ws / "seeds.jsonl")] == [SEED["prompt"]] * 3
    with unchanged(ws):  # the seeds pass; the run stops at the model, as asked
        assert_refused(generate_with(ws, ws / "seeds.jsonl", model="nosuchmodel"), "unknown model 'nosuchmodel'")


def test_jsonl_with_crlf_line_ends_is_read(ws):
    (ws / "seeds.jsonl").write_bytes((ws / "good.jsonl").read_bytes().replace(b"\n", b"\r\n"))
    assert [s.response for s in read_samples(ws / "seeds.jsonl")] == [SEED["response"]] * 3
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl", model="nosuchmodel"), "unknown model 'nosuchmodel'")


def test_jsonl_not_utf8(ws):
    (ws / "seeds.jsonl").write_bytes(json.dumps(SEED).encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n')
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:2: not valid UTF-8")


def test_jsonl_50_mb_line(ws):
    with open(ws / "seeds.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "x" * (50 << 20), "response": "y"}) + "\n")
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:1: line longer than 1 MiB")


def test_jsonl_nested_too_deeply(ws):
    (ws / "seeds.jsonl").write_text('{"prompt": "a", "response": "b", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:1: JSON nested too deeply")


def test_jsonl_unpaired_surrogate(ws):
    (ws / "seeds.jsonl").write_text('{"prompt": "bad \\ud800 text", "response": "b"}\n')
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl:1: prompt is not valid Unicode")


def test_empty_seed_file(ws):
    (ws / "seeds.jsonl").write_text("\n\n")
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "seeds.jsonl"), "seeds.jsonl: no samples (the file is empty)")


def test_missing_seed_file(ws):
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "nope.jsonl"), "nope.jsonl: no such file")


def test_seed_path_that_is_not_a_regular_file(ws):
    os.mkfifo(ws / "fifo.jsonl")  # reading it would block forever
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "fifo.jsonl"), "fifo.jsonl: not a regular file")


def test_more_than_100_seeds_is_a_warning_not_an_error(ws):
    write_jsonl(ws / "many.jsonl", [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(150)])
    with unchanged(ws):
        out = cli("align", "--domain", ws / "many.jsonl", "--suite", "safety", "--model", "nosuchmodel",
                  "--run-dir", ws / "run")
    assert "warning: 150 seeds" in out.stderr
    assert_refused(out, "unknown model 'nosuchmodel'")  # the seeds passed; the model is next


# ---------------------------------------------------------------------------- models


def test_unknown_model_name(ws):
    with unchanged(ws):
        assert_refused(generate_with(ws, ws / "good.jsonl", model="nosuchmodel"), "unknown model 'nosuchmodel'")


def test_truncated_gguf(ws, tiny_gguf):
    (ws / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:-100])
    with unchanged(ws):
        assert_refused(cli("chat", "--model", ws / "cut.gguf", input="hi\n"), "truncated GGUF")


def test_gguf_cut_inside_its_header(ws, tiny_gguf):
    (ws / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:10])  # the magic is right; the rest is missing
    with unchanged(ws):
        assert_refused(cli("chat", "--model", ws / "cut.gguf", input="hi\n"), "truncated GGUF file (10 bytes")


def test_corrupt_gguf_header(ws):
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    key = b"general.architecture"
    (ws / "bad.gguf").write_bytes(header + len(key).to_bytes(8, "little") + key + (99).to_bytes(4, "little") + b"\0" * 64)
    with unchanged(ws):
        assert_refused(cli("chat", "--model", ws / "bad.gguf", input="hi\n"), "corrupt GGUF (unknown value type 99)")


def test_pickle_disguised_as_a_gguf_is_never_unpickled(ws):
    marker = ws.parent / f"{ws.name}-pwned-gguf"
    (ws / "model.gguf").write_bytes(evil_pickle(marker))
    with unchanged(ws):
        assert_refused(cli("chat", "--model", ws / "model.gguf", input="hi\n"), "not a GGUF file")
        assert_refused(cli("eval", "--model", ws / "model.gguf", "--suite", "safety", "--out", ws / "e.json"),
                       "not a GGUF file")
    assert not marker.exists()


def test_gguf_of_an_unsupported_architecture(ws):
    import gguf

    w = gguf.GGUFWriter(str(ws / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with unchanged(ws):
        out = cli("align", "--domain", "safety", "--model", ws / "mamba.gguf", "--run-dir", ws / "run")
    assert_refused(out, "GGUF architecture 'mamba' is not a family localalign supports; supported: llama")


@pytest.fixture
def hf_copy(ws, tiny_hf_dir) -> Path:
    return Path(shutil.copytree(tiny_hf_dir, ws / "hf"))


def train_with(ws: Path, model: Path) -> Outcome:
    return cli("train", "--model", model, "--data", ws / "good.jsonl", "--out", ws / "train")


def test_hf_directory_without_a_tokenizer(ws, hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    with unchanged(ws):
        assert_refused(train_with(ws, hf_copy), "hf: no tokenizer (tokenizer.json)")
    assert not (ws / "train").exists()


def test_hf_directory_without_a_chat_template(ws, hf_copy):
    (hf_copy / "chat_template.jinja").unlink()
    config = json.loads((hf_copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (hf_copy / "tokenizer_config.json").write_text(json.dumps(config))
    with unchanged(ws):
        assert_refused(train_with(ws, hf_copy), "hf: the tokenizer has no chat template")


def test_hf_directory_with_only_pickled_weights(ws, hf_copy):
    marker = ws.parent / f"{ws.name}-pwned-bin"
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    with unchanged(ws):
        assert_refused(train_with(ws, hf_copy), "weights only in a pickle format (pytorch_model.bin)")
        assert_refused(cli("export", "--model", hf_copy, "--out", ws / "x.gguf"), "pickle format")
    assert not marker.exists()


def test_pickle_disguised_as_safetensors(ws, hf_copy):
    marker = ws.parent / f"{ws.name}-pwned-st"
    (hf_copy / "model.safetensors").write_bytes(evil_pickle(marker))
    with unchanged(ws):
        assert_refused(train_with(ws, hf_copy), "model.safetensors: not a safetensors file")
    assert not marker.exists()


def test_pickled_adapter_is_refused(ws, hf_copy):
    marker = ws.parent / f"{ws.name}-pwned-adapter"
    adapter = ws / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (adapter / "adapter_model.bin").write_bytes(evil_pickle(marker))
    with unchanged(ws):
        out = cli("export", "--model", hf_copy, "--adapter", adapter, "--out", ws / "x.gguf", "--no-check")
    assert_refused(out, "no adapter_model.safetensors (pickled .bin adapters are not read)")
    assert not marker.exists()


EVIL_TEMPLATE = "{{ raise_exception.__globals__['os'].system('touch MARKER') }}{% for m in messages %}{{ m.content }}{% endfor %}"


def test_chat_template_reaching_for_os_in_an_hf_directory(ws, hf_copy):
    marker = ws.parent / f"{ws.name}-pwned-template"
    (hf_copy / "chat_template.jinja").write_text(EVIL_TEMPLATE.replace("MARKER", str(marker)))
    with unchanged(ws):
        assert_refused(train_with(ws, hf_copy), "chat template refused by the sandbox")
    assert not marker.exists()


def test_chat_template_reaching_for_subprocess_in_a_gguf(ws, hf_copy):
    from localalign.convert.converter import convert_hf

    marker = ws.parent / f"{ws.name}-pwned-gguf-template"
    evil = ("{% set sp = messages.__class__.__mro__[1].__subclasses__() %}"
            "{{ sp | selectattr('__name__', 'equalto', 'Popen') | first }}{{ 'touch " + str(marker) + "' }}")
    (hf_copy / "chat_template.jinja").write_text(evil)
    convert_hf(hf_copy, ws / "evil.gguf", "f32")
    with unchanged(ws):
        assert_refused(cli("chat", "--model", ws / "evil.gguf", input="hi\n"), "chat template refused by the sandbox")
    assert not marker.exists()


# ---------------------------------------------------------------------------- run directories


def align_in(run_dir: Path, *extra) -> tuple:
    return ("align", "--domain", "safety", "--model", "nosuchmodel", "--run-dir", run_dir, *extra)


def test_run_directory_made_by_a_different_config(ws):
    from localalign.align import load_config
    from localalign.config import to_dict, to_toml

    # an unknown model is refused before config.toml is written: nothing is left
    assert_refused(cli(*align_in(ws / "run", "--samples", 5)), "unknown model")
    assert not (ws / "run" / "config.toml").exists()
    config = load_config(None, {"domain": "safety", "model": "nosuchmodel", "samples": 5})
    (ws / "run" / "config.toml").write_text(to_toml(to_dict(config)))  # a run made with --samples 5
    with unchanged(ws):
        out = cli(*align_in(ws / "run", "--samples", 6))
    assert_refused(out, "was made by a different config (differs in: samples)")


def test_two_runs_on_one_directory(ws):
    run_dir = ws / "run"
    run_dir.mkdir()
    with lock_held_by_another_process(run_dir) as holder:
        with unchanged(ws):
            out = cli_process(*align_in(run_dir))
        assert_refused(out, f"is in use by another localalign run (PID {holder.pid})")


def test_stale_lock_is_detected_and_taken_over(ws):
    run_dir = ws / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "start": "1", "host": os.uname().nodename}))
    (run_dir / ".samples.jsonl.x1y2.tmp").write_text("half a line")  # a temp file the dead run left
    out = cli(*align_in(run_dir))
    assert f"removing a stale lock left by PID {dead.pid}" in out.stderr
    assert "removed 1 temp file(s) left by an interrupted run" in out.stderr
    assert_refused(out, "unknown model 'nosuchmodel'")  # the run went on past the lock
    assert not (run_dir / ".lock").exists() and not (run_dir / ".samples.jsonl.x1y2.tmp").exists()


@contextlib.contextmanager
def read_only(d: Path):
    """`d` read-only even for root: a read-only bind mount, else the command runs as nobody.

    Yields the prefix to run the command with. Root ignores permission bits, so chmod alone
    proves nothing when the tests run as root.
    """
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield ()
        finally:
            d.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", d, d], capture_output=True).returncode == 0:
        try:
            if subprocess.run(["mount", "-o", "remount,bind,ro", d, d], capture_output=True).returncode == 0:
                yield ()
                return
        finally:
            subprocess.run(["umount", d], capture_output=True)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("cannot make a directory read-only for root here (no bind mount, no setpriv)")
    for p in [d, *d.parents]:  # nobody must reach the directory, but not write in it
        p.chmod(p.stat().st_mode | 0o005)
    d.chmod(0o555)
    try:
        yield (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    finally:
        d.chmod(0o755)


def test_read_only_run_directory(ws):
    run_dir = ws / "run"
    assert_refused(cli(*align_in(run_dir)), "unknown model")  # a run directory with its config.toml
    with unchanged(ws), read_only(run_dir) as prefix:
        out = cli_process(*align_in(run_dir), prefix=prefix)
    assert_refused(out, "cannot write the run directory")


def test_output_on_a_read_only_file_system_is_one_line(ws):
    out_dir = ws / "ro"
    out_dir.mkdir()
    with unchanged(ws), read_only(out_dir) as prefix:
        out = cli_process("generate", "--seeds", ws / "good.jsonl", "--n", 1, "--out", out_dir / "o.jsonl",
                          "--model", ws / "missing.gguf", prefix=prefix)
    assert_refused(out, "missing.gguf: no such file")  # inputs are checked before anything is written


# ---------------------------------------------------------------------------- config


def align_with_config(ws: Path, toml: str) -> Outcome:
    (ws / "run.toml").write_text(toml)
    return cli("align", "--config", ws / "run.toml", "--run-dir", ws / "run")


@pytest.mark.parametrize(
    "toml, message",
    [
        ("roundz = 2\n", "config: unknown key(s) roundz"),
        ('rounds = "two"\n', "config.rounds: expected int, got str 'two'"),
        ("rounds = 0\n", "rounds must be at least 1, got 0"),
        ("[train]\nlearning_rate = -1.0\n", "learning_rate"),
        ("rounds = = 2\n", "invalid TOML"),
        ('domain = "poetry"\n', "unknown domain 'poetry'"),
        ('eval_suites = ["safety", "nope"]\n', "unknown suite 'nope'"),
        ('eval_suites = ["safety", "safety"]\n', "a suite is named twice"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "negative-lr", "syntax", "unknown-domain", "unknown-suite",
         "suite-twice"],
)
def test_invalid_config(ws, toml, message):
    with unchanged(ws):
        assert_refused(align_with_config(ws, toml), message)
    assert not (ws / "run").exists()  # refused before the run directory is made


# ---------------------------------------------------------------------------- safe loading, audited


def test_the_package_never_unpickles_runs_a_shell_or_trusts_remote_code():
    """Every call in localalign/ that could run code from a file is written the safe way."""
    import ast

    problems = []
    package = Path(__file__).resolve().parents[1] / "localalign"
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            where = f"{path.relative_to(package)}:{node.lineno}"
            if kw.get("shell") is True:
                problems.append(f"{where}: shell=True")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner == "torch" and name == "load" and kw.get("weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if (name == "from_pretrained" and owner.startswith("Auto")) or name == "SentenceTransformer":
                if kw.get("trust_remote_code") is not False:
                    problems.append(f"{where}: {owner or name} without trust_remote_code=False")
    assert problems == []
