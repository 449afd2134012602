"""A user's model, every way it can come in: an HF folder, a GGUF file, Ollama's store, the
Hugging Face cache, a name of the user's own; checked before anything is written, and costed
for this machine."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from localalign.errors import UserError
from localalign.models import (
    add_user_model,
    hf_cache_snapshot,
    ollama_blob,
    resolve_model,
    user_models,
)


# ---------------------------------------------------------------------------- Ollama's store


def _ollama_store(root, gguf, name=("registry.ollama.ai", "library", "tiny"), tag="latest", extra_layers=()):
    """An Ollama models folder as `ollama pull` leaves it: manifests/HOST/NAMESPACE/NAME/TAG names
    the model blob by digest, blobs/sha256-<hex> holds it."""
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    manifest = root / "manifests" / "/".join(name) / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
              {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64}, *extra_layers]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return root


def test_ollama_model_resolves_to_its_blob(tiny_gguf, tmp_path, monkeypatch):
    store = _ollama_store(tmp_path / "ollama", tiny_gguf)
    _ollama_store(store, tiny_gguf, name=("registry.ollama.ai", "someone", "tiny"), tag="q8")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    files = resolve_model("ollama:tiny")
    assert files.gguf.read_bytes() == tiny_gguf.read_bytes() and files.hf_dir is None
    assert resolve_model("ollama:tiny:latest").gguf == files.gguf
    assert resolve_model("ollama:someone/tiny:q8").gguf.is_file()


def test_ollama_missing_model_adapter_layer_and_foreign_blob_are_one_line_each(tiny_gguf, tmp_path, monkeypatch):
    store = _ollama_store(tmp_path / "ollama", tiny_gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(UserError, match="not in the Ollama store.*ollama pull other"):
        resolve_model("ollama:other")
    with pytest.raises(UserError, match="not an Ollama model name"):
        resolve_model("ollama:../../etc")
    _ollama_store(store, tiny_gguf, name=("registry.ollama.ai", "library", "tuned"),
                  extra_layers=[{"mediaType": "application/vnd.ollama.image.adapter", "digest": "sha256:" + "1" * 64}])
    with pytest.raises(UserError, match="adapter layer"):
        ollama_blob("tuned", store)
    fake = tmp_path / "not.gguf"
    fake.write_bytes(b"NOPE" * 100)
    _ollama_store(store, fake, name=("registry.ollama.ai", "library", "junk"))
    with pytest.raises(UserError, match="not a GGUF file"):
        ollama_blob("junk", store)


# ---------------------------------------------------------------------------- the Hugging Face cache


def _hf_cache(root, hf_dir, repo="tiny-org/tiny-model", commit="a" * 40, ref="main"):
    """The layout huggingface_hub's cache has: models--ORG--NAME/refs/REF -> snapshots/COMMIT/."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    shutil.copytree(hf_dir, snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot


def test_hf_id_in_the_cache_resolves_to_its_snapshot(tiny_hf_dir, tmp_path, monkeypatch):
    snapshot = _hf_cache(tmp_path / "hub", tiny_hf_dir)
    _hf_cache(tmp_path / "hub", tiny_hf_dir, commit="b" * 40, ref="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    files = resolve_model("tiny-org/tiny-model")
    assert files.hf_dir == snapshot and files.gguf is None
    assert resolve_model("tiny-org/tiny-model@v1").hf_dir.name == "b" * 40
    assert hf_cache_snapshot("tiny-org/tiny-model@" + "a" * 40, cache=tmp_path / "hub") == snapshot


def test_hf_id_not_cached_is_not_downloaded_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not in the Hugging Face cache.*--download"):
        resolve_model("nobody/nothing")
    assert not (tmp_path / "empty").exists()  # nothing was fetched or made


# ---------------------------------------------------------------------------- the user's names


def test_models_add_records_a_checked_source_that_resolves_afterwards(tiny_hf_dir, tmp_path, monkeypatch):
    import localalign.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "home")
    add_user_model("mine", str(tiny_hf_dir))
    assert user_models() == {"mine": str(tiny_hf_dir.resolve())}
    assert resolve_model("mine").hf_dir == tiny_hf_dir.resolve()
    add_user_model("mine2", str(tiny_hf_dir))
    assert sorted(user_models()) == ["mine", "mine2"]  # one file, both kept


def test_models_add_refuses_bad_names_and_sources_writing_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    import localalign.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "home")
    with pytest.raises(UserError, match="model name"):
        add_user_model("../evil", str(tiny_hf_dir))
    with pytest.raises(UserError, match="registry model's name"):
        add_user_model("smollm2-135m-instruct", str(tiny_hf_dir))
    with pytest.raises(UserError, match="no such file"):
        add_user_model("ghost", str(tmp_path / "nowhere" / "x.gguf"))
    assert not (tmp_path / "home" / models.USER_MODELS).exists()


