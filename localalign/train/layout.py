"""How one optimizer step's samples become work for the device: micro-batches, padded widths,
the attention kernel, the output layer's chunk and the optimizer. Pure choices over numbers
(free memory, model sizes, lengths), so tests drive them with a pretend GPU; model.py and
lora.py apply them.

On any device an optimizer step learns from `batch_size x grad_accum` samples: that is what
the config means, and it decides what is learned. How those samples are cut into forward/
backward passes (micro-batches) only changes speed, memory and float rounding.

CPU (measured on a 2-core laptop-class box, docs/benchmarks.md "Training"): `batch_size`
samples per micro-batch, padded to the longest, `grad_accum` micro-batches per step, 256
response positions through the output layer at a time. The CPU is busy with arithmetic there,
and these keep memory low. (Filling one micro-batch with a step's 8 samples measured 24% slower
here: more padding, longer rows in attention.) Padded rows get causal attention without a mask
(see below), in fp32 by the plain "math" kernel for rows up to 256 tokens: torch's CPU flash
kernel spends most of its time in backward at these lengths, and the math kernel in fp32 ran a
whole forward/backward of SmolLM2-135M 11% faster with a 8x smaller error in the gradients
(model.py, `attention_plan`). Packed rows keep transformers' block-diagonal mask.

CUDA (issue 17: a 135M model left an H200 idle more than 95% of a step, while the CPU issued
thousands of small kernels and rebuilt cuDNN attention plans for every new sequence length):

- A step's samples go in as few micro-batches as fit a token budget taken from free GPU
  memory (`token_budget`), so `grad_accum` is a memory limit, not a unit of work: the default
  step (8 samples, ~2-3k tokens) is one forward/backward. Fewer passes, fewer launches.
- Attention is SDPA with `is_causal` and no mask, on the flash or memory-efficient kernels,
  never cuDNN's (model.py, `causal_attention`). Rows are right-padded, so a real token never sees a
  pad (pads come after it, and causal attention looks back only); a pad position computes
  something nobody reads. Without a mask, transformers builds none (building one reads the
  padding mask on the host: a sync per forward), flash runs instead of the masked kernels, and
  cuDNN (which the default SDPA dispatch picks on Hopper) is never asked for a per-shape plan.
- Widths are padded up to a multiple of 64 (`PAD_MULTIPLE_CUDA`): a handful of shapes per run
  instead of one per length, so whatever is set up per shape (kernel choice, allocator blocks)
  is set up a few times, and every width meets the kernels' alignment. The pads cost GPU
  arithmetic the GPU has to spare: the step is bound by the CPU issuing kernels.
- The output layer takes every response position of a micro-batch at once (as many as a share
  of free memory holds), and AdamW runs fused (one kernel instead of a dozen per tensor).

Pinning the kernels alone would leave transformers' mask (and its host sync) and 4D-mask
attention; bucketing alone would leave cuDNN's plans (cached per shape) and the syncs. Both
together cost a little padding and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from localalign.train.distributed import World, shard

# Response positions sent through the output layer at once on a CPU: 256 x 49k vocab x ~14 bytes
# (bf16 logits, fp32 copy, log-softmax, gradient) is ~180 MB, instead of ~0.7 MB per response token.
LOGIT_CHUNK = 256
PAD_MULTIPLE_CUDA = 64
# Shares of the free GPU memory (read once, after the model is loaded) for the activations a
# micro-batch keeps for backward and for the output layer's logits; the rest is headroom for
# the allocator's fragmentation, cuBLAS workspaces and the estimate's error.
ACTIVATION_SHARE = 0.5
LOGIT_SHARE = 0.125
MIN_TOKEN_BUDGET = 1024  # below this a GPU is better used with fewer, not tinier, passes
MAX_TOKEN_BUDGET = 65536  # an estimate is an estimate: never bet more than this on one pass
MAX_LOGIT_CHUNK = 16384
# Output layer bytes per response position: bf16 logits (2) + fp32 copy (4) + the log-softmax
# kept for backward (4) + its gradient (4), per vocabulary entry.
LOGIT_BYTES_PER_ENTRY = 14


@dataclass(frozen=True)
class Layout:
    """How this run's steps are laid out on its device (see the module docstring)."""

    token_budget: int | None  # padded tokens per micro-batch; None: `batch_size` samples each (CPU)
    pad_multiple: int  # padded widths rounded up to a multiple of this
    logit_chunk: int  # response positions through the output layer at once
    causal_attention: bool  # model.causal_attention: SDPA is_causal without a mask (right-padded rows only)
    fused_optimizer: bool  # AdamW(fused=True)


