import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from localalign.config import from_dict, read_toml, to_dict, to_toml
from localalign.errors import UserError
from localalign.rundir import LOCK_NAME, Manifest, RunLock
from lock_holder import lock_held_by_another_process


@dataclass
class Inner:
    lr: float = 1e-3
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    rounds: int = 2
    mode: Literal["merged", "adapter"] = "merged"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_config_round_trips_through_toml(tmp_path):
    cfg = from_dict(Outer, {"rounds": 3, "mode": "adapter", "inner": {"lr": 2, "names": ["x", "y"]}})
    assert cfg == Outer(3, "adapter", None, Inner(2.0, ["x", "y"]))
    (tmp_path / "c.toml").write_text(to_toml(to_dict(cfg)))
    assert from_dict(Outer, read_toml(tmp_path / "c.toml")) == cfg


@pytest.mark.parametrize(
    "values, message",
    [
        ({"roundz": 1}, "unknown key(s) roundz"),
        ({"rounds": "2"}, "cfg.rounds: expected int"),
        ({"rounds": True}, "cfg.rounds: expected int"),
        ({"mode": "both"}, "cfg.mode: must be one of"),
        ({"inner": {"lr": "fast"}}, "cfg.inner.lr: expected float"),
        ({"inner": 3}, "cfg.inner: expected a table"),
    ],
)
def test_bad_config_values_are_named(values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(Outer, values, "cfg")


def test_invalid_toml_is_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("rounds = = 2\n")
    with pytest.raises(UserError, match="invalid TOML"):
        read_toml(p)


def test_second_run_on_a_locked_directory_is_refused_naming_the_pid(tmp_path):
    with lock_held_by_another_process(tmp_path) as holder:
        with pytest.raises(UserError, match=f"in use by another localalign run \\(PID {holder.pid}\\)"):
            with RunLock(tmp_path):
                pass
    # The holder was killed with its lock in place: the lock is stale now and is taken over.
    assert (tmp_path / LOCK_NAME).exists()
    messages = []
    with RunLock(tmp_path, log=messages.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != holder.pid
    assert any(f"stale lock left by PID {holder.pid}" in m for m in messages)
    assert not (tmp_path / LOCK_NAME).exists()


def test_manifest_skips_only_intact_stages(tmp_path):
    out = tmp_path / "round-1" / "samples.jsonl"
    out.parent.mkdir()
    out.write_text("one\n")
    m = Manifest.load(tmp_path)
    m.record("round-1/generate", {"seeds": "h1"}, [out], seconds=1.0)
    m2 = Manifest.load(tmp_path)
    assert m2.is_done("round-1/generate", {"seeds": "h1"})
    assert not m2.is_done("round-1/generate", {"seeds": "h2"})  # inputs changed
    out.write_text("one\ntampered\n")
    assert not m2.is_done("round-1/generate", {"seeds": "h1"})  # output changed
    out.unlink()
    assert not m2.is_done("round-1/generate", {"seeds": "h1"})  # output gone


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stages": ')
    with pytest.raises(UserError, match="corrupt manifest"):
        Manifest.load(tmp_path)
