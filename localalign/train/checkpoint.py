"""Checkpoints and the adapter on disk: what a resume needs, written so that a kill at any
moment leaves each directory complete or absent.

    out_dir/checkpoints/step-N/  trainable weights (safetensors), optimizer/scheduler/RNG
                                 states (torch.save of tensors and plain values, loaded with
                                 weights_only=True), state.json with the run's fingerprint
    out_dir/adapter/             the final PEFT adapter, swapped in by rename
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from localalign.errors import UserError
from localalign.fsutil import TEMP_SUFFIX, atomic_write_text, disk_full_error, fault_point, fsync_dir
from localalign.train.config import TrainConfig
from localalign.train.data import Encoded

_CKPT = re.compile(r"^step-(\d+)$")


def run_fingerprint(base_hf_dir: Path, data: list[Encoded], config: TrainConfig, init_adapter) -> str:
    """What must be equal for a resume to be valid: model, encoded data, and training settings."""
    h = hashlib.sha256()
    h.update((base_hf_dir / "config.json").read_bytes())
    for e in data:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
        if e.rejected is not None:
            h.update(json.dumps([e.rejected.input_ids, e.rejected.labels]).encode())
    cfg = asdict(config)
    for k in ("threads", "progress", "checkpoint_every", "device", "gradient_checkpointing", "micro_batch_tokens"):
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
