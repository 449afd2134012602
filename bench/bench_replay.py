"""Benchmark: a finished round's candidates replayed under other kind votes and answer budgets.

    .venv/bin/python bench/bench_replay.py [--round-dir runs/round256/round-1] [--no-docs]

Every candidate a round generated is in its samples.jsonl or rejected.jsonl, with the full
answer (an answer cut off at the budget is kept as written). Without generating anything, this
asks what the round would have accepted had the seeds' vote been another, or the answer
budget (`max_response_tokens`) shorter: a candidate counts as accepted if it passed the rule
filters (or failed only the kind check), passes the given kind vote, and its answer fits the
budget. Tokens written are re-tokenized (request + answer, an answer capped at the budget),
so "written per accepted" is the generation cost the setting implies. Novelty is not
replayed (it depends on the order of acceptance): a slight overcount of accepted samples.
Rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_filters import plain_vote, seed_kinds  # noqa: E402
from benchdoc import default_model, publish  # noqa: E402

from localalign.isara.consistency import check_kind  # noqa: E402
from localalign.isara.filters import FilterConfig  # noqa: E402
from localalign.isara.retrieve import Embedder  # noqa: E402
from localalign.samples import read_rejected, read_samples  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_replay -->", "<!-- /bench_replay -->"
KIND_REASONS = ("answers_harmful", "refuses_ordinary")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--round-dir", default=str(REPO / "runs" / "round256" / "round-1"))
    ap.add_argument("--domain", default="safety")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    round_dir = Path(args.round_dir)
    candidates = read_samples(round_dir / "samples.jsonl") + read_rejected(round_dir / "rejected.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(default_model().hf_dir)
    answer_tokens = np.array([len(tokenizer(c.response)["input_ids"]) for c in candidates])
    request_tokens = np.array([len(tokenizer(c.prompt)["input_ids"]) for c in candidates])
    cut_off = np.array([c.reject_reason == "truncated_response" for c in candidates])
    passed_rules = np.array([c.reject_reason in (None, *KIND_REASONS) for c in candidates])

    cfg = FilterConfig()
    embedder = Embedder()
    kinds = seed_kinds(args.domain, embedder)
    vectors = embedder.embed([c.prompt for c in candidates])
    votes = {
        f"softmax, temperature {cfg.vote_temperature}; answers kept below {cfg.keep_answer_below} (shipped)":
            (kinds.refusal_vote(vectors, cfg.vote_temperature), cfg.keep_answer_below),
        "before: similarity-weighted 12 nearest; answers kept below 0.6": (plain_vote(kinds, vectors), 0.6),
    }
    lines = [
        "## A round's candidates replayed (bench/bench_replay.py)",
        "",
        f"`{round_dir.relative_to(REPO) if round_dir.is_relative_to(REPO) else round_dir}`: {len(candidates)} candidates "
        f"({int(cut_off.sum())} cut off at the round's answer budget), replayed without generating (novelty not "
        "replayed). Refusals kept where the vote is at least "
        f"{cfg.keep_refusal_from}. Written = request + answer tokens up to the budget, over all candidates.",
        "",
        "| kind vote | answer budget (tokens) | accepted | acceptance | tokens written per accepted |",
        "|---|---:|---:|---:|---:|",
    ]
    budget_used = tomllib.loads((round_dir.parent / "config.toml").read_text())["isara"]["max_response_tokens"]
    for name, (vote, keep_answer_below) in votes.items():
        kind_ok = np.array([check_kind(float(v), c.response, cfg.keep_refusal_from, keep_answer_below) is None
                            for v, c in zip(vote, candidates)])
        for budget in (192, 256, 320, budget_used):
            if budget > budget_used:
                continue
            accepted = passed_rules & kind_ok & (answer_tokens <= budget) & ~cut_off
            written = int(np.minimum(np.where(cut_off, budget, answer_tokens), budget).sum() + request_tokens.sum())
            lines.append(f"| {name} | {budget} | {int(accepted.sum())} | {accepted.mean():.2f} | "
                         f"{written / max(int(accepted.sum()), 1):.0f} |")
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
