"""HF -> GGUF and PEFT LoRA -> GGUF LoRA with llama.cpp's own converters, in a child process.

The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` and their `conversion/`
modules) are what most GGUFs on the hub were made with: they know each family's tensor names,
norm offsets, tied embeddings, RoPE variants and pre-tokenizer hashes. They come from the
source distribution of the llama-cpp-python we pin (`make setup` keeps them beside the keyed
wheels, engine/build.py), so they match the llama.cpp that loads their output. They run in a
child process with the gguf-py bundled beside them: that gguf is newer code than ours and
must never meet it in one process (converter_child.py).

Measured on SmolLM2-135M, f16 (docs/benchmarks.md): 9.3 s, and tensor for tensor identical to
the ~200-line writer of our own it replaced (2.7 s); a round's export is seconds of minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from localalign.engine.build import LLAMA_CPP_VERSION, converter_dir
from localalign.errors import UserError
from localalign.families import family_of_config
from localalign.fsutil import commit_temp, disk_full_error, temp_path_for
from localalign.gguf_header import read_gguf_header

CHILD = Path(__file__).with_name("converter_child.py")
# The HF copy of a GGUF keeps the GGUF's tokenizer here, so its exports carry that tokenizer.
TOKENIZER_GGUF = "tokenizer.gguf"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself; other types: quantize.py
CONVERT_TIMEOUT_S = 3600  # a 3B model at f16 writes in minutes; a hung child must not hang a run


def find_converter() -> Path:
    """The converter directory, or a UserError that says how to get it."""
    d = converter_dir()
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise UserError(
            f"llama.cpp's converter ({LLAMA_CPP_VERSION}) is not at {d}; run `make setup`, or "
            f"`{Path(sys.executable).name} -m localalign.engine.build converter` (downloads the source distribution, 77 MB)"
        )
    return d


def _run(args: list[str], what: str, timeout_s: float = CONVERT_TIMEOUT_S) -> float:
    """Run the child with `args`; seconds taken. A failure is a UserError naming its reason."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must take its own gguf-py
    cmd = [sys.executable, str(CHILD), str(find_converter()), *args]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: llama.cpp's converter did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise UserError(f"{what}: llama.cpp's converter failed: {failure_reason(done.stderr, done.returncode)}")
    return time.perf_counter() - t0


def failure_reason(stderr: str, returncode: int) -> str:
    """The line of the converter's output that says why: the exception, else its last error line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
    for marker in ("Error:", "Exception:", "ERROR:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return hits[-1][:400]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return (lines[-1] if lines else f"exit code {returncode}")[:400]


def convert_hf(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16", name: str | None = None) -> Path:
    """Write the HF model in `hf_dir` as a GGUF of `out_type`; the file appears only when complete.

    A family not in families.FAMILIES is refused before the converter runs. With a
    `tokenizer.gguf` in `hf_dir` (an HF copy of a GGUF), the tokenizer is taken from it.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise UserError(f"output type {out_type!r} is not one of {', '.join(OUT_TYPES)} (quantize afterwards)")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    family_of_config(config, hf_dir)
    vocab = hf_dir / TOKENIZER_GGUF
    args = ["convert_hf_to_gguf.py"] + (["--vocab-from", str(vocab)] if vocab.is_file() else [])
    tmp = temp_path_for(out_path)
    args += ["--", str(hf_dir), "--outfile", str(tmp), "--outtype", out_type, "--model-name", name or model_name(hf_dir, config)]
    _convert_to(tmp, out_path, args, f"{hf_dir}: export to GGUF")
    return out_path


def model_name(hf_dir: Path, config: dict | None = None) -> str:
    """The `general.name` an export of `hf_dir` carries: the name of the model it came from (the
    source GGUF's, kept in tokenizer.gguf; else the HF id or folder it was loaded from). llama.cpp
    keys some behaviour on it (Phi-3's special tokens), so a tuned model keeps its base's."""
    vocab = hf_dir / TOKENIZER_GGUF
    if vocab.is_file() and read_gguf_header(vocab).get("general.name"):
        return str(read_gguf_header(vocab)["general.name"])
    if config is None:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    source = str(config.get("_name_or_path") or "").rstrip("/")
    return source.rsplit("/", 1)[-1] if source else hf_dir.name


def convert_lora(adapter_dir: str | Path, base_hf_dir: str | Path, out_path: str | Path) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter (f32) for the base model in `base_hf_dir`."""
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    tmp = temp_path_for(out_path)
    args = ["convert_lora_to_gguf.py", "--", "--base", str(base_hf_dir), "--outfile", str(tmp), "--outtype", "f32",
            str(adapter_dir)]
    _convert_to(tmp, out_path, args, f"{adapter_dir}: export as a GGUF LoRA adapter")
    return out_path


def extract_vocab(gguf_path: str | Path, out_path: str | Path) -> Path:
    """The tokenizer keys of a GGUF (and its chat template) as a small GGUF without tensors."""
    out_path = Path(out_path)
    tmp = temp_path_for(out_path)
    _convert_to(tmp, out_path, ["--extract-vocab", str(gguf_path), str(tmp)], f"{gguf_path}: reading its tokenizer")
    return out_path


def _convert_to(tmp: Path, out_path: Path, args: list[str], what: str) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run(args, what)
        if not tmp.is_file():
            raise UserError(f"{what}: llama.cpp's converter reported success but wrote no file")
        commit_temp(tmp, out_path)
    except BaseException as e:
        full = disk_full_error(e, out_path.parent)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
