"""What a model costs on this machine, before a run starts: the time of a round and its peak
memory, from the model's size alone.

Both come from bench/bench_sizes.py (docs/benchmarks.md, "What fits this machine"): random-weight
models at the real shapes of SmolLM2-135M/360M, Qwen3-0.6B, Llama-3.2-1B and Qwen2.5-1.5B,
every stage measured on a 2-core box of this project's kind. Rates between and beyond those
sizes are interpolated on a log-log line through the two nearest measurements (on a CPU both
generation and training are bound by the bytes of weights each token moves), and so is the peak
resident memory of the hungriest stage (training, at every measured size: its fixed part, torch
and the logits, weighs more in a small model). Another machine differs; the estimate says so.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from localalign.checks.model_input import ModelDims
from localalign.errors import UserError
from localalign.train.config import TrainConfig
from localalign.train.layout import activation_bytes_per_token, model_dims
from localalign.train.model import cpu_has_native_bf16

# bench_sizes.py, 2026-12-03, AMD EPYC 2 cores: (parameters, generation tokens/s read + written at
# 32 sequences, of which written, training tokens/s, merge + export + parity s, peak bytes of
# any stage). bench_sizes prints this tuple.
MEASURED: tuple[tuple[float, float, float, float, float, float], ...] = (
    (134515008, 140.9, 97.6, 91.6, 26.0, 3272e6),
    (361821120, 74.9, 51.9, 37.2, 41.1, 5875e6),
    (596049920, 55.0, 38.1, 28.9, 57.8, 8428e6),
    (1235814400, 33.0, 22.8, 17.6, 98.5, 10699e6),
    (1543714304, 31.0, 21.5, 13.3, 110.9, 16555e6),
)
PEAK_COLUMN = 5
# What a round puts through the model, measured on the default model (bench_sizes.ROUND_TOKENS).
READ_PER_SAMPLE, WRITTEN_PER_SAMPLE, TRAIN_TOKENS_PER_SAMPLE = 290, 372, 160
EVAL_READ, EVAL_WRITTEN = 144 * 60, 144 * 80
# The longest row training sees: a generated request and answer at their budgets
# (isara.IsaraConfig: 128 + 256 tokens) and the template around them.
LONGEST_ROW = 448


@dataclass(frozen=True)
class RoundEstimate:
    params: int
    generation_s: float
    training_s: float
    export_s: float
    evaluation_s: float
    peak_bytes: int
    training_bytes: int  # of the peak: training's (weights as training stores them, activations)

    @property
    def total_s(self) -> float:
        return self.generation_s + self.training_s + self.export_s + self.evaluation_s

    def describe(self, samples: int) -> str:
        m = lambda s: f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"  # noqa: E731
        return (f"estimate for a round of {samples} samples on this machine: {m(self.total_s)} (generation "
                f"{m(self.generation_s)}, training {m(self.training_s)}, export {m(self.export_s)}, evaluation "
                f"{m(self.evaluation_s)}); peak memory {self.peak_bytes / 2**30:.1f} GiB "
                "(from bench/bench_sizes.py on a 2-core CPU; yours may differ)")


def _rate(params: float, column: int) -> float:
    """A measured rate at `params`, log-log between the two nearest measurements."""
    if not MEASURED:
        raise UserError("no size measurements in localalign/fit.py (run bench/bench_sizes.py)")
    sizes = [row[0] for row in MEASURED]
    i = min(max(bisect.bisect_left(sizes, params), 1), len(MEASURED) - 1)
    (p0, *a), (p1, *b) = MEASURED[i - 1], MEASURED[i]
    y0, y1 = a[column - 1], b[column - 1]
    slope = (math.log(y1) - math.log(y0)) / (math.log(p1) - math.log(p0))
    return math.exp(math.log(y0) + slope * (math.log(params) - math.log(p0)))


def training_bytes(dims: ModelDims, train: TrainConfig) -> int:
    """Training's resident memory: frozen projections as training stores them (bf16 on a CPU with
    native bf16 unless turned off, else fp32), embeddings and LoRA weights with their Adam state in fp32, and the activations of
    the widest micro-batch (train.layout's bound per token)."""
    bf16 = train.cpu_bf16 and cpu_has_native_bf16()
    embed = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    frozen = (dims.params - embed) * (2 if bf16 else 4) + embed * 4
    lora = dims.layers * train.r * 2 * (4 * dims.hidden + 3 * dims.intermediate) * 16
    rows = min(LONGEST_ROW, train.max_seq_len) * train.batch_size
    return frozen + lora + rows * activation_bytes_per_token(*model_dims(dims.config()), bf16=bf16)


def estimate_round(dims: ModelDims, samples: int, seeds: int, rehearsal: int, train: TrainConfig) -> RoundEstimate:
    p = float(dims.params)
    mixed, written, train_tps, export_s = (_rate(p, c) for c in (1, 2, 3, 4))
    generation = samples * (WRITTEN_PER_SAMPLE / written + READ_PER_SAMPLE / mixed)
    training = (seeds + samples + rehearsal) * TRAIN_TOKENS_PER_SAMPLE * train.epochs / train_tps
    evaluation = EVAL_WRITTEN / written + EVAL_READ / mixed
    need_train = training_bytes(dims, train)
    peak = max(int(_rate(p, PEAK_COLUMN)), need_train)
    return RoundEstimate(dims.params, generation, training, export_s, evaluation, peak, need_train)


def available_memory(meminfo: str | None = None) -> int | None:
    """MemAvailable of this machine in bytes (None where unknown)."""
    if meminfo is None:
        try:
            with open("/proc/meminfo") as f:
                meminfo = f.read()
        except OSError:
            return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def largest_that_fits(available: int) -> float:
    """The most parameters whose measured-curve peak memory is within `available` (bisected in log)."""
    lo, hi = math.log(1e6), math.log(1e12)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _rate(math.exp(mid), PEAK_COLUMN) <= available else (lo, mid)
    return math.exp(lo)


def check_fits(estimate: RoundEstimate, dims: ModelDims, train: TrainConfig, available: int | None) -> None:
    """A UserError, saying what would fit, when a round's peak memory exceeds what is available."""
    if available is None or estimate.peak_bytes <= available:
        return
    need, have = estimate.peak_bytes / 2**30, available / 2**30
    hints = [f"a model of at most ~{largest_that_fits(available) / 1e6:.0f} M parameters fits"]
    if estimate.training_bytes > available:
        for rows in (256, 128):
            smaller = TrainConfig(**{**train.__dict__, "max_seq_len": rows, "batch_size": 1})
            if training_bytes(dims, smaller) <= available:
                hints.append(f"or train with batch_size 1 and max_seq_len {rows} ([train] in the config)")
                break
    raise UserError(f"this model needs about {need:.1f} GiB at its peak and {have:.1f} GiB is available: "
                    + "; ".join(hints))
