"""LoRA fine-tuning of the HF copy of the model on one round's accepted samples.

    train(base_hf_dir, samples, out_dir, TrainConfig(...)) -> TrainResult

Three steps: `_setup` loads the data, the model and (on resume) the latest checkpoint;
`_loop` is one visible loop: for each optimizer step, its samples are rebuilt from the step
number alone (see `data.epoch_plan`), laid out in micro-batches for the device (layout.py:
`batch_size` samples each on a CPU, as few as fit on a GPU), run forward/backward, and the step
is logged and, every `checkpoint_every` steps, checkpointed; `_finish` writes the adapter. A step
reads one value from the device, its summed loss, when it is logged. The loss
is computed on response tokens only, and only those positions go through the (49k-wide)
output layer: prompt logits would be computed and thrown away (model.py).

The run directory:

    out_dir/adapter/            the final PEFT adapter (adapter_config.json + safetensors)
    out_dir/checkpoints/step-N/ the latest checkpoint (checkpoint.py)
    out_dir/train_log.jsonl     one line per optimizer step: loss, lr, tokens/s
    out_dir/train_config.json   the resolved config

Every directory appears by rename of a finished temp directory, so a run killed at any
moment (kill -9 included) leaves each checkpoint complete or absent, and `resume=True`
continues from the latest one mid-epoch with the same result as an uninterrupted run.

Under `torchrun --nproc_per_node N` the same call trains data-parallel: each process takes
its share of every micro-batch, the LoRA gradients are summed across processes, and only
rank 0 writes (distributed.py explains the choices).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from localalign.engine.runtime import default_threads
from localalign.errors import UserError
from localalign.families import family_of_config
from localalign.fsutil import atomic_write_text
from localalign.samples import Sample
from localalign.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    run_fingerprint,
    save_adapter,
    save_checkpoint,
    trainable_state,
    truncate_log,
)
from localalign.train.config import TrainConfig
from localalign.train.data import Encoded, collate_packed, collate_padded, encode_samples, end_of_turn_ids, epoch_plan
from localalign.train.distributed import (
    World,
    all_reduce_grads,
    backend_for,
    barrier,
    check_agree,
    digest,
    gather_ints,
    process_group,
    threads_per_process,
    world_from_env,
)
from localalign.train.layout import Layout, activation_bytes_per_token, choose_layout, model_dims, step_batches
from localalign.train.model import (
    build_model,
    forward_backward_sum,
    load_tokenizer,
    pick_device,
    precision_for,
    preference_loss,
    row_logps,
    to_device,
)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel


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
    pref_loss: float | None = None  # mean DPO loss of the step's pairs (objective "sft+pref"; starts at log 2)


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
    quiet: bool = False,
) -> TrainResult:
    """Fine-tune a LoRA adapter on `samples`; see the module docstring for what lands in `out_dir`.
    A progress bar (config.progress, where stderr is a terminal) ends with a one-line summary
    through `log`; `quiet` silences both.

    Started by torchrun (WORLD_SIZE > 1), this process trains its share of every step and
    only rank 0 writes (distributed.py); the result is the same as one process's.
    """
    config = config or TrainConfig()
    world = world_from_env()
    if world.distributed and config.batch_size < world.size:
        raise UserError(
            f"batch_size={config.batch_size} is smaller than the {world.size} processes: each micro-batch "
            "is split across them by sample; raise batch_size (and lower grad_accum to keep the step size)"
        )
    device = pick_device(config.device, world.local_rank)
    with process_group(world, device.type):
        run = _setup(Path(base_hf_dir), samples, Path(out_dir), config, resume, init_adapter, log, world, device)
        _loop(run, on_step, quiet)
        return _finish(run)


@dataclass
class _Run:
    """What `_setup` makes for the loop: the data, the model and its optimizer, the step state."""

    config: TrainConfig
    world: World
    device: torch.device
    precision: str
    out_dir: Path
    log: Callable[[str], None]
    data: list[Encoded]
    dropped: int
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    fingerprint: str
    model: PeftModel
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict[str, Any]  # step, losses, tokens, seconds: what a checkpoint carries
    reference: list[tuple[float, float] | None]  # per sample: the starting model's log-probs of a pair's sides
    layout: Layout  # micro-batches, widths, attention and optimizer for this device (layout.py)

    @property
    def cost_lengths(self) -> list[int]:
        """Per sample, the width it needs in a micro-batch (its rejected side's too, for a pair)."""
        return [max(len(e.input_ids), len(e.rejected.input_ids) if r is not None else 0)
                for e, r in zip(self.data, self.reference)]

    @property
    def cost_rows(self) -> list[int]:
        """Per sample, the rows it brings to a micro-batch: 2 for a preference pair."""
        return [1 if r is None else 2 for r in self.reference]


def _setup(base_hf_dir: Path, samples: list[Sample], out_dir: Path, config: TrainConfig, resume: bool, init_adapter,
           log: Callable[[str], None], world: World, device) -> _Run:
    """Check the inputs, encode the data, build the model and optimizer, load the latest checkpoint."""
    import torch

    if not world.is_main:  # every process would print the same lines
        from transformers.utils import logging as hf_logging

        log = _silent
        hf_logging.disable_progress_bar()  # "Loading weights" bars
    if not (base_hf_dir / "config.json").exists():
        raise UserError(f"{base_hf_dir}: not a Hugging Face model directory (no config.json)")
    if not samples:
        raise UserError("no samples to train on")
    latest = latest_checkpoint(out_dir / "checkpoints")
    if latest is not None and not resume:
        raise UserError(f"{out_dir} already has a checkpoint ({latest.name}); pass --resume or use a new directory")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads_per_process(config.threads, default_threads(), world.local_size))
    precision = precision_for(device, config)
    if device.type == "cuda" and precision == "fp32":
        log("this GPU has no bf16: training in fp32 (fp16 would need loss scaling; fp32 LoRA on a small model fits)")

    family = family_of_config(json.loads((base_hf_dir / "config.json").read_text(encoding="utf-8")), base_hf_dir)
    if config.target_modules is None:  # the family's: every projection (Phi-3's are fused)
        config = replace(config, target_modules=family.lora_targets)
    tokenizer = load_tokenizer(base_hf_dir)
    data, dropped = encode_samples(tokenizer, samples, end_of_turn_ids(tokenizer, base_hf_dir, family),
                                   config.max_seq_len, pairs=config.objective == "sft+pref", family=family)
    if dropped:
        log(f"dropped {dropped} of {len(samples)} samples longer than max_seq_len={config.max_seq_len} tokens")
    if not data:
        raise UserError(f"every sample is longer than max_seq_len={config.max_seq_len} tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch = math.ceil(math.ceil(len(data) / config.batch_size) / config.grad_accum)
    fingerprint = run_fingerprint(base_hf_dir, data, config, init_adapter)
    check_agree(digest(fingerprint), "the data, model and training settings", world)

    total_steps = steps_per_epoch * config.epochs
    layout = _layout_for(device, config, base_hf_dir, precision, log)
    model = build_model(base_hf_dir, config, device, init_adapter, log, precision, causal=layout.causal_attention)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if layout.fused_optimizer else {}
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_ratio, config.min_lr_ratio)
    )
    state = {"step": 0, "losses": [], "tokens": 0, "seconds": 0.0}
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer, scheduler, fingerprint)
        log(f"resuming from {latest} (step {state['step']} of {total_steps})")
    run = _Run(config, world, device, precision, out_dir, log, data, dropped, pad_id, steps_per_epoch, total_steps,
               fingerprint, model, trainable, optimizer, scheduler, state, [None] * len(data), layout)
    if any(e.rejected is not None for e in data):
        run.reference = _reference_logps(run)
        log(f"preference pairs: {sum(r is not None for r in run.reference)} of {len(data)} samples")
    check_agree(state["step"], "the checkpoint step to start from", world)
    if world.is_main:
        if latest is not None:
            truncate_log(out_dir / "train_log.jsonl", state["step"])
        else:
            (out_dir / "train_log.jsonl").unlink(missing_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(asdict(config), indent=2) + "\n")
    if world.distributed:
        log(f"{world.size} processes ({backend_for(device.type)}), {config.batch_size * config.grad_accum} samples per step in all")
    return run


