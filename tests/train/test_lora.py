"""The LoRA trainer on the tiny fixture: masking, packing, learning, resume, merge, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localalign.config import from_dict
from localalign.errors import UserError
from localalign.samples import Sample, write_samples
from localalign.train.checkpoint import latest_checkpoint
from localalign.train.config import TrainConfig
from localalign.train.data import (
    IGNORE,
    Encoded,
    collate_packed,
    collate_padded,
    encode_sample,
    end_of_turn_ids,
    epoch_plan,
)
from localalign.train.lora import lr_factor, train
from localalign.train.model import forward_backward, response_loss_sum

SAMPLES = [
    Sample(f"What is {i} plus {i}?", f"The answer is {2 * i}. Water boils at 100 degrees.") for i in range(10)
] + [Sample("Say hi.", "Hi! I can help with that.", system="Be brief.")]


def quiet(**kw) -> TrainConfig:
    base = dict(progress=False, threads=1, cpu_bf16=False, learning_rate=3e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("sample", [SAMPLES[3], SAMPLES[-1]])
def test_prompt_tokens_are_masked_and_response_ends_with_end_of_turn(tok, tiny_hf_dir, sample):
    e = encode_sample(tok, sample, end_of_turn_ids(tok, tiny_hf_dir))
    messages = ([{"role": "system", "content": sample.system}] if sample.system else []) + [
        {"role": "user", "content": sample.prompt}
    ]
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    n = len(prompt_ids)
    assert e.input_ids[:n] == prompt_ids
    assert e.labels[:n] == [IGNORE] * n
    assert e.labels[n:] == e.input_ids[n:]
    assert e.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(e.labels[n:]) == sample.response + "<|im_end|>"
    assert e.input_ids[:2] != [tok.bos_token_id, tok.bos_token_id]


def test_template_without_end_of_turn_is_a_user_error(tok, tiny_hf_dir):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="end-of-turn"):
        encode_sample(t, SAMPLES[0], end_of_turn_ids(tok, tiny_hf_dir))


@pytest.mark.parametrize("batching", ["pack", "bucket"])
def test_epoch_plan_is_a_deterministic_permutation(batching):
    lengths = [5, 50, 7, 48, 6, 49, 8, 51, 30]
    plan = epoch_plan(lengths, 2, seed=1, epoch=0, batching=batching)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert plan == epoch_plan(lengths, 2, seed=1, epoch=0, batching=batching)
    assert plan != epoch_plan(lengths, 2, seed=1, epoch=1, batching=batching)
    if batching == "bucket":  # neighbours in length share a batch: little padding
        assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 21 for b in plan)


def test_collation_shifts_targets_within_each_sample():
    a, b = Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [IGNORE, 5])
    packed = collate_packed([a, b])
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE]]  # sample a never predicts b's first token
    padded = collate_padded([a, b], pad_id=0)
    assert padded["targets"].tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_packed_loss_equals_separate_and_padded_loss(tok, tiny_hf_dir):
    """Packed samples must not attend to each other: same loss as one sample at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="sdpa").eval()
    eot = end_of_turn_ids(tok, tiny_hf_dir)
    data = [encode_sample(tok, s, eot) for s in SAMPLES[:4]]
    with torch.no_grad():
        packed = response_loss_sum(model.model, model.lm_head, collate_packed(data)).item()
        padded = response_loss_sum(model.model, model.lm_head, collate_padded(data, tok.pad_token_id)).item()
        separate = sum(response_loss_sum(model.model, model.lm_head, collate_packed([e])).item() for e in data)
        # HF's own loss (mean over shifted labels) for one sample agrees with ours
        hf = model(input_ids=torch.tensor([data[0].input_ids]), labels=torch.tensor([data[0].labels])).loss.item()
    ours = response_loss_sum(model.model, model.lm_head, collate_packed(data[:1])).item() / data[0].n_targets
    assert packed == pytest.approx(separate, rel=1e-5)
    assert padded == pytest.approx(separate, rel=1e-5)
    assert ours == pytest.approx(hf, rel=1e-5)


def test_chunked_output_layer_gives_the_same_gradients(tok, tiny_hf_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    data = [encode_sample(tok, s, end_of_turn_ids(tok, tiny_hf_dir)) for s in SAMPLES[:3]]
    batch = collate_packed(data)
    lora = [p for p in model.parameters() if p.requires_grad]
    (0.5 * response_loss_sum(base.model, base.lm_head, batch)).backward()
    want = [p.grad.clone() for p in lora]
    model.zero_grad()
    total = forward_backward(base.model, base.lm_head, batch, 0.5, chunk=7)
    assert total == pytest.approx(response_loss_sum(base.model, base.lm_head, batch).item(), rel=1e-5)
    for p, g in zip(lora, want):  # summation order differs: float noise only
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min():
    f = [lr_factor(s, 20, 0.1, 0.1) for s in range(20)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert f[-1] == pytest.approx(0.1)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("batching,bf16", [("pack", False), ("bucket", False), ("pack", True)])
def test_loss_falls_on_a_tiny_overfitting_set(tiny_hf_dir, tmp_path, batching, bf16):
    res = train(tiny_hf_dir, SAMPLES, tmp_path, quiet(epochs=8, batching=batching, cpu_bf16=bf16), log=lambda m: None)
    assert res.steps == 8 * 2  # 11 samples, batch 4 x accum 2 -> 2 steps per epoch
    # From ~12.3 (a random model over SmolLM2's 49k tokens; chance is 10.8) to ~6.2 in 16 steps.
    assert res.final_loss < 0.6 * res.losses[0]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 17))
    assert all(x["tokens_per_s"] > 0 and x["lr"] > 0 for x in lines)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class Stop(Exception):
    pass


