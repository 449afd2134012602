"""The HF copy made from a GGUF, and the copy check that compares the two (issue: foundation)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from localalign.checks.parity import MAX_ABS_LOGIT_DIFF, check_copy
from localalign.convert.gguf_to_hf import make_hf_copy
from localalign.errors import UserError


@pytest.fixture(scope="module")
def tiny_copy(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("copy") / "hf"
    make_hf_copy(tiny_gguf, out)
    return out


def test_hf_copy_of_a_gguf_passes_the_copy_check(tiny_gguf, tiny_copy):
    assert (tiny_copy / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((tiny_copy / "config.json").read_text())
    report = check_copy(tiny_gguf, tiny_copy)
    assert report.ok, report.problems
    assert report.details["tokenizer_mismatches"] == []
    # f32 on both sides: the same function, up to llama.cpp's f16 KV cache.
    assert report.details["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF["f32"]
    assert report.details["top1_agreement"] == 1.0


def test_copy_check_catches_a_changed_weight(tiny_gguf, tiny_copy, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_copy, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if "q_proj" in k)
    weights[name] = weights[name].flip(0).contiguous()  # rows out of order: a layout bug
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    report = check_copy(tiny_gguf, broken)
    assert not report.ok
    assert not report.checks["logits_close"]


def test_copy_check_catches_a_different_chat_template(tiny_gguf, tiny_copy, tmp_path):
    changed = tmp_path / "template"
    shutil.copytree(tiny_copy, changed)
    (changed / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    report = check_copy(tiny_gguf, changed)
    assert not report.checks["chat_template"]


def test_copy_of_an_unsupported_architecture_is_refused_and_leaves_nothing(tiny_gguf, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    # Rewrite the tiny GGUF's architecture key: everything else is intact.
    reader = GGUFReader(str(tiny_gguf))
    arch = str(reader.fields["general.architecture"].contents())
    data = tiny_gguf.read_bytes()
    key = b"general.architecture"
    i = data.index(key) + len(key) + 4 + 8  # value type (u32) + string length (u64)
    assert data[i : i + len(arch)] == arch.encode()
    fake = tmp_path / "m.gguf"
    fake.write_bytes(data[:i] + b"gpt2!"[: len(arch)].ljust(len(arch), b"x") + data[i + len(arch) :])
    with pytest.raises(UserError, match="is not a family localalign supports"):
        make_hf_copy(fake, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