def _layout_for(device, config: TrainConfig, base_hf_dir: Path, precision: str, log) -> Layout:
    """layout.choose_layout for this device: on a GPU from its free memory (less the weights about
    to be loaded) and the model's sizes."""
    if device.type != "cuda":
        return choose_layout(device.type, config.micro_batch_tokens, packed=config.batching == "pack")
    import torch

    dims = json.loads((base_hf_dir / "config.json").read_text())
    free, _ = torch.cuda.mem_get_info(device)
    free -= sum(f.stat().st_size for f in base_hf_dir.glob("*.safetensors"))
    per_token = activation_bytes_per_token(*model_dims(dims), bf16=precision == "bf16")
    layout = choose_layout("cuda", config.micro_batch_tokens, free, per_token, dims["vocab_size"])
    log(f"GPU layout: micro-batches of up to {layout.token_budget} padded tokens (widths in multiples of "
        f"{layout.pad_multiple}), output layer {layout.logit_chunk} positions at a time, causal flash attention")
    return layout


def _loop(run: _Run, on_step: Callable[[StepRecord], None] | None, quiet: bool = False) -> None:
    """Every optimizer step from the state's step on: train, log, checkpoint."""
    import torch

    config, world, state = run.config, run.world, run.state
    base = run.model.get_base_model()
    body, head = base.model, base.get_output_embeddings()
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if run.precision == "bf16" else nullcontext()
    run.model.train()
    bar = progress_bar(config.progress and world.is_main and not quiet, run.total_steps, state["step"])
    lengths = [len(e.input_ids) for e in run.data]
    plans: dict[int, list[list[int]]] = {}
    log_file = open(run.out_dir / "train_log.jsonl", "a", encoding="utf-8") if world.is_main else None
    try:
        for step in range(state["step"], run.total_steps):
            t0 = time.perf_counter()
            if world.distributed:  # dropout masks per process and step, so a resume needs no per-rank RNG state
                torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + world.rank)
            epoch, i = divmod(step, run.steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: epoch_plan(lengths, config.batch_size, config.seed, epoch, config.batching)}
            micro = plans[epoch][i * config.grad_accum : (i + 1) * config.grad_accum]
            sums, n_targets, n_tokens, lr, n_pairs = _optimizer_step(run, body, head, autocast, micro)
            loss_sum, pref_sum = sums.tolist()  # the step's one wait for the device
            pref = pref_sum / n_pairs if n_pairs else None

            seconds = time.perf_counter() - t0
            rec = StepRecord(step + 1, run.total_steps, epoch, loss_sum / n_targets, lr, n_tokens, n_tokens / seconds,
                             seconds, pref)
            state["step"], state["tokens"], state["seconds"] = step + 1, state["tokens"] + n_tokens, state["seconds"] + seconds
            state["losses"].append(rec.loss)
            if log_file is not None:
                log_file.write(json.dumps(asdict(rec)) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{rec.loss:.3f}", tok_s=f"{rec.tokens_per_s:.0f}", refresh=False)
            bar.update(1)
            if world.is_main and (rec.step % config.checkpoint_every == 0 or rec.step == run.total_steps):
                save_checkpoint(run.out_dir / "checkpoints", run.model, run.optimizer, run.scheduler,
                                dict(state, fingerprint=run.fingerprint))
            if on_step is not None:
                on_step(rec)
    finally:
        if log_file is not None:
            log_file.close()
        bar.close()
    if not quiet:
        run.log(train_summary(state, run.total_steps))


def _optimizer_step(run: _Run, body, head, autocast, micro: list[list[int]]):
    """Forward/backward over one step's samples (`micro`: its planned micro-batches, laid out for
    this device and process by `layout.step_batches`), then one update. Returns a float64 tensor
    on the device holding the step's summed SFT loss and summed preference loss (read once by the
    caller), then the step's response tokens, tokens, learning rate and preference pairs."""
    import torch

    config, trainable, data = run.config, run.trainable, run.data
    n_targets = sum(data[j].n_targets for mb in micro for j in mb)  # of the whole step, on every process
    n_tokens = sum(len(data[j].input_ids) for mb in micro for j in mb)
    n_pairs = sum(run.reference[j] is not None for mb in micro for j in mb)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    pref_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for mine in step_batches(micro, run.cost_lengths, run.cost_rows, run.layout, run.world):
        if n_pairs:
            sft, pref = _pair_backward(run, body, head, autocast, mine, n_targets, n_pairs)
            loss_sum, pref_sum = loss_sum + sft.double(), pref_sum + pref.double()
            continue
        batch = to_device(_collate(run, [data[j] for j in mine]), run.device)
        with autocast:
            loss_sum = loss_sum + forward_backward_sum(body, head, batch, 1 / n_targets, run.layout.logit_chunk)
    loss_sum = all_reduce_grads(trainable, loss_sum, run.world)
    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # Under torchrun the preference loss logged is this process's share (the SFT sum is reduced).
    return torch.stack([loss_sum.double(), pref_sum]), n_targets, n_tokens, lr, n_pairs


def _collate(run: _Run, rows: list[Encoded]) -> dict:
    """Packed rows where asked for (CPU only); right-padded rows wherever attention is causal."""
    if run.config.batching == "pack" and not run.layout.causal_attention:
        return collate_packed(rows)
    return collate_padded(rows, run.pad_id, run.layout.pad_multiple)


def _pair_backward(run: _Run, body, head, autocast, mine: list[int], n_targets: int, n_pairs: int):
    """SFT on every sample of the micro-batch plus DPO on its pairs, in one backward pass.
    Returns the summed SFT loss and the summed DPO loss (detached tensors on the device)."""
    import torch

    data, config = run.data, run.config
    pairs = [j for j in mine if run.reference[j] is not None]
    rows = [data[j] for j in mine] + [data[j].rejected for j in pairs]
    batch = to_device(collate_padded(rows, run.pad_id, run.layout.pad_multiple), run.device)
    with autocast:
        logps = row_logps(body, head, batch)
    sft = -logps[: len(mine)].sum()
    loss = sft / n_targets
    pref = torch.zeros((), device=logps.device)
    if pairs:
        chosen = logps[[mine.index(j) for j in pairs]]
        ref = torch.tensor([run.reference[j] for j in pairs], device=logps.device)
        pref = preference_loss(chosen, logps[len(mine):], ref[:, 0], ref[:, 1], config.pref_beta).sum()
        loss = loss + config.pref_weight * pref / n_pairs
    loss.backward()
    return sft.detach(), pref.detach()


def _reference_logps(run: _Run) -> list[tuple[float, float] | None]:
    """The starting model's log-probabilities of each pair's sides (DPO's reference): with a fresh
    adapter (B = 0) that is the base model itself, so no second model is kept."""
    import torch

    base = run.model.get_base_model()
    body, head = base.model, base.get_output_embeddings()
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if run.precision == "bf16" else nullcontext()
    out: list[tuple[float, float] | None] = [None] * len(run.data)
    pairs = [j for j, e in enumerate(run.data) if e.rejected is not None]
    run.model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), run.config.batch_size):
            chunk = pairs[start : start + run.config.batch_size]
            rows = [run.data[j] for j in chunk] + [run.data[j].rejected for j in chunk]
            batch = to_device(collate_padded(rows, run.pad_id, run.layout.pad_multiple), run.device)
            with autocast:
                logps = row_logps(body, head, batch).tolist()
            for i, j in enumerate(chunk):
                out[j] = (logps[i], logps[len(chunk) + i])
    run.model.train()
    return out


