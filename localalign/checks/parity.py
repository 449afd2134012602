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

import numpy as np

from localalign.convert.gguf_writer import FLOAT_FILE_TYPES
from localalign.convert.hf_reader import id_list
from localalign.convert.quantize import QUANT_TYPES
from localalign.engine.runtime import llama_cpp, load_llama
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


def probe_texts(hf_tokenizer) -> list[str]:
    """The tokenizer probes plus the probe conversations rendered with the chat template."""
    texts = list(TOKENIZER_PROBES)
    if hf_tokenizer.chat_template:
        for conv in PROBE_CONVERSATIONS:
            texts.append(hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
    return texts


def hf_token_ids(hf_tokenizer, text: str) -> list[int]:
    return list(hf_tokenizer(text, add_special_tokens=True)["input_ids"])


def gguf_token_ids(llm, text: str) -> list[int]:
    # add_bos=True means "add the special tokens the vocab asks for"; llama.cpp consults the
    # GGUF's add_bos flag itself, exactly as it will when the model is used for real.
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def compare_tokenizers(hf_tokenizer, llm, report: ParityReport) -> None:
    mismatches = []
    double_bos = []
    bos = hf_tokenizer.bos_token_id
    for text in probe_texts(hf_tokenizer):
        a, b = hf_token_ids(hf_tokenizer, text), gguf_token_ids(llm, text)
        if a != b:
            mismatches.append({"text": text, "hf": a[:40], "gguf": b[:40]})
        if bos is not None and len(b) >= 2 and b[0] == bos and b[1] == bos:
            double_bos.append(text)
    report.details["tokenizer_probes"] = len(probe_texts(hf_tokenizer))
    report.details["tokenizer_mismatches"] = mismatches
    first = mismatches[0]["text"] if mismatches else ""
    report.record(
        "token_ids", not mismatches, f"{len(mismatches)} probe(s) tokenize differently, first: {first!r}"
    )
    report.record("no_double_bos", not double_bos, f"double BOS on {len(double_bos)} probe(s)")


def compare_special_tokens(hf_tokenizer, gguf_meta: dict[str, Any], report: ParityReport) -> None:
    """BOS/EOS ids and the chat template must be the same on both sides."""
    for name, hf_id in (("bos", hf_tokenizer.bos_token_id), ("eos", hf_tokenizer.eos_token_id)):
        gguf_id = gguf_meta.get(f"tokenizer.ggml.{name}_token_id")
        report.details[f"{name}_id"] = {"hf": hf_id, "gguf": gguf_id}
        report.record(f"{name}_id", hf_id == gguf_id, f"{name} id differs: HF {hf_id}, GGUF {gguf_id}")
    hf_template = hf_tokenizer.chat_template or ""
    gguf_template = gguf_meta.get("tokenizer.chat_template") or ""
    report.record(
        "chat_template",
        hf_template == gguf_template,
        f"chat template differs (HF {len(hf_template)} chars, GGUF {len(gguf_template)} chars)",
    )


def probe_prompts(hf_tokenizer) -> list[str]:
    """Prompts for the logit comparison: chat-templated when the model has a template."""
    if hf_tokenizer.chat_template:
        return [
            hf_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in PROBE_CONVERSATIONS
        ]
    return [t for t in TOKENIZER_PROBES if t.strip()][:3]


def compare_logits(
    hf_model,
    hf_tokenizer,
    llm,
    report: ParityReport,
    max_abs_tol: float | None,
    min_top1: float,
) -> None:
    """Compare next-token logits at every position of the probe prompts.

    `max_abs_tol` bounds the largest absolute logit difference (use it for f32/f16 files,
    where the two sides compute the same function); `min_top1` bounds the share of positions
    whose argmax agrees (the meaningful check for quantized files). None skips the bound.
    """
    import torch

    worst, abs_sum, agree, total = 0.0, 0.0, 0, 0
    for text in probe_prompts(hf_tokenizer):
        ids = hf_token_ids(hf_tokenizer, text)
        with torch.no_grad():
            hf_logits = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        gguf_logits = gguf_logits_for(llm, ids)
        diff = np.abs(hf_logits - gguf_logits)
        worst = max(worst, float(diff.max()))
        abs_sum += float(diff.mean(axis=-1).sum())
        agree += int(np.sum(hf_logits.argmax(-1) == gguf_logits.argmax(-1)))
        total += len(ids)
    top1 = agree / max(total, 1)
    report.details["max_abs_logit_diff"] = round(worst, 6)
    report.details["mean_abs_logit_diff"] = round(abs_sum / max(total, 1), 6)
    report.details["top1_agreement"] = round(top1, 4)
    report.details["logit_positions"] = total
    if max_abs_tol is not None:
        report.details["max_abs_logit_tol"] = max_abs_tol
        report.record(
            "logits_close", worst <= max_abs_tol, f"max |logit diff| {worst:.4g} > tolerance {max_abs_tol}"
        )
    report.details["min_top1_agreement"] = min_top1
    report.record("top1_agreement", top1 >= min_top1, f"top-1 agreement {top1:.3f} < {min_top1}")


def gguf_logits_for(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position for `ids` (the Llama must be made with logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


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


_FLOAT_TYPE_NAMES = {v: k for k, v in FLOAT_FILE_TYPES.items()}  # general.file_type -> out type


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
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False).eval()
    llm = load_llama(gguf_path, n_ctx=512, logits_all=True, lora_path=lora_path)
    try:
        compare_tokenizers(tokenizer, llm, report)
        compare_special_tokens(tokenizer, meta, report)
        compare_stop_tokens(model, tokenizer, llm, report)
        compare_logits(model, tokenizer, llm, report, max_abs_tol=max_abs_tol, min_top1=min_top1)
    finally:
        llm.close()
    report.details["gguf"] = str(gguf_path)
    report.details["hf_dir"] = str(hf_dir)
    if lora_path is not None:
        report.details["adapter"] = str(lora_path)
    return report


def compare_stop_tokens(hf_model, hf_tokenizer, llm, report: ParityReport) -> None:
    """Every id HF stops generation on must end generation in llama.cpp too.

    An exported model that "never stops" is one whose end-of-turn token llama.cpp does not
    treat as end-of-generation.
    """
    module = llama_cpp()
    hf_stops = set(id_list(hf_model.generation_config.eos_token_id if hf_model.generation_config else None))
    hf_stops |= set(id_list(hf_tokenizer.eos_token_id))
    vocab = module.llama_model_get_vocab(llm.model)
    not_eog = sorted(i for i in hf_stops if not module.llama_vocab_is_eog(vocab, i))
    report.details["stop_ids"] = {"hf": sorted(hf_stops), "gguf_eos": llm.token_eos()}
    report.record(
        "stop_tokens",
        bool(hf_stops) and not not_eog,
        f"HF stop id(s) {not_eog} do not end generation in llama.cpp" if not_eog else "HF defines no stop token",
    )



# ---------------------------------------------------------------------------- an HF copy of a GGUF

# Tolerances for the copy check. Measured on SmolLM2-135M, Q4_1 GGUF against its dequantized
# f32 HF copy, 139 positions of 3 chat prompts: mean |logit diff| 0.19-0.21, max 1.77 (logits
# have a spread of ~7-8), top-1 agreement 0.971. The gap is llama.cpp multiplying Q4_1 weights
# with 8-bit-quantized activations, not a bug; a wrong tensor layout gives differences of 10+
# and top-1 agreement near chance.
COPY_CHECK_MAX_ABS = 2.5
COPY_CHECK_MIN_TOP1 = 0.90


def check_copy(gguf: Path, hf_dir: Path) -> ParityReport:
    """Parity of an HF copy against the GGUF it was made from: the exporter's check (tokens,
    special tokens, stop tokens, logits), with tolerances for the GGUF's own type."""
    max_abs, min_top1 = tolerances_for(read_gguf_metadata(gguf))
    if max_abs is None:  # a quantized source: the Q4_1 measurements above
        max_abs, min_top1 = COPY_CHECK_MAX_ABS, COPY_CHECK_MIN_TOP1
    return check_export(hf_dir, gguf, max_abs_tol=max_abs, min_top1=min_top1)
