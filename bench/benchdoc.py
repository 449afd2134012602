"""What every benchmark script shares: the load average, and its section of docs/benchmarks.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from localalign.evaluation.report import metric_cell
from localalign.families import family_of_config
from localalign.fsutil import atomic_write_text
from localalign.models import DEFAULT_MODEL, materialized


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def update_section(text: str, body: str, begin: str, end: str) -> str:
    """`text` with the block between the markers `begin`/`end` replaced by `body` (appended if absent)."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def result_cell(result: dict, suite: str, name: str, with_n: bool = False) -> str:
    """One metric of an eval.json as a table cell (evaluation.report.metric_cell), or n/a."""
    record = result["suites"].get(suite, {}).get("metrics", {}).get(name)
    return metric_cell(record, ci_digits=2, with_n=with_n, missing="n/a")


def publish(docs: Path, lines: list[str], begin: str, end: str, write: bool = True) -> None:
    """Print a benchmark's section (`lines`) and, if `write`, replace the block between `begin`
    and `end` of `docs` (a Markdown file) with it, atomically."""
    body = "\n".join(lines) + "\n"
    print(body)
    if not write:
        return
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# Benchmarks\n"
    atomic_write_text(docs, update_section(text, body, begin, end))
    print(f"updated {docs}")


def default_model():
    """The default model's files (GGUF and HF copy); exit with one line if `make models` has not run."""
    files = materialized(DEFAULT_MODEL)
    if files.gguf is None or files.hf_dir is None:
        sys.exit(f"{DEFAULT_MODEL} is not materialized: run `make models` first")
    return files


def hf_lora_model(model_dir, samples, cfg):
    """transformers.Trainer's side of a training benchmark, set up as its documentation does: our
    encoding (prompt masked) as rows for DataCollatorForSeq2Seq, and the fp32 base model with
    `cfg`'s LoRA (peft). Returns (tokenizer, encoded samples, rows, model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localalign.train.data import encode_samples, end_of_turn_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    data, _ = encode_samples(tok, samples, end_of_turn_ids(tok, model_dir), cfg.max_seq_len)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in data]
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    targets = cfg.target_modules or family_of_config(model.config.to_dict()).lora_targets
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    return tok, data, rows, get_peft_model(model, lora)
