"""Export a (tuned) Hugging Face model back to GGUF, checked against it: the one path that
align's rounds, its final file and `localalign export` all take.

    export_model(hf_dir, out)                        HF directory -> GGUF (quantized if asked)
    export_merged(base_hf, adapter, out)             base + LoRA merged in a scratch directory,
                                                     exported as above, the scratch deleted
    export_adapter(base_hf, adapter, out, base_gguf) PEFT adapter -> GGUF LoRA on `base_gguf`

Each writes the GGUF, `<out>.parity.json` and `<stem>.Modelfile` beside it. The crossing
HF -> GGUF is where peer tools break most often (a pre-tokenizer llama.cpp does not know, a
chat template not carried over, BOS added twice, an attention tensor not permuted), so the
file reaches `out` only after the parity check passed (checks/parity.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from localalign.checks.parity import ParityReport, check_export
from localalign.convert.converter import OUT_TYPES, convert_hf, convert_lora, model_name
from localalign.convert.quantize import QUANT_TYPES, quantize_gguf
from localalign.errors import UserError
from localalign.export.modelfile import modelfile_for, write_modelfile
from localalign.fsutil import TEMP_SUFFIX
from localalign.gguf_header import check_gguf_file
from localalign.train.merge import merge_adapter


def export_model(
    hf_dir: str | Path,
    out_path: str | Path,
    quant: str | None = None,
    out_type: str = "f16",
    check: bool = True,
    name: str | None = None,
) -> ParityReport:
    """Write `out_path` (GGUF of `out_type`, quantized to `quant` if given), its Modelfile
    and `<out>.parity.json`; returns the ParityReport. `name`: its general.name (default: the
    model's own, converter.model_name).

    The file reaches `out_path` only after it passed the parity check. A file that fails is
    kept for inspection as `<stem>.parity-failed.gguf` with its report beside it, and a
    UserError says what differed.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if quant is not None and quant not in QUANT_TYPES:
        raise UserError(f"quantization type {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    if out_type not in OUT_TYPES:
        raise UserError(f"output type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    unchecked = out_path.with_name(f".{out_path.name}.unchecked")
    try:
        if quant is None:
            convert_hf(hf_dir, unchecked, out_type, name)
        else:
            intermediate = out_path.with_name(f".{out_path.name}.{out_type}")
            try:
                convert_hf(hf_dir, intermediate, out_type, name)
                quantize_gguf(intermediate, unchecked, quant)
            finally:
                intermediate.unlink(missing_ok=True)
        report = _check_or_skip(check, hf_dir, unchecked)
        report.details.update({"out_type": out_type, "quant": quant})
        _finish(report, unchecked, out_path, modelfile_for(hf_dir, f"./{out_path.name}"))
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    return report


def export_merged(
    base_hf_dir: str | Path,
    adapter_dir: str | Path,
    out_path: str | Path,
    quant: str | None = None,
    out_type: str = "f16",
    check: bool = True,
) -> ParityReport:
    """`export_model` of base + adapter, merged in a scratch directory beside `out_path`; named
    as the base is (llama.cpp keys some behaviour on general.name)."""
    out_path = Path(out_path)
    with merged_model(base_hf_dir, adapter_dir, out_path.resolve().parent) as merged:
        return export_model(merged, out_path, quant=quant, out_type=out_type, check=check,
                            name=model_name(Path(base_hf_dir)))


def export_adapter(
    base_hf_dir: str | Path,
    adapter_dir: str | Path,
    out_path: str | Path,
    base_gguf: str | Path,
    check: bool = True,
) -> ParityReport:
    """Write a PEFT adapter as a GGUF LoRA for `base_gguf`, check base+adapter against the
    merged HF model, and write a Modelfile (FROM base, ADAPTER this) and the parity JSON."""
    base_hf_dir, adapter_dir, out_path, base_gguf = map(Path, (base_hf_dir, adapter_dir, out_path, base_gguf))
    check_gguf_file(base_gguf)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    unchecked = out_path.with_name(f".{out_path.name}.unchecked")
    try:
        check_lora_exportable(adapter_dir)
        convert_lora(adapter_dir, base_hf_dir, unchecked)
        if check:
            with merged_model(base_hf_dir, adapter_dir, out_path.parent) as merged:
                report = _check_or_skip(True, merged, base_gguf, lora_path=unchecked)
        else:
            report = _check_or_skip(False, base_hf_dir, base_gguf)
        report.details.update({"base_gguf": str(base_gguf), "adapter_dir": str(adapter_dir)})
        same_dir = base_gguf.resolve().parent == out_path.resolve().parent
        from_path = f"./{base_gguf.name}" if same_dir else str(base_gguf.resolve())
        modelfile = modelfile_for(base_hf_dir, from_path, adapter=f"./{out_path.name}")
        _finish(report, unchecked, out_path, modelfile, key="adapter")
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    return report


def check_lora_exportable(adapter_dir: Path) -> None:
    """Refuse an adapter a GGUF LoRA cannot carry, before anything is written: each of these
    changes what the adapter computes in a way llama.cpp's LoRA (scale alpha / r) cannot express."""
    import json

    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir}: adapter type {cfg.get('peft_type')!r} is not LoRA")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "use_rslora": bool(cfg.get("use_rslora")),  # scales by alpha / sqrt(r)
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    if bad := [k for k, v in unsupported.items() if v]:
        raise UserError(
            f"{adapter_dir}: adapter uses {', '.join(bad)}, which a GGUF LoRA adapter cannot carry; "
            "export the merged model instead (drop --adapter-only)"
        )


@contextmanager
def merged_model(base_hf_dir: str | Path, adapter_dir: str | Path, beside: Path) -> Iterator[Path]:
    """Base + adapter merged into a scratch HF directory in `beside`, deleted afterwards: at 4
    bytes a weight it is not worth keeping. A killed run's scratch is a temp directory that the
    next run's `RunLock` clears."""
    beside.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".merged-", suffix=TEMP_SUFFIX, dir=beside))
    try:
        yield merge_adapter(base_hf_dir, adapter_dir, scratch / "merged")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_or_skip(check: bool, hf_dir: Path, gguf_path: Path, lora_path: Path | None = None) -> ParityReport:
    if not check:
        report = ParityReport()
        report.details["checked"] = False
        return report
    report = check_export(hf_dir, gguf_path, lora_path=lora_path)
    report.details["checked"] = True
    return report


def parity_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + ".parity.json")


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def _finish(report: ParityReport, unchecked: Path, out_path: Path, modelfile: str, key: str = "gguf") -> None:
    """Move a checked file into place (or aside, if it failed) and write its JSON/Modelfile."""
    if report.ok:
        os.replace(unchecked, out_path)
        report.details[key] = str(out_path)
        report.write(parity_path(out_path))
        write_modelfile(modelfile_path(out_path), modelfile)
        return
    failed = out_path.with_name(out_path.stem + ".parity-failed" + out_path.suffix)
    os.replace(unchecked, failed)
    report.details[key] = str(failed)
    report.details["status"] = f"FAILED parity: not written to {out_path}; kept as {failed} for inspection"
    report.write(parity_path(failed))
    raise UserError(
        f"export failed its parity check, {report.summary()} (file kept as {failed}, report {parity_path(failed)})"
    )
