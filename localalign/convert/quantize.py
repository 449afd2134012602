"""Quantizing a float GGUF with llama.cpp's own quantizer, in a child process (no external binary)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf

from localalign.engine.runtime import default_threads, llama_cpp
from localalign.errors import UserError
from localalign.fsutil import commit_temp, disk_full_error, temp_path_for
from localalign.gguf_header import check_gguf_file

# Quantization types offered, by their llama_ftype (gguf.LlamaFileType). K-quants (_k) work on
# 256-value super-blocks: tensors whose rows are not a multiple of 256 fall back to another
# type inside llama.cpp.
QUANT_TYPES: dict[str, int] = {
    name: int(gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])
    for name in ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
                 "q3_k_m", "q3_k_s", "q3_k_l", "q2_k")
}


def quantize_gguf(in_path: str | Path, out_path: str | Path, qtype: str = "q8_0") -> Path:
    """Quantize a float GGUF with llama.cpp's own quantizer, in a child process: llama.cpp never
    loads beside torch (a CUDA build's libraries and torch's can clash, engine/process.py)."""
    in_path, out_path = Path(in_path), Path(out_path)
    if qtype not in QUANT_TYPES:
        raise UserError(f"quantization type {qtype!r} is not one of {', '.join(QUANT_TYPES)}")
    check_gguf_file(in_path)
    tmp = temp_path_for(out_path)
    try:
        done = subprocess.run([sys.executable, "-m", "localalign.convert.quantize", str(in_path), str(tmp), qtype],
                              capture_output=True, text=True)
        if done.returncode != 0 and (full := disk_full_error(None, out_path.parent)) is not None:
            raise full
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise UserError(f"llama.cpp could not quantize {in_path} to {qtype} ({why}; "
                            "set LOCALALIGN_LLAMA_LOG=1 to see its log)")
        commit_temp(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _quantize_here(in_path: str, out_path: str, qtype: str) -> int:
    """The child's side: llama.cpp's quantizer in this process; its return code."""
    module = llama_cpp()
    params = module.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = default_threads()
    return int(module.llama_model_quantize(in_path.encode(), out_path.encode(), params))


if __name__ == "__main__":
    rc = _quantize_here(*sys.argv[1:4])
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    sys.exit(1 if rc else 0)