def stop_at(k):
    def on_step(rec):
        if rec.step == k:
            raise Stop

    return on_step


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_resume_after_stop_gives_the_uninterrupted_adapter(tiny_hf_dir, tmp_path, batching):
    # dropout > 0 so the restored RNG state matters; 3 steps per epoch, stop mid-epoch 2
    cfg = quiet(epochs=3, batch_size=2, grad_accum=2, dropout=0.1, checkpoint_every=2, batching=batching)
    full = train(tiny_hf_dir, SAMPLES, tmp_path / "full", cfg, log=lambda m: None)
    with pytest.raises(Stop):
        train(tiny_hf_dir, SAMPLES, tmp_path / "cut", cfg, log=lambda m: None, on_step=stop_at(5))
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-000004"
    assert not (tmp_path / "cut" / "adapter").exists()
    # a temp dir left by a kill during a checkpoint write is ignored
    (tmp_path / "cut" / "checkpoints" / ".tmp-killed").mkdir()
    resumed = train(tiny_hf_dir, SAMPLES, tmp_path / "cut", cfg, resume=True, log=lambda m: None)
    assert resumed.steps == full.steps == 9
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000009"]


def test_resume_refuses_other_data_and_fresh_run_refuses_checkpoints(tiny_hf_dir, tmp_path):
    cfg = quiet(epochs=1, checkpoint_every=1)
    train(tiny_hf_dir, SAMPLES, tmp_path, cfg, log=lambda m: None)
    with pytest.raises(UserError, match="--resume"):
        train(tiny_hf_dir, SAMPLES, tmp_path, cfg, log=lambda m: None)
    with pytest.raises(UserError, match="other data"):
        train(tiny_hf_dir, SAMPLES[:5], tmp_path, cfg, resume=True, log=lambda m: None)


def test_merged_model_logits_equal_base_plus_adapter(tiny_hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from localalign.train.merge import merge_adapter

    res = train(tiny_hf_dir, SAMPLES, tmp_path / "run", quiet(epochs=2), log=lambda m: None)
    assert any(v.abs().max() > 0 for k, v in adapter_tensors(tmp_path / "run").items() if "lora_B" in k)
    merged_dir = merge_adapter(tiny_hf_dir, res.adapter_dir, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 77, 200, 31, 9, 2, 1, 300]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
        plain = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, res.adapter_dir).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(merged, with_adapter, rtol=0, atol=1e-4)
    assert (merged - plain).abs().max() > 1e-2  # the adapter changed something


def test_init_adapter_continues_from_the_previous_round(tiny_hf_dir, tmp_path):
    first = train(tiny_hf_dir, SAMPLES, tmp_path / "r1", quiet(epochs=6), log=lambda m: None)
    again = train(
        tiny_hf_dir, SAMPLES, tmp_path / "r2", quiet(epochs=1), init_adapter=first.adapter_dir, log=lambda m: None
    )
    assert again.losses[0] < 0.6 * first.losses[0]
    with pytest.raises(UserError, match="not a PEFT adapter"):
        train(tiny_hf_dir, SAMPLES, tmp_path / "r3", quiet(epochs=1), init_adapter=tmp_path, log=lambda m: None)


def test_config_validation_is_loud():
    with pytest.raises(UserError, match="lm_head"):
        TrainConfig(target_modules=("q_proj", "lm_head"))
    with pytest.raises(UserError, match="unknown key.*lora_rank"):
        from_dict(TrainConfig, {"epochs": 1, "lora_rank": 8}, "train config")
    with pytest.raises(UserError, match="batching"):
        TrainConfig(batching="zip")


def test_unknown_target_module_is_a_user_error(tiny_hf_dir, tmp_path):
    with pytest.raises(UserError, match="not linear layers"):
        train(tiny_hf_dir, SAMPLES, tmp_path, quiet(target_modules=("qkv_proj",)), log=lambda m: None)


# --------------------------------------------------------------------------- CLI


