"""Cheap validation of a GGUF file before anything heavy opens it.

llama.cpp on a truncated or foreign file may print pages of C logs or abort the process;
reading the header here first turns that into one clear line. The header is walked with
`struct` directly: gguf-py's GGUFReader builds an array view for every vocabulary entry,
seconds for a 49k-token model, and this check runs before every model load.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import NamedTuple

from localalign.errors import UserError

GGUF_MAGIC = b"GGUF"
# GGUF value types -> struct format of a scalar (8 = string, 9 = array are handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF (header ends early at byte {self.pos})")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF (string runs past the end of the file)")
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(s)

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.take("I"), self.take("Q")
            if item_type in _SCALAR:  # skip fixed-size items without reading them
                self.pos += n * struct.calcsize("<" + _SCALAR[item_type])
                return None
            for _ in range(n):
                self.value(item_type)
            return None
        if vtype not in _SCALAR:
            raise UserError(f"{self.path}: corrupt GGUF (unknown value type {vtype})")
        return self.take(_SCALAR[vtype])


def read_gguf_header(path: str | os.PathLike) -> dict:
    """Scalar metadata of a GGUF (arrays skipped) after checking it is whole; UserError if not."""
    return read_gguf_layout(path).meta


class GGUFLayout(NamedTuple):
    meta: dict  # scalar metadata
    array_lengths: dict[str, int]  # array metadata: how many items (the vocabulary's size, ...)
    tensors: dict[str, int]  # tensor name -> number of elements


def read_gguf_layout(path: str | os.PathLike) -> GGUFLayout:
    """The header of a GGUF: scalar metadata, array lengths and tensor sizes, after checking
    that the file is whole; UserError if not."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (bad magic {magic!r})")
        if size < 24:
            raise UserError(f"{path}: truncated GGUF file ({size} bytes, shorter than its header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.take("I")
            if version not in (2, 3):
                raise UserError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = cur.take("Q"), cur.take("Q")
            meta, arrays, tensors = {}, {}, {}
            for _ in range(n_kv):
                key = cur.string().decode("utf-8", "replace")
                vtype = cur.take("I")
                if vtype == _ARRAY:  # its length, read without consuming it
                    arrays[key] = struct.unpack_from("<Q", buf, cur.pos + 4)[0] if cur.pos + 12 <= len(buf) else 0
                value = cur.value(vtype)
                if value is not None:
                    meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            end = 0
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.take("Q") for _ in range(cur.take("I"))]
                ttype, offset = cur.take("I"), cur.take("Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise UserError(f"{path}: corrupt GGUF (tensor {name!r} has unknown type {ttype})") from None
                n = 1
                for d in dims:
                    n *= d
                tensors[name.decode("utf-8", "replace")] = n
                end = max(end, offset + n // block * type_size)
            alignment = int(meta.get("general.alignment", 32))
            data_start = -(-cur.pos // alignment) * alignment
    if data_start + end > size:
        raise UserError(f"{path}: truncated GGUF (tensor data ends at byte {data_start + end}, file has {size})")
    return GGUFLayout(meta, arrays, tensors)


def check_gguf_file(path: str | os.PathLike) -> None:
    """Raise UserError unless `path` is a whole GGUF file whose header parses."""
    read_gguf_header(path)


def gguf_architecture(path: str | os.PathLike) -> str:
    arch = read_gguf_header(path).get("general.architecture")
    if arch is None:
        raise UserError(f"{path}: GGUF has no general.architecture")
    return str(arch)
