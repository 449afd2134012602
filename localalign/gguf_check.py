"""Cheap validation of a GGUF file before anything heavy opens it.

llama.cpp on a truncated or foreign file may print pages of C logs or abort the process;
reading the header here first turns that into one clear line.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from localalign.errors import UserError

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | os.PathLike) -> None:
    """Raise UserError unless `path` is a readable GGUF file whose header and metadata parse."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .gguf file")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise UserError(f"{path}: unsupported GGUF version {version}")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
        # The last tensor's data must lie inside the file, or the file is truncated.
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # the gguf reader raises many types on corrupt input
        raise UserError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    if end > path.stat().st_size:
        raise UserError(f"{path}: truncated GGUF (tensor data ends at byte {end}, file has {path.stat().st_size})")


def gguf_architecture(path: str | os.PathLike) -> str:
    from gguf import GGUFReader

    fld = GGUFReader(str(path), "r").fields.get("general.architecture")
    if fld is None:
        raise UserError(f"{path}: GGUF has no general.architecture")
    return str(fld.contents())