def test_cli_train_writes_adapter_and_merged_model(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from localalign.cli import main

    data = tmp_path / "data.jsonl"
    write_samples(data, SAMPLES)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--epochs", "1"]
    r = CliRunner().invoke(main, args + ["--lr", "1e-3", "--threads", "1", "--merged", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 1e-3
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(main, ["train", "--model", str(tiny_hf_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert r.exit_code == 2 and "error:" in r.output


@pytest.mark.slow
def test_kill_minus_9_leaves_a_loadable_checkpoint(tiny_hf_dir, tmp_path):
    """A run killed at an arbitrary moment resumes to the uninterrupted result."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data.jsonl"
    write_samples(data, SAMPLES)
    cfg = dict(epochs=20, batch_size=2, grad_accum=1, checkpoint_every=1, threads=1, cpu_bf16=False, learning_rate=3e-3)
    code = (
        "import sys; from localalign.train.lora import train; from localalign.train.config import TrainConfig;"
        " from localalign.samples import read_samples;"
        f"train(sys.argv[1], read_samples(sys.argv[2]), sys.argv[3], TrainConfig(progress=False, **{cfg!r}), resume=True)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_hf_dir), str(data), str(tmp_path / "cut")], env=env)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and (latest_checkpoint(ckpts) is None or latest_checkpoint(ckpts).name < "step-000005"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(ckpts) is not None
    full = train(tiny_hf_dir, SAMPLES, tmp_path / "full", quiet(**cfg), log=lambda m: None)
    resumed = train(tiny_hf_dir, SAMPLES, tmp_path / "cut", quiet(**cfg), resume=True, log=lambda m: None)
    assert resumed.steps == full.steps
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_training(tiny_hf_dir, tmp_path):
    plain = train(tiny_hf_dir, SAMPLES, tmp_path / "a", quiet(epochs=2), log=lambda m: None)
    ckpt = train(tiny_hf_dir, SAMPLES, tmp_path / "b", quiet(epochs=2, gradient_checkpointing=True), log=lambda m: None)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- preference pairs


def test_row_logps_match_the_summed_token_loss(tok, tiny_hf_dir):
    """A row's log-probability is minus its summed response loss (the SFT path)."""
    from transformers import AutoModelForCausalLM

    from localalign.train.model import row_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    eot = end_of_turn_ids(tok, tiny_hf_dir)
    rows = [encode_sample(tok, s, eot) for s in SAMPLES[:3]]
    batch = collate_padded(rows, tok.pad_token_id)
    with torch.no_grad():
        lp = row_logps(model.model, model.get_output_embeddings(), batch)
        total = response_loss_sum(model.model, model.get_output_embeddings(), batch)
    assert lp.shape == (3,)
    assert float(-lp.sum()) == pytest.approx(float(total), rel=1e-5)


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_margin_grows():
    from localalign.train.model import preference_loss

    at_ref = preference_loss(torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), 0.1)
    assert float(at_ref) == pytest.approx(0.6931, abs=1e-4)
    better = preference_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), 0.1)
    assert float(better) < float(at_ref)


PAIRED = [
    Sample(f"Tell me fact number {i}.", f"Fact {i}: water boils at 100 degrees at sea level.",
           meta={"rejected_response": "I can't help with that."}) for i in range(8)
]


def test_sft_plus_pref_moves_probability_from_the_rejected_answer(tok, tiny_hf_dir, tmp_path):
    """With the preference objective the rejected answers lose probability against the chosen
    ones (the DPO loss falls below log 2); SFT alone on the same data does not see them."""
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    from localalign.train.model import row_logps

    cfg = quiet(epochs=6, objective="sft+pref", pref_beta=0.5, batch_size=4, grad_accum=1)
    logged = []
    res = train(tiny_hf_dir, PAIRED, tmp_path / "pref", cfg, log=logged.append)
    assert any("preference pairs: 8 of 8" in m for m in logged)
    lines = [json.loads(x) for x in (tmp_path / "pref" / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["pref_loss"] == pytest.approx(0.693, abs=0.01)  # the reference is the starting model
    assert lines[-1]["pref_loss"] < 0.6
    sft = train(tiny_hf_dir, PAIRED, tmp_path / "sft", quiet(epochs=6, batch_size=4, grad_accum=1), log=lambda m: None)
    assert all(json.loads(x)["pref_loss"] is None for x in (tmp_path / "sft" / "train_log.jsonl").read_text().splitlines())

    def margin(run_dir):
        base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
        eot = end_of_turn_ids(tok, tiny_hf_dir)
        s = PAIRED[0]
        rows = [encode_sample(tok, s, eot), encode_sample(tok, Sample(s.prompt, s.meta["rejected_response"]), eot)]
        with torch.no_grad():
            lp = row_logps(model.model, model.get_output_embeddings(), collate_padded(rows, tok.pad_token_id))
        return float(lp[0] - lp[1])

    assert margin(tmp_path / "pref") > margin(tmp_path / "sft")
    assert res.steps == sft.steps


def test_pairs_need_bucketed_batches():
    with pytest.raises(UserError, match="bucket"):
        TrainConfig(objective="sft+pref", batching="pack")
