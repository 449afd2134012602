"""Check that a GGUF file and a Hugging Face copy are the same model.

Where the two formats meet is where peer tools break: a tokenizer that splits text
differently, a lost chat template, a double BOS, a transposed tensor. These checks compare
the two sides on fixed inputs and say exactly what differs. They are run after every HF copy
is made from a GGUF (`localalign models pull`) and after every export back to GGUF.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localalign.chat import render_conversation
from localalign.convert.quantize import QUANT_TYPES
from localalign.engine.process import open_probe
from localalign.families import Family, end_of_turn_ids, family_of_config, fold_system, template_variables
from localalign.fsutil import atomic_write_text
from localalign.gguf_header import read_gguf_header

# Fixed strings whose tokenization must agree byte for byte. They cover what tokenizers
# disagree on in practice: whitespace runs, unicode, digits, code, special tokens in text.
TOKENIZER_PROBES: list[str] = [
    "Hello world",
    "  leading spaces and   runs of    spaces",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Unicode: café, naïve, 東京, Ελληνικά, emoji 🙂👍🏽, Zürich",
    "Numbers 1234567890 3.14159 1,000,000 -42 abc123 x1y2 2024-11-23",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n",
    "I can't, won't, shouldn't. Don't!",
    "URL https://example.com/a?b=c&d=e and e-mail a.b@example.org",
    "",
    " ",
]

# Conversations rendered with the model's own chat template and then tokenized.
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
        {"role": "user", "content": "Now one about mountains, please."},
    ],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain recursion in one line."}],
]


@dataclass
class ParityReport:
    """What was compared and what differed; `ok` is False if any check failed."""

    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def record(self, name: str, passed: bool, problem: str = "") -> None:
        self.checks[name] = bool(passed)
        if not passed and problem:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, default=_json_default) + "\n")

    def summary(self) -> str:
        if self.ok:
            bits = [f"{k}={v}" for k, v in self.details.items() if isinstance(v, (int, float))]
            return "parity OK (" + ", ".join(bits) + ")"
        return "parity FAILED: " + "; ".join(self.problems)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def render_probe(hf_tokenizer, family: Family | None, conversation: list[dict[str, str]]) -> str:
    """A probe conversation rendered the way localalign renders every conversation
    (chat.render_conversation: training data, generation prompts, evaluation)."""
    return render_conversation(hf_tokenizer.chat_template, conversation, family, hf_tokenizer.special_tokens_map)


def probe_texts(hf_tokenizer, family: Family | None = None) -> list[str]:
    """The tokenizer probes plus the probe conversations rendered with the chat template."""
    texts = list(TOKENIZER_PROBES)
    if hf_tokenizer.chat_template:
        texts += [render_probe(hf_tokenizer, family, conv) for conv in PROBE_CONVERSATIONS]
    return texts


def opens_with_bos(text: str, bos_text: str | None) -> bool:
    """Whether `text` (a rendered template, say) writes the BOS token itself: then neither side
    adds one, as the trainer and the engine do not (a template with {{ bos_token }} and a
    tokenizer that adds BOS would give two)."""
    return bool(bos_text) and text.startswith(bos_text)


def hf_token_ids(hf_tokenizer, text: str) -> list[int]:
    add = not opens_with_bos(text, hf_tokenizer.bos_token)
    return list(hf_tokenizer(text, add_special_tokens=add)["input_ids"])


def gguf_token_ids(probe, text: str, bos_text: str | None = None) -> list[int]:
    # add_bos=True means "add the special tokens the vocab asks for"; llama.cpp consults the
    # GGUF's add_bos flag itself, exactly as it will when the model is used for real.
    return probe.tokenize(text, add_bos=not opens_with_bos(text, bos_text), special=True)


def compare_tokenizers(hf_tokenizer, probe, report: ParityReport, family: Family | None = None) -> None:
    mismatches = []
    double_bos = []
    bos = hf_tokenizer.bos_token_id
    texts = probe_texts(hf_tokenizer, family)
    for text in texts:
        a, b = hf_token_ids(hf_tokenizer, text), gguf_token_ids(probe, text, hf_tokenizer.bos_token)
        if a != b:
            mismatches.append({"text": text, "hf": a[:40], "gguf": b[:40]})
        if bos is not None and len(b) >= 2 and b[0] == bos and b[1] == bos:
            double_bos.append(text)
    report.details["tokenizer_probes"] = len(texts)
    report.details["tokenizer_mismatches"] = mismatches
    first = mismatches[0]["text"] if mismatches else ""
    report.record(
        "token_ids", not mismatches, f"{len(mismatches)} probe(s) tokenize differently, first: {first!r}"
    )
    report.record("no_double_bos", not double_bos, f"double BOS on {len(double_bos)} probe(s)")


def compare_special_tokens(hf_tokenizer, gguf_meta: dict[str, Any], report: ParityReport,
                           family: Family | None = None) -> None:
    """BOS/EOS ids and the chat template must be the same on both sides (a GGUF without one may
    face its family's, which its HF copy took: families.fallback_template)."""
    for name, hf_id in (("bos", hf_tokenizer.bos_token_id), ("eos", hf_tokenizer.eos_token_id)):
        gguf_id = gguf_meta.get(f"tokenizer.ggml.{name}_token_id")
        report.details[f"{name}_id"] = {"hf": hf_id, "gguf": gguf_id}
        report.record(f"{name}_id", hf_id == gguf_id, f"{name} id differs: HF {hf_id}, GGUF {gguf_id}")
    hf_template = hf_tokenizer.chat_template or ""
    gguf_template = gguf_meta.get("tokenizer.chat_template") or ""
    lent = not gguf_template and family is not None and hf_template == (family.fallback_template or None)
    if lent:
        report.details["chat_template_source"] = f"the {family.name} family's (the GGUF has none)"
    report.record(
        "chat_template",
        hf_template == gguf_template or lent,
        f"chat template differs (HF {len(hf_template)} chars, GGUF {len(gguf_template)} chars)",
    )


def compare_renderings(hf_tokenizer, probe, gguf_meta: dict[str, Any], family: Family | None,
                       report: ParityReport) -> None:
    """The probe conversations rendered by our renderer (chat.render_conversation, which every
    stage uses) and by transformers' apply_chat_template must agree: ours is the sandboxed
    environment transformers renders in, and this holds it to that. Not compared for a template
    that prints today's date (transformers 5 gives templates its own clock). llama.cpp's built-in
    chat formats (`llama_chat_apply_template`: what llama.cpp programs use without --jinja) are
    reported, not checked: they know well-known templates by their text, and render some their
    own way."""
    template = hf_tokenizer.chat_template
    if not template:
        return
    ours = [render_probe(hf_tokenizer, family, conv) for conv in PROBE_CONVERSATIONS]
    if "strftime_now" in template:
        report.details["chat_rendering"] = "not compared with transformers: the template prints today's date"
    else:
        variables = {k: v for k, v in template_variables(family).items() if k != "strftime_now"}
        theirs = [hf_tokenizer.apply_chat_template(fold_system(conv, family), tokenize=False, add_generation_prompt=True,
                                                   **variables) for conv in PROBE_CONVERSATIONS]
        differ = sum(a != b for a, b in zip(ours, theirs))
        report.record("chat_rendering", not differ,
                      f"our renderer and transformers render {differ} probe conversation(s) differently")
    gguf_template = gguf_meta.get("tokenizer.chat_template") or ""
    builtin = [probe.apply_chat_template(gguf_template, fold_system(conv, family)) if gguf_template else None
               for conv in PROBE_CONVERSATIONS]
    if any(b is None for b in builtin):
        report.details["llama_cpp_builtin_template"] = "not recognised (llama.cpp programs need --jinja)"
    else:
        same = sum(a == b for a, b in zip(ours, builtin))
        report.details["llama_cpp_builtin_template"] = f"same on {same} of {len(ours)} probe conversations"


def probe_prompts(hf_tokenizer, family: Family | None = None) -> list[str]:
    """Prompts for the logit comparison: chat-templated when the model has a template."""
    if hf_tokenizer.chat_template:
        return [render_probe(hf_tokenizer, family, c) for c in PROBE_CONVERSATIONS]
    return [t for t in TOKENIZER_PROBES if t.strip()][:3]


def compare_logits(
    hf_model,
    hf_tokenizer,
    probe,
    report: ParityReport,
    max_abs_tol: float | None,
    min_top1: float,
    family: Family | None = None,
    max_mean_ratio: float | None = None,
) -> None:
    """Compare next-token logits at every position of the probe prompts.

    `max_abs_tol` bounds the largest absolute logit difference (use it for f32/f16 files,
    where the two sides compute the same function); `min_top1` bounds the share of positions
    whose argmax agrees (the meaningful check for quantized files). None skips the bound.
    """
    import torch

    worst, abs_sum, agree, total, spread = 0.0, 0.0, 0, 0, 0.0
    for text in probe_prompts(hf_tokenizer, family):
        ids = hf_token_ids(hf_tokenizer, text)
        with torch.no_grad():
            hf_logits = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        gguf_logits = probe.logits(ids)
        diff = np.abs(hf_logits - gguf_logits)
        worst = max(worst, float(diff.max()))
        abs_sum += float(diff.mean(axis=-1).sum())
        agree += int(np.sum(hf_logits.argmax(-1) == gguf_logits.argmax(-1)))
        spread += float(hf_logits.std(axis=-1).sum())
        total += len(ids)
    top1 = agree / max(total, 1)
    report.details["max_abs_logit_diff"] = round(worst, 6)
    report.details["mean_abs_logit_diff"] = round(abs_sum / max(total, 1), 6)
    report.details["top1_agreement"] = round(top1, 4)
    report.details["logit_std"] = round(spread / max(total, 1), 4)  # HF's, over the vocabulary, mean of positions
    if max_mean_ratio is not None:
        ratio = abs_sum / max(total, 1) / max(spread / max(total, 1), 1e-9)
        report.details["mean_diff_to_std"] = round(ratio, 4)
        report.details["max_mean_diff_to_std"] = max_mean_ratio
        report.record("logits_close", ratio <= max_mean_ratio,
                      f"mean |logit diff| is {ratio:.3f} of the logits' spread > {max_mean_ratio}")
    report.details["logit_positions"] = total
    if max_abs_tol is not None:
        report.details["max_abs_logit_tol"] = max_abs_tol
        report.record(
            "logits_close", worst <= max_abs_tol, f"max |logit diff| {worst:.4g} > tolerance {max_abs_tol}"
        )
    report.details["min_top1_agreement"] = min_top1
    report.record("top1_agreement", top1 >= min_top1, f"top-1 agreement {top1:.3f} < {min_top1}")


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Scalar and string key/values of a GGUF file (arrays such as the vocab are skipped)."""
    return read_gguf_header(path)


# ---------------------------------------------------------------------------- an export

# Tolerances for the parity check, measured with llama-cpp-python 0.3.36 on this CPU on the
# probe prompts above (139 positions on SmolLM2-135M, 186 on the tiny fixture).
# max |logit diff| HF vs GGUF, worst seen:
#   f32:  tiny 0.013, SmolLM2 0.050 (0.042 merged with a random LoRA; f32 base + LoRA 0.033)
#   f16:  tiny 0.036, SmolLM2 0.089 (merged) / 0.061; f16 base + trained LoRA 0.085
#   bf16: tiny 0.167, SmolLM2 0.415
# llama.cpp keeps its KV cache in f16 even for an f32 model, so an f32 file does not match HF
# to float32 precision. The bounds are about 2x the worst value seen: a wrong tensor layout
# (Q/K not permuted, a transposed weight) moves logits by whole units (tests show 1-7).
MAX_ABS_LOGIT_DIFF = {"f32": 0.1, "f16": 0.2, "bf16": 0.8}
# Share of probe positions whose top-1 token agrees with HF, worst seen:
#   f32 1.0 / 1.0, f16 0.995 (tiny) / 1.0, bf16 0.962 (tiny) / 1.0 (SmolLM2);
#   q8_0 0.941 (tiny) / 0.978-0.993 (SmolLM2); q4_k_m 0.871-0.935 (SmolLM2);
#   trained LoRA on the shipped Q4_1 SmolLM2 vs merged HF 0.928.
# The random tiny model has near-flat logits, so its ties flip easily; its 4-bit files fall
# to 0.4-0.7 and are tested for loading and tokens, not top-1.
MIN_TOP1 = {"f32": 0.97, "f16": 0.97, "bf16": 0.9, "q8": 0.9, "quant": 0.8}


# general.file_type of the float files an export writes -> the name the tables use
_FLOAT_TYPE_NAMES = {int(gguf.LlamaFileType.ALL_F32): "f32", int(gguf.LlamaFileType.MOSTLY_F16): "f16",
                     int(gguf.LlamaFileType.MOSTLY_BF16): "bf16"}


def tolerances_for(gguf_meta: dict[str, Any]) -> tuple[float | None, float]:
    """(max |logit diff| or None, min top-1 agreement) for a GGUF, by its general.file_type."""
    ftype = gguf_meta.get("general.file_type", 0)
    if ftype in _FLOAT_TYPE_NAMES:
        return MAX_ABS_LOGIT_DIFF[_FLOAT_TYPE_NAMES[ftype]], MIN_TOP1[_FLOAT_TYPE_NAMES[ftype]]
    return None, MIN_TOP1["q8" if ftype == QUANT_TYPES["q8_0"] else "quant"]


AUTO = "auto"  # check_export: take the bound for the file's type from the tables above


def check_export(
    hf_dir: str | Path,
    gguf_path: str | Path,
    max_abs_tol: float | None | str = AUTO,
    min_top1: float | str = AUTO,
    lora_path: str | Path | None = None,
    max_mean_ratio: float | None = None,
) -> ParityReport:
    """Parity of an exported GGUF (optionally with a LoRA adapter applied) against the HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Read once: GGUFReader parses the whole vocabulary (seconds for a 49k-token model).
    meta = read_gguf_metadata(gguf_path)
    auto_abs, auto_top1 = tolerances_for(meta)
    max_abs_tol = auto_abs if max_abs_tol == AUTO else max_abs_tol
    min_top1 = auto_top1 if min_top1 == AUTO else min_top1
    report = ParityReport()
    family = family_of_config(json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8")), hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False).eval()
    # llama.cpp runs in an engine process of its own (engine/process.py), never beside torch.
    with open_probe(gguf_path, lora=lora_path, n_ctx=512) as probe:
        compare_tokenizers(tokenizer, probe, report, family)
        compare_special_tokens(tokenizer, meta, report, family)
        compare_renderings(tokenizer, probe, meta, family, report)
        compare_stop_tokens(model, tokenizer, probe, report, family)
        compare_logits(model, tokenizer, probe, report, max_abs_tol=max_abs_tol, min_top1=min_top1, family=family,
                       max_mean_ratio=max_mean_ratio)
    report.details["gguf"] = str(gguf_path)
    report.details["hf_dir"] = str(hf_dir)
    if lora_path is not None:
        report.details["adapter"] = str(lora_path)
    return report


def compare_stop_tokens(hf_model, hf_tokenizer, probe, report: ParityReport, family: Family | None = None) -> None:
    """Every id HF stops generation on (and the family's end-of-turn tokens) must end
    generation in llama.cpp too.

    An exported model that "never stops" is one whose end-of-turn token llama.cpp does not
    treat as end-of-generation.
    """
    gen = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
    hf_stops = set(end_of_turn_ids(family, hf_tokenizer.get_vocab(),
                                   [hf_tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])]))
    not_eog = sorted(i for i in hf_stops if not probe.is_eog(i))
    report.details["stop_ids"] = {"hf": sorted(hf_stops), "gguf_eos": probe.token_eos()}
    report.record(
        "stop_tokens",
        bool(hf_stops) and not not_eog,
        f"HF stop id(s) {not_eog} do not end generation in llama.cpp" if not_eog else "HF defines no stop token",
    )


