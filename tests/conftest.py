"""Shared fixtures: the tiny model (built once per session) and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tiny_model import build_tiny_llama, fit_tiny_to_chats  # noqa: E402



@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A random tiny Llama (hidden 64, 2 layers) + BPE tokenizer + ChatML template, as an HF dir."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def default_model():
    """The real default model's files; skips the test when it is not materialized."""
    from localalign.models import materialized

    files = materialized("smollm2-135m-instruct")
    if files.gguf is None or files.hf_dir is None:
        pytest.skip("default model not materialized (run `make models`)")
    return files


@pytest.fixture(scope="session")
def seeds_dir() -> Path:
    from localalign.paths import SEEDS_DIR

    return SEEDS_DIR


# ---- export


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model as an f32 GGUF, written by llama.cpp's converter (convert.converter)."""
    from localalign.convert.converter import convert_hf

    return convert_hf(tiny_hf_dir, tmp_path_factory.mktemp("tiny_gguf") / "tiny.f32.gguf", out_type="f32")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_hf_dir, tmp_path_factory):
    """A PEFT LoRA on the tiny model with random nonzero B (an untrained adapter is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


# ---- generate


@pytest.fixture(scope="session")
def embedder():
    """The packaged all-MiniLM-L6-v2 (90 MB, loads offline in seconds), loaded once."""
    from localalign.isara.retrieve import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_hf_dir, tmp_path_factory, seeds_dir) -> Path:
    """The tiny model fitted to the safety seeds' chats: it writes turns that end (HF dir)."""
    import json

    pairs = [(json.loads(line)["prompt"], json.loads(line)["response"]) for line in open(seeds_dir / "safety.jsonl")]
    return fit_tiny_to_chats(tiny_hf_dir, tmp_path_factory.mktemp("chat") / "hf", pairs, steps=200)


@pytest.fixture(scope="session")
def tiny_chat_gguf(tiny_chat_model, tmp_path_factory) -> Path:
    """`tiny_chat_model` as an f32 GGUF."""
    from localalign.convert.converter import convert_hf

    return convert_hf(tiny_chat_model, tmp_path_factory.mktemp("chat_gguf") / "chat.f32.gguf", out_type="f32")


# ---- the tool as a user installs it (tests/installed.py)


@pytest.fixture(scope="session")
def installed_tool(tmp_path_factory):
    """localalign built as a wheel and installed into a fresh venv (tests/installed.py)."""
    from installed import build_wheel, install

    root = tmp_path_factory.mktemp("installed")
    return install(build_wheel(root), root)


@pytest.fixture(scope="session")
def installed_tiny_run(installed_tool, tiny_chat_model):
    """The tiny end-to-end align, run by the installed tool from a directory outside the checkout:
    (the run directory, the finished process)."""
    from installed import TINY_RUN_TOML

    (installed_tool.workdir / "run.toml").write_text(TINY_RUN_TOML)
    r = installed_tool.run(str(installed_tool.cli), "align", "--domain", "safety", "--model", str(tiny_chat_model),
                           "--run-dir", "run", "--config", "run.toml", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return installed_tool.workdir / "run", r
