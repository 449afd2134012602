"""The trainer's device layout (train/layout.py): the GPU's choices with numbers, and the GPU's
layout run on the CPU (padded widths, one micro-batch per step, causal attention without a mask,
fused AdamW) against the CPU's own, plus the device reads a step makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localalign.samples import Sample
from localalign.train.config import TrainConfig
from localalign.train.data import collate_padded, encode_sample, end_of_turn_ids
from localalign.train.distributed import World
from localalign.train.layout import (
    LOGIT_CHUNK,
    MAX_TOKEN_BUDGET,
    MIN_TOKEN_BUDGET,
    Layout,
    activation_bytes_per_token,
    choose_layout,
    logit_chunk,
    model_dims,
    padded_width,
    regroup,
    step_batches,
    token_budget,
)

GB = 10**9
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
SAMPLES = [
    Sample(f"What is {i} plus {i}?", f"The answer is {2 * i}. Water boils at 100 degrees." + " Really." * (i % 4))
    for i in range(10)
] + [Sample("Say hi.", "Hi! I can help with that.", system="Be brief.")]


# --------------------------------------------------------------------------- pure choices


def test_model_dims_and_the_activation_estimate_for_smollm2():
    assert model_dims(SMOLLM2) == (576, 1536, 30, 192)
    assert model_dims({**SMOLLM2, "head_dim": None, "num_key_value_heads": None}) == (576, 1536, 30, 576)
    per_token = activation_bytes_per_token(*model_dims(SMOLLM2))
    # 37,632 bytes per layer in bf16 (hooks counted 29.5 KB), x30 layers, x1.5 headroom
    assert per_token == 30 * 37_632 * 3 // 2 == 1_693_440
    assert activation_bytes_per_token(*model_dims(SMOLLM2), bf16=False) > per_token


def test_token_budget_and_logit_chunk_follow_free_memory():
    per_token = activation_bytes_per_token(*model_dims(SMOLLM2))
    assert token_budget(70 * GB, per_token) == 20_667  # an H100 with 70 GB free: half of it
    assert token_budget(6 * GB, per_token) == 1_771  # an 8 GB card with 6 GB free
    assert token_budget(1 * GB, per_token) == MIN_TOKEN_BUDGET
    assert token_budget(10_000 * GB, per_token) == MAX_TOKEN_BUDGET
    assert logit_chunk(70 * GB, 49152) == 12_715
    assert logit_chunk(6 * GB, 49152) == 1_089
    assert logit_chunk(1 * GB, 49152) == LOGIT_CHUNK


def test_the_cpu_keeps_its_measured_layout_and_a_gpu_gets_its_own():
    cpu = choose_layout("cpu", None)
    assert cpu == Layout(None, 1, LOGIT_CHUNK, causal_attention=True, fused_optimizer=False)
    assert not choose_layout("cpu", None, packed=True).causal_attention  # packed rows need transformers' mask
    assert choose_layout("cpu", 2048).token_budget == 2048  # the GPU's way of filling micro-batches, asked for
    per_token = activation_bytes_per_token(*model_dims(SMOLLM2))
    gpu = choose_layout("cuda", None, 70 * GB, per_token, 49152)
    assert gpu == Layout(20_667, 64, 12_715, causal_attention=True, fused_optimizer=True)
    assert choose_layout("cuda", 4096, 70 * GB, per_token, 49152).token_budget == 4096  # a shared GPU, capped


def test_regroup_fills_the_budget_with_each_sample_once():
    lengths = [30, 60, 61, 100, 130, 200, 500]
    rows = [1, 1, 2, 1, 1, 1, 1]
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    assert [padded_width(n, 64) for n in (1, 64, 65, 500)] == [64, 64, 128, 512]
    batches = regroup(order, lengths, rows, budget=512, multiple=64)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    for b in batches:
        cost = sum(rows[j] for j in b) * max(padded_width(lengths[j], 64) for j in b)
        assert cost <= 512 or len(b) == 1
    assert batches == [[0, 1, 2], [3, 4], [5], [6]]  # 4 x 128 = 512 fits; 3 x 256 does not
    assert regroup(order, lengths, rows, budget=10**6, multiple=64) == [order]  # the whole step in one pass
    assert regroup(order, lengths, rows, budget=1, multiple=1) == [[j] for j in order]


def test_step_batches_keep_the_cpu_split_or_fill_the_budget():
    micro = [[5, 1, 3], [0, 2, 4]]
    lengths, rows = [10, 50, 20, 40, 30, 60], [1] * 6
    cpu = choose_layout("cpu", None)
    assert step_batches(micro, lengths, rows, cpu, World()) == micro
    assert step_batches(micro, lengths, rows, cpu, World(1, 2, 1, 2)) == [[1], [2]]
    one = Layout(10**6, 1, 256, False, False)
    assert step_batches(micro, lengths, rows, one, World()) == [[0, 2, 4, 3, 1, 5]]  # sorted by length
    halves = [step_batches(micro, lengths, rows, one, World(r, 2, r, 2)) for r in range(2)]
    assert halves == [[[0, 4, 1]], [[2, 3, 5]]]  # strided over the sorted step: similar lengths each


def test_a_pretend_gpu_reads_its_free_memory_for_the_layout(monkeypatch, tiny_hf_dir):
    from localalign.train.lora import _layout_for

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * GB, 8 * GB))
    logged = []
    layout = _layout_for(torch.device("cuda", 0), TrainConfig(), tiny_hf_dir, "bf16", logged.append)
    dims = json.loads((tiny_hf_dir / "config.json").read_text())
    weights = sum(f.stat().st_size for f in tiny_hf_dir.glob("*.safetensors"))
    per_token = activation_bytes_per_token(*model_dims(dims))
    assert layout == choose_layout("cuda", None, 6 * GB - weights, per_token, dims["vocab_size"])
    assert layout.causal_attention and layout.pad_multiple == 64 and "GPU layout" in logged[0]
    assert _layout_for(torch.device("cpu"), TrainConfig(), tiny_hf_dir, "bf16", logged.append) == choose_layout("cpu", None)


def test_attention_plan_fp32_for_a_cpus_short_rows_fused_kernels_elsewhere():
    from localalign.train.model import CPU_MATH_MAX, attention_plan

    assert attention_plan("cpu", 80) == attention_plan("cpu", CPU_MATH_MAX) == "fp32"
    assert attention_plan("cpu", CPU_MATH_MAX + 1) == attention_plan("cpu", 80, dropout=0.1) == "fused"
    assert attention_plan("cuda", 64) == attention_plan("cuda", 4096) == "fused"


def test_fp32_attention_is_sdpas_causal_attention():
    import torch.nn.functional as F

    from localalign.train.model import causal_attention_fp32

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 17, 8), torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(causal_attention_fp32(q, k, v), want, rtol=1e-5, atol=1e-6)
    half = causal_attention_fp32(q.bfloat16(), k.bfloat16(), v.bfloat16(), scaling=0.5)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 17, 6, 8)


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def tok(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


def saved_bytes_per_token(body, batch, autocast) -> float:
    """What a forward keeps for backward (saved-tensor hooks), per padded token, weights excluded."""
    params = {p.untyped_storage().data_ptr() for p in body.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    return sum(seen.values()) / batch["input_ids"].numel()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_activation_estimate_bounds_what_a_forward_keeps(tok, tiny_hf_dir, precision):
    from contextlib import nullcontext

    from localalign.train.model import build_model

    model = build_model(tiny_hf_dir, TrainConfig(), torch.device("cpu"), None, lambda m: None, precision)
    data = [encode_sample(tok, s, end_of_turn_ids(tok, tiny_hf_dir)) for s in SAMPLES[:4]]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    measured = saved_bytes_per_token(model.get_base_model().model, collate_padded(data, tok.pad_token_id), autocast)
    bound = activation_bytes_per_token(*model_dims(json.loads((tiny_hf_dir / "config.json").read_text())),
                                       bf16=precision == "bf16")
    assert measured <= bound / 1.5  # the formula alone is an upper bound; the x1.5 is headroom


@pytest.mark.parametrize("repeat", [1, 30])  # rows of 64 (the CPU's fp32 attention) and of 320+ tokens (flash)
def test_causal_attention_on_right_padded_rows_equals_the_masked_attention(tok, tiny_hf_dir, repeat):
    """No mask is needed for right-padded rows: same loss and gradients as transformers' masked SDPA,
    with the width padded to 64 as on a GPU."""
    from localalign.train.model import build_model, response_loss_sum

    samples = [Sample(s.prompt, " ".join([s.response] * repeat)) for s in SAMPLES[:5]]
    data = [encode_sample(tok, s, end_of_turn_ids(tok, tiny_hf_dir)) for s in samples]
    longest = max(len(e.input_ids) for e in data)
    results = []
    for causal, multiple in ((False, 1), (True, 64)):
        model = build_model(tiny_hf_dir, TrainConfig(), torch.device("cpu"), None, lambda m: None, "fp32", causal=causal)
        base = model.get_base_model()
        batch = collate_padded(data, tok.pad_token_id, multiple)
        assert batch["input_ids"].shape[1] == (-(-longest // 64) * 64 if causal else longest)
        loss = response_loss_sum(base.model, base.get_output_embeddings(), batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (masked, g_masked), (causal, g_causal) = results
    assert causal == pytest.approx(masked, rel=1e-5)
    scale = max(g.abs().max().item() for g in g_masked)
    for a, b in zip(g_masked, g_causal):  # another kernel: float noise only
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale)


def pretend_gpu_layout(monkeypatch, budget: int | None = None) -> None:
    """The layout a GPU gets, on the CPU: one micro-batch per step, widths in 64s, causal attention, fused AdamW."""
    import localalign.train.lora as lora

    per_token = activation_bytes_per_token(576, 1536, 30, 192)
    monkeypatch.setattr(lora, "_layout_for", lambda *a: choose_layout("cuda", budget, 70 * GB, per_token, 512))


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("objective", ["sft", "sft+pref"])
def test_the_gpu_layout_learns_what_the_cpu_layout_learns(monkeypatch, tiny_hf_dir, tmp_path, objective):
    """Same samples per step, other micro-batches: in fp32 only the order of float sums differs
    (and fused AdamW's arithmetic), far below one step's update (lr 3e-3)."""
    samples = [Sample(s.prompt, s.response, system=s.system, meta={"rejected_response": "I can't help with that."})
               for s in SAMPLES]
    cfg = TrainConfig(epochs=2, learning_rate=3e-3, progress=False, threads=1, cpu_bf16=False, objective=objective)
    cpu = train_quietly(tiny_hf_dir, samples, tmp_path / "cpu", cfg)
    pretend_gpu_layout(monkeypatch)
    gpu = train_quietly(tiny_hf_dir, samples, tmp_path / "gpu", cfg)
    assert gpu.steps == cpu.steps == 4
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-4)
    a, b = adapter(tmp_path / "cpu"), adapter(tmp_path / "gpu")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    if objective == "sft+pref":
        logs = [[json.loads(x)["pref_loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
                for d in ("cpu", "gpu")]
        assert logs[1] == pytest.approx(logs[0], rel=1e-4)


def train_quietly(model_dir, samples, out, cfg, on_step=None):
    from localalign.train.lora import train

    return train(model_dir, samples, out, cfg, log=lambda m: None, on_step=on_step)


# Operations that make a host wait for a GPU: reading a value, or sizing an output by the data.
SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
           "aten::equal", "aten::unique", "aten::masked_scatter"}
BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def test_a_step_on_the_gpu_layout_never_waits_for_the_device(monkeypatch, tiny_hf_dir, tmp_path):
    """Every aten op of the training steps, watched: none that would sync a GPU (the one read per
    step is `tolist` of the step's sums, which on a CPU tensor is no aten op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            bool_index = name in BOOL_INDEXED and any(  # a mask as index: the device counts it first
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
            if name in SYNCING or bool_index:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    watch = Watch()
    steps = []

    def on_step(rec):  # steps 2 to 5 (set-up, the first step and the last checkpoint are not watched)
        steps.append(rec.step)
        if rec.step == 1:
            watch.__enter__()
        if rec.step == 5:
            watch.__exit__(None, None, None)

    pretend_gpu_layout(monkeypatch)
    cfg = TrainConfig(epochs=3, learning_rate=3e-3, progress=False, threads=1, cpu_bf16=True, checkpoint_every=100)
    train_quietly(tiny_hf_dir, SAMPLES, tmp_path / "run", cfg, on_step=on_step)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert watch.seen == []
