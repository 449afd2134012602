"""Every family in localalign/families.py goes in and comes back out with parity.

For each family, a tiny random model built with transformers' own config class
(tests/tiny_families.py) is:

1. exported by llama.cpp's converter as an f32 GGUF, loaded by our llama.cpp build and checked
   against the HF model (token ids on probes and chat-templated conversations, BOS/EOS, chat
   template, our renderer against transformers', stop tokens, next-token logits within the f32
   bound);
2. given a random LoRA adapter on the family's target modules, exported as a GGUF LoRA and checked
   on the base GGUF against the merged HF model;
3. where transformers reads the family from GGUF: made into an HF copy from that GGUF (the way a
   user's GGUF comes in), checked against it, and exported again from the copy with parity.

f32 throughout: a random model's logits over 49k tokens are too flat for top-1 agreement to mean
anything after quantization; the quantized path is tested on fitted and real models.
"""

from __future__ import annotations

import json

import pytest

from localalign.families import FAMILIES
from tiny_families import BUILDERS, build_tiny_family, folder_name

FAMILY_NAMES = [f.name for f in FAMILIES]


def test_every_family_in_the_table_has_a_tiny_model():
    assert sorted(BUILDERS) == sorted(FAMILY_NAMES)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family name -> its tiny HF folder (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_tiny_family(name, root / folder_name(name))
        return cache[name]

    return get


def _random_adapter(hf_dir, targets, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # an untrained adapter (B = 0) would be a no-op
    model.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_exports_with_parity(name, built, tmp_path):
    from localalign.checks.parity import MAX_ABS_LOGIT_DIFF, check_copy
    from localalign.convert.gguf_to_hf import make_hf_copy
    from localalign.export.pipeline import export_adapter, export_model
    from localalign.families import family_of_config
    from localalign.gguf_header import read_gguf_header

    hf = built(name)
    family = family_of_config(json.loads((hf / "config.json").read_text()))
    assert family.name == name

    gguf = tmp_path / "model.f32.gguf"
    report = export_model(hf, gguf, out_type="f32")
    assert report.ok, report.summary()
    assert report.details["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF["f32"]
    assert report.checks["stop_tokens"] and report.checks["chat_template"]
    assert read_gguf_header(gguf)["general.architecture"] in (family.gguf_archs or ("llama",))

    adapter = _random_adapter(hf, family.lora_targets, tmp_path / "adapter")
    lora = export_adapter(hf, adapter, tmp_path / "adapter.gguf", gguf)
    assert lora.ok, lora.summary()
    assert lora.details["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF["f32"]

    if family.hf_from_gguf:
        copy = tmp_path / "copy"
        make_hf_copy(gguf, copy, log=lambda m: None)
        check = check_copy(gguf, copy)
        assert check.ok, check.summary()
        again = export_model(copy, tmp_path / "again.f32.gguf", out_type="f32")
        assert again.ok, again.summary()


@pytest.mark.slow
def test_the_adapter_check_can_fail(built, tmp_path):
    """The base GGUF without the adapter is far from the merged model: the check sees adapters."""
    from localalign.checks.parity import MAX_ABS_LOGIT_DIFF, check_export
    from localalign.export.pipeline import export_model
    from localalign.families import family_of_config
    from localalign.train.merge import merge_adapter

    hf = built("phi3")  # fused q/k/v and gate/up: the targets differ from the rest
    family = family_of_config(json.loads((hf / "config.json").read_text()))
    gguf = tmp_path / "base.gguf"
    export_model(hf, gguf, out_type="f32")
    merged = merge_adapter(hf, _random_adapter(hf, family.lora_targets, tmp_path / "adapter"), tmp_path / "merged")
    without = check_export(merged, gguf, max_abs_tol=MAX_ABS_LOGIT_DIFF["f32"], min_top1=0.0)
    assert not without.ok and without.details["max_abs_logit_diff"] > 0.5


# ---------------------------------------------------------------------------- the family facts


def _tokenizer(built, name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built(name))


def test_qwen3_writes_an_empty_think_block_where_the_answer_starts(built):
    from localalign.chat import render_conversation
    from localalign.families import family_of_config

    tok = _tokenizer(built, "qwen3")
    family = family_of_config({"model_type": "qwen3"})
    text = render_conversation(tok.chat_template, [{"role": "user", "content": "hi"}], family)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # without the family's variable the template would let the model think
    assert not render_conversation(tok.chat_template, [{"role": "user", "content": "hi"}], None).endswith("</think>\n\n")


def test_training_data_of_qwen3_has_the_think_block_before_the_answer(built):
    from localalign.families import family_of_config
    from localalign.samples import Sample
    from localalign.train.data import encode_sample, end_of_turn_ids

    tok = _tokenizer(built, "qwen3")
    family = family_of_config({"model_type": "qwen3"})
    e = encode_sample(tok, Sample("hi", "hello there"), end_of_turn_ids(tok, None, family), family)
    prompt = tok.decode([i for i, label in zip(e.input_ids, e.labels) if label == -100])
    assert prompt.endswith("<think>\n\n</think>\n\n") and tok.decode([t for t in e.labels if t != -100]) == "hello there<|im_end|>"


def test_dated_templates_render_the_same_on_any_day(built, monkeypatch):
    """Llama 3's "Today Date" and Granite's: fixed (families.TEMPLATE_DATE), so the same seeds give
    the same training data whenever they are rendered."""
    import datetime

    from localalign.chat import render_conversation
    from localalign.families import TEMPLATE_DATE, family_of_config

    for name, fmt in (("llama", "%d %b %Y"), ("granite", "%B %d, %Y")):
        tok = _tokenizer(built, name)
        family = family_of_config(json.loads((built(name) / "config.json").read_text()))
        text = render_conversation(tok.chat_template, [{"role": "user", "content": "hi"}], family)
        assert TEMPLATE_DATE.strftime(fmt) in text
        today = datetime.date.today().strftime(fmt)
        assert today == TEMPLATE_DATE.strftime(fmt) or today not in text


def test_gemma2_has_no_system_role_so_the_system_prompt_opens_the_first_turn(built):
    from localalign.chat import render_conversation
    from localalign.errors import UserError
    from localalign.families import family_of_config

    tok = _tokenizer(built, "gemma2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = render_conversation(tok.chat_template, messages, family_of_config({"model_type": "gemma2"}))
    assert "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>" in text
    with pytest.raises(UserError, match="System role not supported"):
        render_conversation(tok.chat_template, messages, None)  # the template itself refuses


def test_end_of_turn_comes_from_the_family_when_the_model_does_not_name_it(built):
    """Gemma's turns end with <end_of_turn>, which a base model's config does not list as eos."""
    from localalign.families import family_of_config
    from localalign.train.data import end_of_turn_ids

    tok = _tokenizer(built, "gemma3")
    family = family_of_config({"model_type": "gemma3_text"})
    assert tok.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(tok, None, family)
    assert tok.convert_tokens_to_ids("<end_of_turn>") not in end_of_turn_ids(tok, None, None)


def test_phi3_trains_its_fused_projections(built, tmp_path):
    from localalign.samples import Sample
    from localalign.train.config import TrainConfig
    from localalign.train.lora import train

    res = train(built("phi3"), [Sample("hi", "hello"), Sample("a question", "an answer")], tmp_path,
                TrainConfig(epochs=1, progress=False), log=lambda m: None)
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    recorded = json.loads((tmp_path / "train_config.json").read_text())["target_modules"]
    assert sorted(recorded) == sorted(cfg["target_modules"])  # the resolved default is what the run records


def test_a_family_not_in_the_table_is_refused_in_one_line(tmp_path):
    from localalign.errors import UserError
    from localalign.families import family_of_config, family_of_gguf

    with pytest.raises(UserError, match=r"model type 'gpt_neox' is not a family localalign supports; supported: llama"):
        family_of_config({"model_type": "gpt_neox"}, tmp_path)
    with pytest.raises(UserError, match=r"GGUF architecture 'mamba' is not a family"):
        family_of_gguf("mamba", tmp_path)


def test_a_gguf_transformers_cannot_read_is_refused_naming_the_family(built, tmp_path):
    from localalign.convert.gguf_to_hf import make_hf_copy
    from localalign.errors import UserError
    from localalign.export.pipeline import export_model

    gguf = tmp_path / "smollm3.gguf"
    export_model(built("smollm3"), gguf, out_type="f32", check=False)
    with pytest.raises(UserError, match="transformers cannot read a smollm3 GGUF.*Hugging Face folder"):
        make_hf_copy(gguf, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
