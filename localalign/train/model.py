"""The model the trainer fine-tunes: device and precision, the base model with its LoRA
adapter, and the loss computed on response positions only."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from localalign.engine.build import cpu_info
from localalign.errors import UserError
from localalign.families import family_of_config
from localalign.train.config import TrainConfig
from localalign.train.data import IGNORE, response_index
from localalign.train.layout import LOGIT_CHUNK

# transformers' name for `causal_attention` (registered with its AttentionInterface on first use).
CAUSAL_ATTENTION = "localalign_causal_sdpa"


def response_hidden(body, batch: dict):
    """Final hidden states at response positions, and the tokens they must predict."""
    hidden = body(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),  # None when packed: position_ids mark the samples
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    return select_response(hidden, batch)


def select_response(hidden, batch: dict):
    """`hidden` and the targets at the response positions: by the index the collator computed
    (no host-device sync), else by a mask (a GPU must count it before the host can go on)."""
    targets = batch["targets"]
    if "response" in batch:
        index = batch["response"]
        return hidden.flatten(0, 1).index_select(0, index), targets.flatten().index_select(0, index)
    keep = targets != IGNORE
    return hidden[keep], targets[keep]


def response_loss_sum(body, head, batch: dict):
    """Summed cross-entropy over response positions; only those go through the output layer."""
    import torch.nn.functional as F

    hidden, targets = response_hidden(body, batch)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def forward_backward(body, head, batch: dict, scale: float, chunk: int = LOGIT_CHUNK) -> float:
    """`forward_backward_sum` as a Python float (this waits for the device)."""
    return float(forward_backward_sum(body, head, batch, scale, chunk))


def forward_backward_sum(body, head, batch: dict, scale: float, chunk: int = LOGIT_CHUNK):
    """Backpropagate `scale` x the summed response loss; return the (unscaled) sum, a float64
    tensor on the device (reading it is the caller's one sync per step).

    Same gradients as `(scale * response_loss_sum(...)).backward()`, but the 49k-wide logits
    exist for `chunk` positions at a time: each chunk's loss is backpropagated into a detached
    copy of the hidden states right away, then the body gets the accumulated gradient once.
    Each chunk's float32 loss is added in float64, as Python floats were before.
    """
    import torch
    import torch.nn.functional as F

    hidden, targets = response_hidden(body, batch)
    cut = hidden.detach().requires_grad_()
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, len(targets), chunk):
        loss = F.cross_entropy(head(cut[i : i + chunk]).float(), targets[i : i + chunk], reduction="sum")
        (loss * scale).backward()
        total = total + loss.detach().double()
    hidden.backward(cut.grad)
    return total


def row_logps(body, head, batch: dict):
    """Summed log-probability of each row's response tokens (with gradients): a preference pair's
    sides are compared per sequence, so the logits are not chunked across rows here."""
    import torch

    hidden = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    if "row_targets" not in batch:  # a batch made by hand
        batch = {**batch, **response_index(batch["targets"].tolist())}
    selected, targets = select_response(hidden, batch)
    out, start = [], 0
    for n in batch["row_targets"]:
        logp = torch.log_softmax(head(selected[start : start + n]).float(), dim=-1)
        out.append(logp.gather(1, targets[start : start + n, None]).sum())
        start += n
    return torch.stack(out)


# SDPA's kernels for `causal_attention` on a GPU: every one but cuDNN's, which builds a plan per
# new shape (2.2-2.4 ms of CPU per call on an H200, issue 17). Torch takes flash where it can,
# then the memory-efficient kernel; the math one only for inputs neither takes.
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# On a CPU, rows up to this many tokens get attention written out in fp32 (`attention_plan`).
CPU_MATH_MAX = 256


def attention_plan(device_type: str, length: int, dropout: float = 0.0) -> str:
    """How `causal_attention` computes rows of `length` tokens: "fp32" or "fused" (SDPA's kernels).

    A CPU's short rows: attention written out (`causal_attention_fp32`) on fp32 copies of q, k, v.
    Torch's CPU flash kernel spends most of its time in backward at these lengths. Forward +
    backward of 4 rows x 9 heads (3 key/value heads) at 80 / 120 / 240 tokens, 2 threads: flash
    9.5 / 15.0 / 30.5 ms, SDPA's math kernel in fp32 5.0 / 9.7 / 34.5, written out 3.7 / 7.5 / 29.0,
    with an 8x smaller error in the query gradient than flash's (it returns bf16 gradients). It
    keeps the L x L probabilities for backward, so beyond CPU_MATH_MAX tokens, flash. Dropout in
    attention (none in SmolLM2) is left to SDPA.
    """
    return "fp32" if device_type == "cpu" and length <= CPU_MATH_MAX and not dropout else "fused"


def causal_attention_fp32(query, key, value, scaling: float | None = None):
    """Causal attention in fp32 by plain matmuls and softmax, key/value heads shared by groups of
    query heads without copying them; the output in the query's dtype, as (batch, length, heads, dim).
    SDPA's math kernel does the same with a mask it builds per call and a "safe" softmax that checks
    every row for being fully masked (never, here): a third of its time at these sizes."""
    import torch

    b, heads, n, d = query.shape
    kv = key.shape[1]
    q = query.float().view(b, kv, heads // kv, n, d) * (scaling if scaling is not None else d**-0.5)
    scores = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2))
    scores = scores + torch.full((n, n), float("-inf"), device=query.device).triu(1)
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float().unsqueeze(2))
    return out.view(b, heads, n, d).transpose(1, 2).contiguous().to(query.dtype)


def causal_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with `is_causal` and no mask (layout.py says why), computed as `attention_plan` says.
    Right-padded rows only: a real token attends to earlier positions alone, and those are real;
    the pads, after it, compute values nobody reads. Packed rows would attend across samples."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    if attention_plan(query.device.type, query.shape[2], kwargs.get("dropout", 0.0)) == "fp32":
        return causal_attention_fp32(query, key, value, kwargs.get("scaling")), None
    with sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS]):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def register_causal_attention() -> str:
    """Make `causal_attention` known to transformers; its name for `attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_ATTENTION, causal_attention)
    return CAUSAL_ATTENTION


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (non-tensors as they are). To a GPU from pinned memory,
    without waiting for the copy: the host goes on issuing kernels."""
    import torch

    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO per pair: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def pick_device(wanted: str, local_rank: int = 0):
    """CUDA if asked for or (auto) present, else CPU; under torchrun, GPU `local_rank`."""
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA GPU")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {local_rank} on this machine has no GPU of its own ({torch.cuda.device_count()} GPUs): "
                "start at most one process per GPU, or train with device=cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def choose_precision(device_type: str, cpu_bf16: bool, cuda_bf16_supported: bool, cpu_native_bf16: bool = True) -> str:
    """The training precision: "bf16" (autocast, frozen weights stored in bf16) or "fp32".

    CUDA: bf16 where the GPU has it (Ampere and newer); older GPUs get fp32, not fp16: fp16
    needs loss scaling (GradScaler) to keep small gradients from vanishing, a code path we
    could not test, and a LoRA run on a model of this size fits any GPU in fp32.
    CPU: bf16 where the CPU multiplies bf16 natively (`cpu_native_bf16`: AVX512-BF16 or AMX on
    x86, BF16 on Arm) unless turned off (`cpu_bf16`), measured faster there (docs/benchmarks.md).
    Elsewhere torch emulates it: a 512 x 576 x 1536 bf16 matmul took 1988 ms against 45 ms in
    fp32 on an AVX2-only EPYC (2026-12-03), and a 135M training step 450 s.
    """
    if device_type == "cuda":
        return "bf16" if cuda_bf16_supported else "fp32"
    return "bf16" if cpu_bf16 and cpu_native_bf16 else "fp32"


# CPU flags (/proc/cpuinfo) under which torch's CPU kernels multiply bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bf16(flags: list[str] | None = None) -> bool:
    """Whether this CPU lists a native bf16 instruction set (engine.build.cpu_info reads the flags)."""
    if flags is None:
        flags = cpu_info()[1]
    return any(f in NATIVE_BF16_FLAGS for f in flags)


def precision_for(device, config: TrainConfig) -> str:
    import torch

    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_precision(device.type, config.cpu_bf16, cuda_bf16, cpu_has_native_bf16())


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{hf_dir}: cannot load the tokenizer: {e}") from None


def build_model(base_hf_dir: Path, config: TrainConfig, device, init_adapter, log, precision: str = "fp32",
                causal: bool = False):
    """The base model with a fresh (seeded) or loaded trainable LoRA adapter, on `device`.

    With bf16 the frozen projection weights are stored in bf16: autocast would cast them to
    bf16 for every matmul anyway (same numbers), so storing them that way saves the casts
    and half their memory. Embeddings, norms and the LoRA weights stay fp32. `causal`: attention
    by `causal_attention` (right-padded rows only, layout.py).
    """
    import torch
    from peft import PeftModel

    # peft 0.21 still calls transformers' deprecated is_gradient_checkpointing (noise, not a problem).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    base = _load_base(base_hf_dir, register_causal_attention() if causal else "sdpa")
    if config.target_modules is None:  # the family's (train.lora._setup resolves it before this, for its log)
        config = replace(config, target_modules=family_of_config(base.config.to_dict(), base_hf_dir).lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in config.target_modules if t not in present]
    if missing:
        raise UserError(f"target_modules {missing} are not linear layers of this model (it has {sorted(present)})")
    torch.manual_seed(config.seed)  # LoRA A init
    if init_adapter is not None:
        init_adapter = Path(init_adapter)
        if not (init_adapter / "adapter_config.json").exists():
            raise UserError(f"{init_adapter}: not a PEFT adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
        check_adapter_loaded(model, init_adapter)
        log(f"continuing from adapter {init_adapter}")
    else:
        model = _fresh_adapter(base, config)
    if precision == "bf16":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lm_head" not in name:
                module.to(torch.bfloat16)
            # peft casts a LoRA layer's input to its weights' dtype (fp32), and autocast casts it
            # straight back to bf16 for the matmul: two copies of the activation per layer and
            # their two in backward, for the same numbers (bf16 -> fp32 -> bf16 is exact; with
            # dropout the mask would be applied in bf16, so then peft keeps its casts).
            if hasattr(module, "cast_input_dtype_enabled") and config.dropout == 0:
                module.cast_input_dtype_enabled = False
    if config.gradient_checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    return model.to(device)


def _load_base(base_hf_dir: Path, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_hf_dir, dtype=torch.float32, attn_implementation=attention, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{base_hf_dir}: cannot load the model: {e}") from None
    base.config.use_cache = False
    return base


def _fresh_adapter(base, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def check_adapter_loaded(model, adapter_dir: Path) -> None:
    """A silent key mismatch would train a fresh adapter instead: compare the tensor counts."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        n_file = len(list(f.keys()))
    n_model = sum(1 for n, p in model.named_parameters() if "lora_" in n)
    if n_file != n_model:
        raise UserError(f"{adapter_dir}: adapter has {n_file} tensors, the model expects {n_model}")