def _finish(run: _Run) -> TrainResult:
    """Check the processes agree, write the adapter, and sum up the run."""
    world, state = run.world, run.state
    # Identical summed gradients and identical steps keep the processes' weights equal; if
    # they are not, the gradient exchange is broken (our bug, not the user's).
    weights = gather_ints(digest(b"".join(t.numpy().tobytes() for t in trainable_state(run.model).values())), world)
    if len(set(weights)) > 1:
        raise RuntimeError(f"the {world.size} training processes ended with different weights: {weights}")
    adapter_dir = run.out_dir / "adapter"
    if world.is_main:
        save_adapter(run.model, adapter_dir)
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
        run.dropped,
    )


def _silent(message: str) -> None:
    pass


def progress_bar(enabled: bool, total: int, initial: int):
    """The step bar; none where stderr is not a terminal (a CI log gets `train_summary` alone)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or not sys.stderr.isatty(), unit="step",
                dynamic_ncols=True, file=sys.stderr)


def train_summary(state: dict[str, Any], total_steps: int) -> str:
    """The line a training bar ends with: steps, final loss, tokens/s, seconds in the loop."""
    loss = f"{state['losses'][-1]:.4f}" if state["losses"] else "n/a"
    rate = state["tokens"] / state["seconds"] if state["seconds"] else 0.0
    return f"train: {state['step']}/{total_steps} steps, final loss {loss}, {rate:.0f} tokens/s, {state['seconds']:.0f} s"