def activation_bytes_per_token(hidden: int, intermediate: int, layers: int, kv_dim: int, bf16: bool = True) -> int:
    """Bytes one token keeps for backward in a Llama-style decoder with LoRA on every projection:
    an upper bound, for the token budget.

    Per layer: the fp32 residual stream and norm outputs (4 x hidden x 4 bytes), and in half
    precision (fp32 without bf16) the inputs the LoRA A matrices keep (q, k, v, o, gate, up:
    6 x hidden; down: intermediate), attention's q, k, v and output, and the MLP's gate, up,
    SiLU and product (4 x intermediate). For SmolLM2-135M in bf16 that is 37.6 KB per layer;
    saved-tensor hooks counted 29.5 KB (tests/train/test_layout.py checks the bound on the tiny
    model). Then x1.5 for what backward allocates while it runs.
    """
    half = 2 if bf16 else 4
    per_layer = 4 * hidden * 4 + half * (6 * hidden + intermediate + 2 * (2 * hidden + 2 * kv_dim) + 4 * intermediate)
    return layers * per_layer * 3 // 2


def model_dims(config: dict) -> tuple[int, int, int, int]:
    """(hidden, intermediate, layers, key/value width) from an HF config.json's fields."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_dim = (config.get("num_key_value_heads") or heads) * head_dim
    return hidden, config["intermediate_size"], config["num_hidden_layers"], kv_dim


def token_budget(free_bytes: int, per_token: int, share: float = ACTIVATION_SHARE) -> int:
    """Padded tokens one micro-batch may hold, from the free GPU memory."""
    fits = int(free_bytes * share) // max(1, per_token)
    return max(MIN_TOKEN_BUDGET, min(MAX_TOKEN_BUDGET, fits))


def logit_chunk(free_bytes: int, vocab: int, share: float = LOGIT_SHARE) -> int:
    """Response positions the output layer may take at once on a GPU."""
    fits = int(free_bytes * share) // max(1, vocab * LOGIT_BYTES_PER_ENTRY)
    return max(LOGIT_CHUNK, min(MAX_LOGIT_CHUNK, fits))


def choose_layout(device_type: str, micro_batch_tokens: int | None, free_bytes: int = 0, per_token: int = 1,
                  vocab: int = 1, packed: bool = False) -> Layout:
    """The layout for `device_type` ("cpu" or "cuda"); `micro_batch_tokens` (the config's) overrides
    the budget on either device. `free_bytes`, `per_token`, `vocab` matter on a GPU only; `packed`
    (batching = "pack") on a CPU only: a GPU always pads."""
    if device_type != "cuda":
        return Layout(micro_batch_tokens, 1, LOGIT_CHUNK, causal_attention=not packed, fused_optimizer=False)
    budget = micro_batch_tokens or token_budget(free_bytes, per_token)
    return Layout(budget, PAD_MULTIPLE_CUDA, logit_chunk(free_bytes, vocab), causal_attention=True,
                  fused_optimizer=True)


def padded_width(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def regroup(order: Sequence[int], lengths: Sequence[int], rows: Sequence[int], budget: int,
            multiple: int) -> list[list[int]]:
    """Cut `order` (sample indices, shortest first) into micro-batches whose padded size, rows x
    padded width of the longest, stays within `budget` tokens. `rows[j]` is 2 for a sample that
    brings its rejected answer (a preference pair), else 1. A sample larger than the budget gets
    a micro-batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = n_rows = 0
    for j in order:
        w, r = max(width, padded_width(lengths[j], multiple)), n_rows + rows[j]
        if current and r * w > budget:
            batches.append(current)
            current, w, r = [], padded_width(lengths[j], multiple), rows[j]
        current.append(j)
        width, n_rows = w, r
    if current:
        batches.append(current)
    return batches


def step_batches(micro: Sequence[Sequence[int]], lengths: Sequence[int], rows: Sequence[int], layout: Layout,
                 world: World) -> list[list[int]]:
    """This process's micro-batches for one optimizer step, given the step's planned micro-batches
    (`data.epoch_plan`, `batch_size` samples each).

    Without a token budget: each planned micro-batch, this process's share of it (the CPU layout).
    With one: the step's samples sorted by length, this process's share (strided, so processes get
    similar lengths), regrouped to fill the budget.
    """
    if layout.token_budget is None:
        return [mine for mine in (shard(mb, world) for mb in micro) if mine]
    order = sorted((j for mb in micro for j in mb), key=lambda j: lengths[j])
    return regroup(shard(order, world), lengths, rows, layout.token_budget, layout.pad_multiple)