# ---------------------------------------------------------------------------- an HF copy of a GGUF

# Tolerances for the copy check of a quantized GGUF against its dequantized f32 HF copy, on the
# probe prompts. The gap is llama.cpp multiplying quantized weights with 8-bit-quantized
# activations, not a bug; a wrong tensor layout gives differences as large as the logits' own
# spread and top-1 agreement near chance. So the bound is relative to that spread (HF logits' std
# over the vocabulary): measured 2026-12-03, mean |diff| / std 0.062 for SmolLM2-135M (Q4_1; max
# |diff| 2.59, top-1 0.986) and 0.116 for Gemma 3 270M (Q4_K_M; max 3.99, top-1 0.966). An absolute
# max bound (2.5, from SmolLM2 on another CPU: max 1.77) failed SmolLM2 itself on this one.
COPY_CHECK_MAX_MEAN_RATIO = 0.25
COPY_CHECK_MIN_TOP1 = 0.90


def check_copy(gguf: Path, hf_dir: Path) -> ParityReport:
    """Parity of an HF copy against the GGUF it was made from: the exporter's check (tokens,
    special tokens, stop tokens, logits), with tolerances for the GGUF's own type."""
    max_abs, min_top1 = tolerances_for(read_gguf_metadata(gguf))
    if max_abs is None:  # a quantized source: the measurements above
        return check_export(hf_dir, gguf, max_abs_tol=None, min_top1=COPY_CHECK_MIN_TOP1,
                            max_mean_ratio=COPY_CHECK_MAX_MEAN_RATIO)
    return check_export(hf_dir, gguf, max_abs_tol=max_abs, min_top1=min_top1)