def test_cli_models_add_prints_the_check(tiny_hf_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import localalign.models as models
    from localalign.cli import main

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "home")
    res = CliRunner().invoke(main, ["models", "add", "mine", str(tiny_hf_dir)])
    assert res.exit_code == 0, res.output
    assert "family:       llama" in res.output and "end of turn:  <|im_end|>" in res.output
    res = CliRunner().invoke(main, ["models", "add", "bad name", str(tiny_hf_dir)])
    assert res.exit_code == 2 and res.output.startswith("error:")


# ---------------------------------------------------------------------------- the checks


def test_inspect_counts_parameters_exactly(tiny_hf_dir, tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    from localalign.checks.model_input import inspect_model

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    hf = inspect_model("tiny", None, tiny_hf_dir)
    gguf = inspect_model("tiny", tiny_gguf, None)
    assert hf.dims.params == n and hf.dims.tied and hf.family.name == "llama"
    assert gguf.dims.params == n and gguf.quant == "all_f32"
    assert hf.end_of_turn == gguf.end_of_turn == ["<|im_end|>"]


def test_inspect_refuses_what_cannot_be_aligned(tiny_hf_dir, tmp_path):
    from localalign.checks.model_input import inspect_model

    no_template = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no chat template"):
        inspect_model("x", None, no_template)
    odd = tmp_path / "odd"
    shutil.copytree(tiny_hf_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(config, model_type="rwkv")))
    with pytest.raises(UserError, match="'rwkv' is not a family"):
        inspect_model("x", None, odd)


def test_a_base_gguf_without_template_borrows_its_familys(tmp_path):
    """A Gemma GGUF with no chat template (as the pretrained gemma3-270m's): the family's is used,
    and the report says so."""
    from localalign.checks.model_input import inspect_model
    from localalign.export.pipeline import export_model
    from tiny_families import build_tiny_family

    hf = build_tiny_family("gemma3", tmp_path / "tiny-gemma3")
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    gguf = tmp_path / "base.gguf"
    export_model(hf, gguf, out_type="f32", check=False)
    report = inspect_model("base", gguf, None)
    assert "the gemma3 family's" in report.template and "<end_of_turn>" in report.end_of_turn
    assert "pretrained base model" in report.describe()  # warned before a run spends its time


# ---------------------------------------------------------------------------- what fits


def _measured(monkeypatch):
    import localalign.fit as fit

    # two measured sizes: rates halve with size, 8 bytes per parameter at the peak; training
    # stores frozen weights in bf16 (as on a CPU with native bf16), whatever this machine has
    monkeypatch.setattr(fit, "MEASURED", ((1e8, 400.0, 100.0, 200.0, 10.0, 8e8), (4e8, 100.0, 25.0, 50.0, 40.0, 3.2e9)))
    monkeypatch.setattr(fit, "cpu_has_native_bf16", lambda: True)
    return fit


def test_rates_interpolate_on_a_log_log_line(monkeypatch):
    fit = _measured(monkeypatch)
    assert fit._rate(2e8, 1) == pytest.approx(200.0)  # halfway in log: rate ~ 1 / params
    assert fit._rate(1.6e9, 3) == pytest.approx(50.0 / 4)  # extrapolated along the last segment


def test_round_estimate_adds_its_stages(monkeypatch, tiny_hf_dir):
    from localalign.checks.model_input import ModelDims
    from localalign.train.config import TrainConfig

    fit = _measured(monkeypatch)
    dims = ModelDims(params=100_000_000, hidden=512, intermediate=1536, layers=16, heads=8, kv_heads=4,
                     head_dim=64, vocab=32000, tied=True)
    e = fit.estimate_round(dims, samples=24, seeds=60, rehearsal=32, train=TrainConfig())
    assert e.generation_s == pytest.approx(24 * (372 / 100 + 290 / 400))
    assert e.training_s == pytest.approx((60 + 24 + 32) * 160 * 3 / 200)
    assert e.peak_bytes == max(800_000_000, e.training_bytes) and "round of 24" in e.describe(24)


def test_a_model_that_cannot_fit_is_refused_saying_what_would(monkeypatch):
    from localalign.checks.model_input import ModelDims
    from localalign.train.config import TrainConfig

    fit = _measured(monkeypatch)
    dims = ModelDims(params=3_000_000_000, hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8,
                     head_dim=128, vocab=128256, tied=True)
    e = fit.estimate_round(dims, 24, 60, 32, TrainConfig())
    with pytest.raises(UserError, match=r"needs about 22.4 GiB .* 8.0 GiB is available: a model of at most ~1074 M"):
        fit.check_fits(e, dims, TrainConfig(), available=8 * 2**30)
    fit.check_fits(e, dims, TrainConfig(), available=64 * 2**30)  # fits: no error
    assert fit.available_memory("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2048 * 1024
