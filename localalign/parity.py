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

from localalign.fsutil import atomic_write_text

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
    from localalign.gguf_check import read_gguf_header

    return read_gguf_header(path)
