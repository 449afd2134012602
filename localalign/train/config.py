"""The trainer's settings: every default once, beside its reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localalign.errors import UserError
from localalign.train.data import BATCHING

ROUND_POLICIES = ("from_base", "continue")
OBJECTIVES = ("sft", "sft+pref")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """LoRA training settings; defaults suit a 135M model and fewer than 300 samples on a CPU."""

    # --- LoRA
    r: int = 16  # rank; 8-16 is plenty for a few hundred samples, more only costs time
    alpha: float = 32.0  # update scale alpha/r = 2, the usual peft default pairing with r=16
    dropout: float = 0.0  # peft keeps a dropped-out copy of each target's input: ~450 MB more peak
    #   memory for 135M at batch 4 (measured), and mlx-lm also defaults to 0; set 0.05 to regularize
    # The linear layers LoRA trains. None: the model family's (families.py: every attention and MLP
    # projection, fused ones for Phi-3), never lm_head or the embeddings (tied: not exportable).
    target_modules: tuple[str, ...] | None = None
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
    # batch_size x grad_accum = samples per optimizer step, on every device: what a step learns from.
    batch_size: int = 4  # CPU: samples per micro-batch (one forward/backward)
    grad_accum: int = 2  # CPU: micro-batches per optimizer step. A GPU ignores the split and
    #   fills micro-batches up to `micro_batch_tokens` instead (train/layout.py)
    max_seq_len: int = 1024  # longer samples are dropped (reported), never truncated mid-answer
    seed: int = 0  # LoRA init, data order and dropout all derive from it
    # --- objective
    # "sft": next-token loss on the chosen responses. "sft+pref": plus DPO (Rafailov et al. 2023) on
    # the samples that carry a rejected answer (best-of-n's losers, refusals of rehearsal requests):
    # the model also learns what not to say, held to its starting point by the reference term.
    # Measured on safety at 135M: with the rehearsal pairs (the seeds' refusals rejected) it
    # undoes every refusal (harmful refusal 0.00; docs/benchmarks.md, ablation). Not the default.
    objective: str = "sft"
    pref_beta: float = 0.1  # DPO's beta: how far the policy may move from the reference
    pref_weight: float = 1.0  # the DPO loss's weight beside the SFT loss (each a mean per step)
    # --- data layout
    batching: str = "bucket"  # "bucket": length-sorted padded rows (measured faster on CPU, docs/benchmarks.md);
    #   "pack": one unpadded row per micro-batch, but CPU SDPA then attends over the whole row's
    #   block-diagonal mask, O(L^2) instead of the sum of per-sample squares
    # --- devices
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu" or "cuda"
    # CPU: bf16 autocast with bf16-stored frozen weights where the CPU has native bf16 (AVX512-BF16,
    # AMX; measured faster there, see docs); fp32 elsewhere, where torch emulates bf16 (40x slower)
    cpu_bf16: bool = True
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # Padded tokens per micro-batch. None: on a GPU from its free memory (train/layout.py), on a
    # CPU `batch_size` samples per micro-batch. Set it to cap a GPU shared with other work, or to
    # try the GPU's layout on a CPU. Changes speed and memory, not what a step learns from.
    micro_batch_tokens: int | None = None
    threads: int | None = None  # torch CPU threads; None = engine.runtime.default_threads()
    # --- checkpoints and reporting
    checkpoint_every: int = 10  # optimizer steps between checkpoints (each ~60 MB for 135M, r=16)
    progress: bool = True  # tqdm bar on stderr
    # --- rounds
    round_policy: str = "from_base"  # "from_base": each round starts from the base model (I-SHEEP found
    #   this better for small models); "continue": start from the previous round's adapter

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"train config: {msg}")

        need(self.r >= 1, f"r must be >= 1, got {self.r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.target_modules is None or len(self.target_modules) > 0, "target_modules is empty")
        bad = [m for m in self.target_modules or () if "lm_head" in m or "embed" in m]
        need(not bad, f"target_modules {bad}: adapters on embeddings/lm_head cannot be exported")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "checkpoint_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.batching in BATCHING, f"batching must be one of {BATCHING}, got {self.batching!r}")
        need(self.device in DEVICES, f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.threads is None or self.threads >= 1, "threads must be >= 1")
        need(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1")
        need(self.round_policy in ROUND_POLICIES, f"round_policy must be one of {ROUND_POLICIES}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.pref_beta > 0 and self.pref_weight >= 0, "pref_beta must be > 0 and pref_weight >= 0")
        need(self.objective == "sft" or self.batching == "bucket", "objective sft+pref needs batching = \"bucket\"")


def init_adapter_for_round(config: TrainConfig, previous_adapter: str | Path | None) -> Path | None:
    """The `init_adapter` for a round under `config.round_policy` (None = start from the base)."""
    if config.round_policy == "continue" and previous_adapter is not None:
        return Path(previous_adapter)
    return None
