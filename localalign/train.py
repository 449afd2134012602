"""LoRA fine-tuning of the HF copy of the model on one round's accepted samples.

    train(base_hf_dir, samples, out_dir, TrainConfig(...)) -> TrainResult

One visible loop: for each optimizer step, its micro-batches are rebuilt from the step
number alone (see `train_data.epoch_plan`), run forward/backward, and the step is logged
and, every `checkpoint_every` steps, checkpointed. The loss is computed on response tokens
only, and only those positions go through the (49k-wide) output layer: prompt logits would
be computed and thrown away.

The run directory:

    out_dir/adapter/            the final PEFT adapter (adapter_config.json + safetensors)
    out_dir/checkpoints/step-N/ the latest checkpoint: trainable weights (safetensors),
                                optimizer/scheduler/RNG states (torch.save of tensors and
                                plain values, loaded with weights_only=True), state.json
    out_dir/train_log.jsonl     one line per optimizer step: loss, lr, tokens/s
    out_dir/train_config.json   the resolved config

Every directory appears by rename of a finished temp directory, so a run killed at any
moment (kill -9 included) leaves each checkpoint complete or absent, and `resume=True`
continues from the latest one mid-epoch with the same result as an uninterrupted run.

Under `torchrun --nproc_per_node N` the same call trains data-parallel: each process takes
its share of every micro-batch, the LoRA gradients are summed across processes, and only
rank 0 writes (localalign/distributed.py explains the choices).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from localalign import runtime  # noqa: F401  (OMP_WAIT_POLICY=PASSIVE etc. before torch loads)
from localalign.distributed import (
    World,
    all_reduce_grads,
    backend_for,
    barrier,
    check_agree,
    digest,
    gather_ints,
    process_group,
    shard,
    threads_per_process,
    world_from_env,
)
from localalign.errors import UserError
from localalign.fsutil import TEMP_SUFFIX, atomic_write_text, disk_full_error, fault_point, fsync_dir
from localalign.samples import Sample
from localalign.train_data import (
    BATCHING,
    IGNORE,
    collate_packed,
    collate_padded,
    encode_samples,
    end_of_turn_ids,
    epoch_plan,
)

# Every attention and MLP projection of a Llama/Qwen2 block. Not lm_head or the embeddings:
# with SmolLM2's tied embeddings an adapter on them cannot be exported to a GGUF LoRA.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUND_POLICIES = ("from_base", "continue")
_CKPT = re.compile(r"^step-(\d+)$")
# Response positions sent through the output layer at once: 256 x 49k vocab x ~14 bytes
# (bf16 logits, fp32 copy, log-softmax, gradient) is ~180 MB, instead of ~0.7 MB per response token.
LOGIT_CHUNK = 256


@dataclass
class TrainConfig:
    """LoRA training settings; defaults suit a 135M model and fewer than 300 samples on a CPU."""

    # --- LoRA
    r: int = 16  # rank; 8-16 is plenty for a few hundred samples, more only costs time
    alpha: float = 32.0  # update scale alpha/r = 2, the usual peft default pairing with r=16
    dropout: float = 0.0  # peft keeps a dropped-out copy of each target's input: ~450 MB more peak
    #   memory for 135M at batch 4 (measured), and mlx-lm also defaults to 0; set 0.05 to regularize
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    # --- optimization
    # The lever that moves a small model. SmolLM2-135M on the 60 safety seeds + 24 generated
    # samples, held-out harmful refusal / benign helpfulness (base: 0.04 / 1.00): 2e-4 x 2 epochs
    # -> 0.00 / 1.00 (no effect); 3 epochs at 3e-4 -> 0.67 / 0.75, at 5e-4 -> 1.00 / 0.25, at
    # 1e-3 -> 1.00 / 0.15 (refuses everything). docs/benchmarks.md has the runs.
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this, not to 0 (short runs end too early otherwise)
    warmup_ratio: float = 0.1  # share of steps with linear warmup; protects the fresh adapter from big first steps
    weight_decay: float = 0.0  # LoRA's B starts at zero; decay on tiny data mostly pulls it back
    max_grad_norm: float = 1.0  # clip: a few long samples can otherwise dominate one step
    epochs: int = 3  # I-SHEEP/ISARA-sized data (tens to hundreds of pairs) needs a few passes
    batch_size: int = 4  # samples per micro-batch (one forward/backward)
    grad_accum: int = 2  # micro-batches per optimizer step; effective batch = batch_size * grad_accum
    max_seq_len: int = 1024  # longer samples are dropped (reported), never truncated mid-answer
    seed: int = 0  # LoRA init, data order and dropout all derive from it
    # --- data layout
    batching: str = "bucket"  # "bucket": length-sorted padded rows (measured faster on CPU, docs/benchmarks.md);
    #   "pack": one unpadded row per micro-batch, but CPU SDPA then attends over the whole row's
    #   block-diagonal mask, O(L^2) instead of the sum of per-sample squares
    # --- devices
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu" or "cuda"
    cpu_bf16: bool = True  # CPU: bf16 autocast with bf16-stored frozen weights (measured faster here, see docs)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    threads: int | None = None  # torch CPU threads; None = localalign.runtime.default_threads()
    # --- checkpoints and reporting
    checkpoint_every: int = 10  # optimizer steps between checkpoints (each ~60 MB for 135M, r=16)
    progress: bool = True  # tqdm bar on stderr
    # --- rounds
    round_policy: str = "from_base"  # "from_base": each round starts from the base model (I-SHEEP found
    #   this better for small models); "continue": start from the previous round's adapter

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"train config: {msg}")

        need(self.r >= 1, f"r must be >= 1, got {self.r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(len(self.target_modules) > 0, "target_modules is empty")
        bad = [m for m in self.target_modules if "lm_head" in m or "embed" in m]
        need(not bad, f"target_modules {bad}: adapters on embeddings/lm_head cannot be exported")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "checkpoint_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.batching in BATCHING, f"batching must be one of {BATCHING}, got {self.batching!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.threads is None or self.threads >= 1, "threads must be >= 1")
        need(self.round_policy in ROUND_POLICIES, f"round_policy must be one of {ROUND_POLICIES}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"train config: unknown setting(s) {', '.join(unknown)}")
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    losses: list[float]
    tokens: int  # real (non-pad) tokens processed, over all steps of the run including resumed ones
    seconds: float  # time in the training loop (not model loading)
    tokens_per_s: float
    dropped: int = 0  # samples longer than max_seq_len


@dataclass
class StepRecord:
    step: int  # optimizer steps done (1-based)
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    seconds: float


def init_adapter_for_round(config: TrainConfig, previous_adapter: str | Path | None) -> Path | None:
    """The `init_adapter` for a round under `config.round_policy` (None = start from the base)."""
    if config.round_policy == "continue" and previous_adapter is not None:
        return Path(previous_adapter)
    return None


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup, then cosine decay from 1 to `min_ratio` at the last step."""
    warmup = int(math.ceil(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- the run


def train(
    base_hf_dir: str | Path,
    samples: list[Sample],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    init_adapter: str | Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on `samples`; see the module docstring for what lands in `out_dir`.

    Started by torchrun (WORLD_SIZE > 1), this process trains its share of every step and
    only rank 0 writes (localalign/distributed.py); the result is the same as one process's.
    """
    config = config or TrainConfig()
    config.validate()
    world = world_from_env()
    if world.distributed and config.batch_size < world.size:
        raise UserError(
            f"batch_size={config.batch_size} is smaller than the {world.size} processes: each micro-batch "
            "is split across them by sample; raise batch_size (and lower grad_accum to keep the step size)"
        )
    device = pick_device(config.device, world.local_rank)
    with process_group(world, device.type):
        return _train(base_hf_dir, samples, out_dir, config, resume, init_adapter, log, on_step, world, device)


def _train(base_hf_dir, samples, out_dir, config: TrainConfig, resume, init_adapter, log, on_step, world: World, device):
    import torch

    base_hf_dir, out_dir = Path(base_hf_dir), Path(out_dir)
    if not world.is_main:  # every process would print the same lines
        from transformers.utils import logging as hf_logging

        log = _silent
        hf_logging.disable_progress_bar()  # "Loading weights" bars
    if not (base_hf_dir / "config.json").exists():
        raise UserError(f"{base_hf_dir}: not a Hugging Face model directory (no config.json)")
    if not samples:
        raise UserError("no samples to train on")
    ckpt_root = out_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and not resume:
        raise UserError(f"{out_dir} already has a checkpoint ({latest.name}); pass --resume or use a new directory")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    from localalign.runtime import default_threads

    torch.set_num_threads(threads_per_process(config.threads, default_threads(), world.local_size))
    precision = precision_for(device, config)
    if device.type == "cuda" and precision == "fp32":
        log("this GPU has no bf16: training in fp32 (fp16 would need loss scaling; fp32 LoRA on a small model fits)")

    tokenizer = load_tokenizer(base_hf_dir)
    data, dropped = encode_samples(tokenizer, samples, end_of_turn_ids(tokenizer, base_hf_dir), config.max_seq_len)
    if dropped:
        log(f"dropped {dropped} of {len(samples)} samples longer than max_seq_len={config.max_seq_len} tokens")
    if not data:
        raise UserError(f"every sample is longer than max_seq_len={config.max_seq_len} tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(e.input_ids) for e in data]
    micro_per_epoch = math.ceil(len(data) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = run_fingerprint(base_hf_dir, data, config, init_adapter)
    check_agree(digest(fingerprint), "the data, model and training settings", world)

    model = build_model(base_hf_dir, config, device, init_adapter, log, precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_ratio, config.min_lr_ratio)
    )
    state = {"step": 0, "losses": [], "tokens": 0, "seconds": 0.0}
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer, scheduler, fingerprint)
        log(f"resuming from {latest} (step {state['step']} of {total_steps})")
    check_agree(state["step"], "the checkpoint step to start from", world)
    if world.is_main:
        if latest is not None:
            truncate_log(out_dir / "train_log.jsonl", state["step"])
        else:
            (out_dir / "train_log.jsonl").unlink(missing_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(asdict(config), indent=2) + "\n")
    if world.distributed:
        log(f"{world.size} processes ({backend_for(device.type)}), {config.batch_size * config.grad_accum} samples per step in all")

    body, head = model.get_base_model().model, model.get_base_model().get_output_embeddings()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    model.train()
    bar = progress_bar(config.progress and world.is_main, total_steps, state["step"])
    plans: dict[int, list[list[int]]] = {}
    log_file = open(out_dir / "train_log.jsonl", "a", encoding="utf-8") if world.is_main else None
    try:
        for step in range(state["step"], total_steps):
            t0 = time.perf_counter()
            if world.distributed:  # dropout masks per process and step, so a resume needs no per-rank RNG state
                torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + world.rank)
            epoch, i = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: epoch_plan(lengths, config.batch_size, config.seed, epoch, config.batching)}
            micro = [[data[j] for j in mb] for mb in plans[epoch][i * config.grad_accum : (i + 1) * config.grad_accum]]
            n_targets = sum(e.n_targets for mb in micro for e in mb)  # of the whole step, on every process
            n_tokens = sum(len(e.input_ids) for mb in micro for e in mb)
            loss_sum = 0.0
            for mb in micro:
                mine = shard(mb, world)
                if not mine:  # the last, short micro-batch of an epoch
                    continue
                batch = collate_packed(mine) if config.batching == "pack" else collate_padded(mine, pad_id)
                with autocast:
                    loss_sum += forward_backward(body, head, {k: v.to(device) for k, v in batch.items()}, 1 / n_targets)
            loss_sum = all_reduce_grads(trainable, loss_sum, world)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t0
            rec = StepRecord(step + 1, total_steps, epoch, loss_sum / n_targets, lr, n_tokens, n_tokens / seconds, seconds)
            state["step"], state["tokens"], state["seconds"] = step + 1, state["tokens"] + n_tokens, state["seconds"] + seconds
            state["losses"].append(rec.loss)
            if log_file is not None:
                log_file.write(json.dumps(asdict(rec)) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{rec.loss:.3f}", tok_s=f"{rec.tokens_per_s:.0f}", refresh=False)
            bar.update(1)
            if world.is_main and (rec.step % config.checkpoint_every == 0 or rec.step == total_steps):
                save_checkpoint(ckpt_root, model, optimizer, scheduler, dict(state, fingerprint=fingerprint))
            if on_step is not None:
                on_step(rec)
    finally:
        if log_file is not None:
            log_file.close()
        bar.close()
    # Identical summed gradients and identical steps keep the processes' weights equal; if
    # they are not, the gradient exchange is broken (our bug, not the user's).
    weights = gather_ints(digest(b"".join(t.numpy().tobytes() for t in trainable_state(model).values())), world)
    if len(set(weights)) > 1:
        raise RuntimeError(f"the {world.size} training processes ended with different weights: {weights}")
    adapter_dir = out_dir / "adapter"
    if world.is_main:
        save_adapter(model, adapter_dir)
    barrier(world)  # every process returns once the adapter is there
    losses = state["losses"]
    return TrainResult(
        adapter_dir,
        state["step"],
        losses[-1] if losses else float("nan"),
        losses,
        state["tokens"],
        state["seconds"],
        state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
        dropped,
    )


def _silent(message: str) -> None:
    pass


def response_hidden(body, batch: dict):
    """Final hidden states at response positions, and the tokens they must predict."""
    hidden = body(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),  # None when packed: position_ids mark the samples
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    keep = batch["targets"] != IGNORE
    return hidden[keep], batch["targets"][keep]


def response_loss_sum(body, head, batch: dict):
    """Summed cross-entropy over response positions; only those go through the output layer."""
    import torch.nn.functional as F

    hidden, targets = response_hidden(body, batch)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def forward_backward(body, head, batch: dict, scale: float, chunk: int = LOGIT_CHUNK) -> float:
    """Backpropagate `scale` x the summed response loss; return the (unscaled) sum.

    Same gradients as `(scale * response_loss_sum(...)).backward()`, but the 49k-wide logits
    exist for `chunk` positions at a time: each chunk's loss is backpropagated into a detached
    copy of the hidden states right away, then the body gets the accumulated gradient once.
    """
    import torch.nn.functional as F

    hidden, targets = response_hidden(body, batch)
    cut = hidden.detach().requires_grad_()
    total = 0.0
    for i in range(0, len(targets), chunk):
        loss = F.cross_entropy(head(cut[i : i + chunk]).float(), targets[i : i + chunk], reduction="sum")
        (loss * scale).backward()
        total += loss.item()
    hidden.backward(cut.grad)
    return total


# --------------------------------------------------------------------------- model and devices


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


def choose_precision(device_type: str, cpu_bf16: bool, cuda_bf16_supported: bool) -> str:
    """The training precision: "bf16" (autocast, frozen weights stored in bf16) or "fp32".

    CUDA: bf16 where the GPU has it (Ampere and newer); older GPUs get fp32, not fp16: fp16
    needs loss scaling (GradScaler) to keep small gradients from vanishing, a code path we
    could not test, and a LoRA run on a model of this size fits any GPU in fp32.
    CPU: bf16 unless turned off (`cpu_bf16`), measured faster here (docs/benchmarks.md).
    """
    if device_type == "cuda":
        return "bf16" if cuda_bf16_supported else "fp32"
    return "bf16" if cpu_bf16 else "fp32"


def precision_for(device, config: TrainConfig) -> str:
    import torch

    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_precision(device.type, config.cpu_bf16, cuda_bf16)


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{hf_dir}: cannot load the tokenizer: {e}") from None


def build_model(base_hf_dir: Path, config: TrainConfig, device, init_adapter, log, precision: str = "fp32"):
    """The base model with a fresh (seeded) or loaded trainable LoRA adapter, on `device`.

    With bf16 the frozen projection weights are stored in bf16: autocast would cast them to
    bf16 for every matmul anyway (same numbers), so storing them that way saves the casts
    and half their memory. Embeddings, norms and the LoRA weights stay fp32.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    # peft 0.21 still calls transformers' deprecated is_gradient_checkpointing (noise, not a problem).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_hf_dir, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{base_hf_dir}: cannot load the model: {e}") from None
    base.config.use_cache = False
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
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    if precision == "bf16":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lm_head" not in name:
                module.to(torch.bfloat16)
    if config.gradient_checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    return model.to(device)


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


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------- checkpoints


def run_fingerprint(base_hf_dir: Path, data, config: TrainConfig, init_adapter) -> str:
    """What must be equal for a resume to be valid: model, encoded data, and training settings."""
    h = hashlib.sha256()
    h.update((base_hf_dir / "config.json").read_bytes())
    for e in data:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    cfg = asdict(config)
    for k in ("threads", "progress", "checkpoint_every", "device", "gradient_checkpointing"):
        cfg.pop(k)  # these change speed, not what is learned
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(str(init_adapter).encode())
    return h.hexdigest()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    if not ckpt_root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's GPU only: the *_all variants would open a CUDA context on every GPU
        # of the machine (hundreds of MB each, from every process under torchrun).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold a list (one state per GPU)
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list) else cuda)


def trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoints/step-N atomically (temp dir + rename), then delete older ones."""
    import torch
    from safetensors.torch import save_file

    final = ckpt_root / f"step-{state['step']:06d}"
    if final.exists():  # a resumed finished run re-reaching its last step: identical content
        return final
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        fault_point("rename", final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException as e:
        full = disk_full_error(e, ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    for p in ckpt_root.iterdir():
        if p != final:  # older steps and temp dirs of runs killed mid-write
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str) -> dict:
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise UserError(
            f"{path}: the checkpoint was made with other data, model or settings; "
            "resume with the same ones or use a new output directory"
        )
    saved = load_file(path / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise UserError(f"{path}: checkpoint tensors do not match the model's trainable parameters")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise UserError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(saved[n])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint's step (a killed run may have logged further)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by the kill: everything after it is gone too
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def save_adapter(model, out: Path) -> Path:
    """The PEFT adapter directory, swapped in by rename (the old one is removed after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=TEMP_SUFFIX))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _sort_target_modules(tmp / "adapter_config.json")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fault_point("rename", out)
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        full = disk_full_error(e, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes with Python's hash
    seed; sorted, the same training gives byte-identical adapters (resume is checked by hash)."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
