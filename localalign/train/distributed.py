"""Data-parallel training under `torchrun` (or `accelerate launch --multi_gpu`): the few helpers.

    torchrun --nproc_per_node 2 -m localalign train --data samples.jsonl --out run/

The launcher starts N copies of the command and tells each who it is through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
`world_from_env` reads it, so the same command runs alone or as one of N processes.

How the trainer uses N processes (lora.py):

- Every process reads all the data and builds the same batch plan (seeded), so each knows
  every optimizer step's samples. Each micro-batch is split across processes by sample
  (`shard`); `batch_size * grad_accum` stays the *global* number of samples per optimizer
  step, so the same config learns the same thing with 1 or N processes (and a checkpoint
  of one resumes in the other).
- The loss is divided by the step's response-token count, which every process computes
  from the full step on its own: no collective is needed for the normalization.
- After backward, one all-reduce sums the LoRA gradients (`all_reduce_grads`): then
  every process holds exactly the single-process gradient, clips and steps identically,
  and the weights stay equal without ever being broadcast. We do this instead of wrapping
  the model in DistributedDataParallel because the trainer calls the model's body and
  output layer separately (chunked loss over response positions), which DDP's forward
  hooks do not see; and the LoRA gradients are small (~20 MB for 135M at r=16), so one
  flat all-reduce per step costs little and is easy to check.
- Only rank 0 writes (log, checkpoints, adapter, progress bar). Every process loads the
  checkpoint on resume, so the run directory must be on a file system all of them see.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

from localalign.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Who this process is among the processes a launcher started (1 of 1 without a launcher)."""

    rank: int = 0  # global rank; rank 0 writes every file
    size: int = 1  # processes in the job
    local_rank: int = 0  # rank on this machine: the GPU it uses
    local_size: int = 1  # processes on this machine: they share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The World that torchrun / accelerate launch describe in `env` (a launcher-less run: 1 of 1)."""
    if "WORLD_SIZE" not in env:
        return World()

    def number(name: str, default: int | None = None) -> int:
        raw = env.get(name)
        if raw is None:
            if default is None:
                raise UserError(f"WORLD_SIZE is set but {name} is not: start the processes with torchrun")
            return default
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r} is not a number") from None

    size = number("WORLD_SIZE")
    if size == 1:
        return World()
    rank = number("RANK")
    local_rank = number("LOCAL_RANK", rank)
    local_size = number("LOCAL_WORLD_SIZE", size)
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise UserError(
            f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={size} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}"
        )
    return World(rank, size, local_rank, local_size)


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes (NCCL cannot reduce CPU tensors)."""
    return "nccl" if device_type == "cuda" else "gloo"


def threads_per_process(requested: int | None, cores: int, local_size: int) -> int:
    """Torch threads for one process: what was asked, else this machine's cores shared out.

    N processes with all cores each would oversubscribe the CPU (each thread then waits
    for the others); torchrun's own answer, OMP_NUM_THREADS=1, leaves cores idle when
    there are more cores than processes.
    """
    if requested is not None:
        return requested
    return max(1, cores // max(1, local_size))


def shard(items: Sequence[T], world: World) -> list[T]:
    """This process's share of `items`, strided (rank, rank+N, ...): a length-sorted
    micro-batch then gives every process rows of similar lengths."""
    return list(items[world.rank :: world.size])


@contextmanager
def process_group(world: World, device_type: str) -> Iterator[None]:
    """Join the launcher's process group for the duration (a no-op for one process).

    A group that the caller already set up (e.g. accelerate's `Accelerator()`) is used as
    it is and left open.
    """
    import torch.distributed as dist

    if not world.distributed:
        yield
        return
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run one process")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend_for(device_type))
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_grads(params: Sequence, loss_sum, world: World):
    """Sum every parameter's gradient and `loss_sum` (a 0-d tensor on the device) over all
    processes; return the summed loss (a float32 tensor; `loss_sum` as it is for one process).

    One flat buffer, one all-reduce. A process whose share of a step was empty
    contributes zeros (its `.grad` is None).
    """
    import torch
    import torch.distributed as dist

    if not world.distributed:
        return loss_sum
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [loss_sum.reshape(1).to(torch.float32)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset]


def gather_ints(value: int, world: World) -> list[int]:
    """Every process's `value` (a 63-bit int), in rank order."""
    import torch
    import torch.distributed as dist

    if not world.distributed:
        return [value]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def check_agree(value: int, what: str, world: World) -> None:
    """Raise on every process if the processes hold different `value`s.

    Catches what would otherwise desynchronize silently: a checkpoint only some processes
    can see, different data or settings per process.
    """
    values = gather_ints(value, world)
    if len(set(values)) > 1:
        raise UserError(
            f"the {world.size} processes disagree on {what} (per rank: {values}); "
            "they must see the same files (the run directory on a shared file system)"
        )


def digest(data: bytes | str) -> int:
    """A 60-bit int from sha256, for check_agree on strings and tensors."""
    if isinstance(data, str):
        data = data.encode()
    return int(hashlib.sha256(data).hexdigest()[:15], 16)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def refuse_under_launcher(command: str, env: Mapping[str, str] = os.environ) -> None:
    """For commands that run as one process: a clear error instead of N copies racing."""
    if world_from_env(env).distributed:
        raise UserError(
            f"`localalign {command}` runs as one process; under torchrun only the training "
            "stage is distributed: `torchrun --nproc_per_node N -m localalign train ...`"
        )
