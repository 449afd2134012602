"""GGUF export: writer, quantization, LoRA adapters, parity, Modelfile, CLI.

Everything runs on the tiny fixture model; the default-model checks are marked realmodel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from localalign.errors import UserError
from localalign.export import llama_cpp_pre_name, permute_qk, write_gguf


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path), "r").tensors}


# ---------------------------------------------------------------------------- pure pieces


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _tj(pre, model_type="BPE", normalizer=None):
    return {"model": {"type": model_type}, "normalizer": normalizer, "pre_tokenizer": pre}


def test_pre_name_gpt2_and_smollm():
    assert llama_cpp_pre_name(_tj(BYTE_LEVEL)) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
    assert llama_cpp_pre_name(_tj(digits)) == "smollm"


def test_pre_name_refuses_unknown_split_and_prefix_space():
    split = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False},
            dict(BYTE_LEVEL, use_regex=False),
        ],
    }
    with pytest.raises(UserError, match="no known llama.cpp equivalent"):
        llama_cpp_pre_name(_tj(split))
    with pytest.raises(UserError, match="no known llama.cpp equivalent"):
        llama_cpp_pre_name(_tj(dict(BYTE_LEVEL, add_prefix_space=True)))
    with pytest.raises(UserError, match="Unigram"):
        llama_cpp_pre_name(_tj(BYTE_LEVEL, model_type="Unigram"))


def test_permute_qk_interleaves_halves_per_head():
    # one head of dim 4: HF rows [r0 r1 | i0 i1] -> llama.cpp rows [r0 i0 r1 i1]
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # two heads of 4 rows
    out = permute_qk(w, n_head=2)[:, 0].tolist()
    assert out == [0, 2, 1, 3, 4, 6, 5, 7]


# ---------------------------------------------------------------------------- writer


def test_f32_export_matches_hf_logits(tiny_hf_dir, tiny_gguf):
    from localalign.export import F32_MAX_ABS_LOGIT_DIFF, check_export

    report = check_export(tiny_hf_dir, tiny_gguf, max_abs_tol=F32_MAX_ABS_LOGIT_DIFF, min_top1=1.0)
    assert report.ok, report.summary()
    assert report.details["max_abs_logit_diff"] <= F32_MAX_ABS_LOGIT_DIFF


def test_chat_template_and_specials_carried_over(tiny_hf_dir, tiny_gguf):
    from transformers import AutoTokenizer

    from localalign.parity import read_gguf_metadata

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    meta = read_gguf_metadata(tiny_gguf)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["general.architecture"] == "llama"


def test_f16_and_bf16_keep_norms_f32(tiny_hf_dir, tmp_path):
    from gguf import GGMLQuantizationType as Q

    for out_type, qtype in (("f16", Q.F16), ("bf16", Q.BF16)):
        tensors = _tensors(write_gguf(tiny_hf_dir, tmp_path / f"m.{out_type}.gguf", out_type=out_type))
        assert tensors["blk.0.attn_q.weight"].tensor_type == qtype
        assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
        assert tensors["output_norm.weight"].tensor_type == Q.F32
        assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd


def test_unsupported_architecture_refused_before_writing(tiny_hf_dir, tmp_path):
    import shutil

    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"'gpt2' cannot be exported.*supported: llama, qwen2"):
        write_gguf(bad, out / "x.gguf")
    assert list(out.iterdir()) == []  # no file and no temp file left behind


def test_bad_out_type_refused(tiny_hf_dir, tmp_path):
    with pytest.raises(UserError, match="q8_0"):
        write_gguf(tiny_hf_dir, tmp_path / "x.gguf", out_type="q8_0")
    assert not (tmp_path / "x.gguf").exists()
