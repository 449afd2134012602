"""What every benchmark script shares: the load average, its section of docs/benchmarks.md, and
repeats over seeds (`--repeats K`: runs with seed, seed+1, ..., each metric's mean and spread)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


# --------------------------------------------------------------------------- repeats over seeds


def parse_repeated(doc: str, argv: list[str] | None, own: Callable[[argparse.ArgumentParser], None]
                   ) -> tuple[argparse.Namespace, list[int], argparse.ArgumentParser]:
    """A benchmark's arguments: its `own` options, --no-docs, and --seed/--repeats (K runs with
    seeds seed, seed+1, ...: generation, data order, LoRA init). Returns the arguments, the
    seeds of the repeats and the parser (for the script's own error lines); a --repeats under 1
    is one argparse error line and exit 2."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    own(ap)
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--seed", type=int, default=0, help="the first run's seed [0, align's default]")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per configuration, with seeds seed, seed+1, ...; each metric's mean and spread [1]")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    return args, [args.seed + i for i in range(args.repeats)], ap


@dataclass
class Spread:
    """One metric over K runs."""

    mean: float
    sd: float  # sample standard deviation (K - 1); 0 for one run
    low: float
    high: float
    k: int


def spread(values: list[float]) -> Spread | None:
    """Mean, sample sd, min and max of the values that are not None; None if there are none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    mean = math.fsum(xs) / len(xs)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Spread(mean, sd, min(xs), max(xs), len(xs))


def metric_values(results: list[dict], suite: str, name: str) -> list[float | None]:
    """The metric's value in each eval.json (None where a run has no value for it)."""
    out = []
    for result in results:
        record = result.get("suites", {}).get(suite, {}).get("metrics", {}).get(name)
        out.append(record["value"] if record and record.get("n") else None)
    return out


def spread_cell(results: list[dict], suite: str, name: str, with_n: bool = False) -> str:
    """A table cell for one metric over the runs: one run as `result_cell` (value and Wilson
    interval); several as mean +- sd (min-max, K seeds)."""
    if len(results) == 1:
        return result_cell(results[0], suite, name, with_n)
    s = spread(metric_values(results, suite, name))
    return "n/a" if s is None else f"{s.mean:.3f} ± {s.sd:.3f} ({s.low:.2f}-{s.high:.2f}, {s.k} seeds)"


def range_text(values: list[float], digits: int = 0) -> str:
    """'19' when every run agrees, else '19-31' (min-max)."""
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}-{high:.{digits}f}"
