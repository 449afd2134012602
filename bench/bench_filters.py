"""Benchmark: every filter against the hand-labelled development set (tests/data/labelled/).

    .venv/bin/python bench/bench_filters.py [--rate N] [--no-docs]

The development set is candidates the default model wrote from the shipped seeds (two answers
per request), labelled by hand (tests/data/labelled/README.md). For each filter, applied in
the pipeline's order to the answers the earlier filters kept: how many it rejects, its
precision (the share of its rejects that are bad) and recall (the share of the bad ones it
rejects), and the share of good answers among what is left. "Good" is judged two ways:
`train` (the labeller would train on it: right kind, coherent, complete, not wrong) and
`usable` (the right lesson, coherently told, factual slips allowed: safety: coherent and the
right kind; truthfulness: coherent and true or partly true; instruction-following: coherent,
a sensible answer, and any stated constraint met).

`--rate N` also rates the first N labelled answers of each domain with the base model (the
self-rating filter, off by default) and reports the rating's AUC against both labels.
Rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import default_model, publish  # noqa: E402

from localalign.isara.consistency import SeedKinds, check_kind, check_stated_constraints  # noqa: E402
from localalign.isara.filters import FilterConfig, check_rules  # noqa: E402
from localalign.isara.prompts import COMMON_LEAK_MARKERS  # noqa: E402
from localalign.isara.retrieve import Embedder  # noqa: E402
from localalign.paths import SEEDS_DIR  # noqa: E402
from localalign.samples import Sample, read_samples  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_filters -->", "<!-- /bench_filters -->"
LABELLED = REPO / "tests" / "data" / "labelled"
SETS = {  # file -> seed domain
    "safety.base.jsonl": "safety",
    "safety.round1.jsonl": "safety",
    "truthfulness.base.jsonl": "truthfulness",
    "instruction-following.base.jsonl": "instruction-following",
}
CHATML_LEAKS = ("<|im_start|>", "<|im_end|>", *COMMON_LEAK_MARKERS)


def usable(domain: str, request: dict, answer: dict) -> bool:
    if not answer["coherent"]:
        return False
    if domain == "safety":
        return answer["right_kind"] is True
    if domain == "truthfulness":
        return answer["answer"] in ("true", "partly")
    return answer["answer_ok"] and answer["follows"] in ("yes", "n/a")


def answers_of(name: str) -> tuple[str, list[dict]]:
    """One row per labelled answer, with its request's fields and its examples as Samples."""
    domain = SETS[name]
    seeds = read_samples(SEEDS_DIR / f"{domain}.jsonl")
    rows = []
    for line in (LABELLED / name).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        examples = [seeds[i - 1] for i in rec["examples"]]
        for a in rec["answers"]:
            rows.append({"prompt": rec["prompt"], "response": a["response"], "finish": a["finish"], "examples": examples,
                         "train": a["train"], "usable": usable(domain, rec, a)})
    return domain, rows


def rule_reason(row: dict, cfg: FilterConfig) -> str | None:
    finish = row["finish"]
    problem = ("truncated_prompt" if finish[0] == "length" else "truncated_response" if finish[1] == "length"
               else None)
    return check_rules(row["prompt"], row["response"], row["examples"], cfg, CHATML_LEAKS, problem)


def seed_kinds(domain: str, embedder: Embedder) -> SeedKinds:
    """The shipped seeds of `domain`, embedded, as the consistency filter sees them."""
    seeds = read_samples(SEEDS_DIR / f"{domain}.jsonl")
    return SeedKinds.of(seeds, embedder.embed([s.prompt for s in seeds]), embedder.embed([s.response for s in seeds]))


def filter_table(domain: str, rows: list[dict], embedder: Embedder, cfg: FilterConfig) -> list[dict]:
    """Rows of the filter table for one labelled set, the filters applied in order."""
    kinds = seed_kinds(domain, embedder)
    votes = kinds.refusal_vote(embedder.embed([r["prompt"] for r in rows]), cfg.vote_temperature)
    filters = [
        ("rules", lambda i, r: rule_reason(r, cfg)),
        ("consistency: kind", lambda i, r: check_kind(float(votes[i]), r["response"], cfg.keep_refusal_from,
                                                      cfg.keep_answer_below)),
        ("consistency: stated constraints", lambda i, r: check_stated_constraints(r["prompt"], r["response"])),
    ]
    kept = np.ones(len(rows), bool)
    good = {k: np.array([r[k] for r in rows]) for k in ("train", "usable")}
    out = [{"filter": "(none)", "rejects": 0, "base": int(kept.sum()), "kept_train": good["train"].mean(),
            "kept_usable": good["usable"].mean()}]
    for name, reason in filters:
        rejects = np.array([kept[i] and reason(i, r) is not None for i, r in enumerate(rows)])
        entry = {"filter": name, "rejects": int(rejects.sum()), "base": int(kept.sum())}
        for k, g in good.items():
            bad_before = kept & ~g
            entry[f"precision_{k}"] = (~g[rejects]).mean() if rejects.any() else None
            entry[f"recall_{k}"] = (rejects & ~g).sum() / bad_before.sum() if bad_before.any() else None
        kept &= ~rejects
        entry.update(kept_train=good["train"][kept].mean() if kept.any() else None,
                     kept_usable=good["usable"][kept].mean() if kept.any() else None, kept=int(kept.sum()))
        out.append(entry)
    return out


SHIPPED_VOTE = "softmax over all seeds"
OLD_VOTE = "before: similarity-weighted, 12 nearest"


def plain_vote(kinds: SeedKinds, vectors: np.ndarray, k: int = 12) -> np.ndarray:
    """The vote the softmax replaced: the similarity-weighted share of the k nearest seeds that refuse."""
    sims = vectors @ kinds.prompt_vectors.T
    nearest = np.argsort(-sims, axis=1)[:, :k]
    w = np.clip(np.take_along_axis(sims, nearest, axis=1), 0, None)
    return (w * kinds.refuses[nearest]).sum(1) / np.maximum(w.sum(1), 1e-9)


def request_votes(embedder: Embedder, cfg: FilterConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The seeds' vote as a judge of the request, on the labelled safety requests that are
    requests: (harmful, the labeller's call; {vote name: vote}) for the shipped softmax vote
    and the similarity-weighted vote of the 12 nearest seeds it replaced."""
    kinds = seed_kinds("safety", embedder)
    recs = [json.loads(line) for name in SETS if SETS[name] == "safety"
            for line in (LABELLED / name).read_text(encoding="utf-8").splitlines()]
    recs = [r for r in recs if r["request"] in ("harmful", "ordinary")]
    vectors = embedder.embed([r["prompt"] for r in recs])
    return (np.array([r["request"] == "harmful" for r in recs]),
            {SHIPPED_VOTE: kinds.refusal_vote(vectors, cfg.vote_temperature), OLD_VOTE: plain_vote(kinds, vectors)})


def request_judge_rows(embedder: Embedder, cfg: FilterConfig) -> list[str]:
    harmful, votes = request_votes(embedder, cfg)
    lines = [f"The seeds' vote as a judge of the request, on the {len(harmful)} labelled safety requests that are "
             f"requests ({int(harmful.sum())} harmful): at vote >= t the request is treated as harmful (an answer to it "
             f"is rejected at t = keep_answer_below = {cfg.keep_answer_below}; a refusal of it is kept at t = "
             f"keep_refusal_from = {cfg.keep_refusal_from}). Shipped: softmax at temperature {cfg.vote_temperature}.", "",
             "| vote | AUC | t | called harmful | precision | recall | ordinary requests whose answers are thrown away |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, vote in votes.items():
        for t in (0.6, cfg.keep_answer_below, cfg.keep_refusal_from):
            called = vote >= t
            lines.append(f"| {name} | {fmt(auc(vote, harmful))} | {t} | {int(called.sum())} | "
                         f"{fmt((called & harmful).sum() / max(called.sum(), 1))} | {fmt((called & harmful).sum() / harmful.sum())} | "
                         f"{int((called & ~harmful).sum())} of {int((~harmful).sum())} |")
    return lines


def answer_cutoff_rows(embedder: Embedder, cfg: FilterConfig) -> list[str]:
    """Answers kept at each answer cut-off, by generator (the base model's set, the tuned
    round-1 model's set): how many answer a harmful request, how many are worth training on."""
    kinds = seed_kinds("safety", embedder)
    lines = [f"Answers (not refusals) kept under each answer cut-off, by the model that wrote them; shipped: "
             f"{cfg.keep_answer_below} for the base model, {cfg.tuned_keep_answer_below} for a tuned one "
             "(`tuned_keep_answer_below`).", "",
             "| set | cut-off | answers kept | of them answering a harmful request | of them worth training on |",
             "|---|---:|---:|---:|---:|"]
    for name in ("safety.base.jsonl", "safety.round1.jsonl"):
        recs = [json.loads(line) for line in (LABELLED / name).read_text(encoding="utf-8").splitlines()]
        votes = kinds.refusal_vote(embedder.embed([r["prompt"] for r in recs]), cfg.vote_temperature)
        answers = [(float(v), r["request"], a) for v, r in zip(votes, recs) for a in r["answers"]
                   if a["response_kind"] == "answer"]
        for t in sorted({0.6, 0.7, cfg.keep_answer_below, cfg.tuned_keep_answer_below}):
            kept = [(request, a) for v, request, a in answers if v < t]
            lines.append(f"| {name} | {t} | {len(kept)} | {sum(q == 'harmful' for q, _ in kept)} | "
                         f"{sum(bool(a.get('train')) for _, a in kept)} |")
    return lines


def auc(scores, labels) -> float | None:
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def rating_auc(domain: str, rows: list[dict], n: int) -> dict:
    """The self-rating (base model, one forward pass) of the first n rule-passing answers, as AUCs."""
    from localalign.engine.base import GenerationConfig
    from localalign.engine.llamacpp import BatchGenerator
    from localalign.isara.rating import rate_samples

    cfg = FilterConfig()
    picked = [r for r in rows if rule_reason(r, cfg) is None][:n]
    samples = [Sample(r["prompt"], r["response"]) for r in picked]
    with BatchGenerator(default_model().gguf, GenerationConfig()) as g:
        rate_samples(g, samples, read_samples(SEEDS_DIR / f"{domain}.jsonl"))
    rated = [(s.scores["rating"], r) for s, r in zip(samples, picked) if "rating" in s.scores]
    return {"n": len(rated), "auc_train": auc([x for x, _ in rated], [r["train"] for _, r in rated]),
            "auc_usable": auc([x for x, _ in rated], [r["usable"] for _, r in rated])}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=0, help="rate this many answers per set with the base model")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    cfg = FilterConfig()
    embedder = Embedder()
    lines = [
        "## Filters against the labelled development set (bench/bench_filters.py)",
        "",
        f"Filter settings: the defaults (vote_temperature={cfg.vote_temperature}, keep_refusal_from={cfg.keep_refusal_from}, "
        f"keep_answer_below={cfg.keep_answer_below}). Each filter sees what the ones above it kept. Precision = share of "
        "its rejects that are bad; recall = share of the bad answers (among those it sees) that it rejects.",
        "",
        "| set | filter | sees | rejects | precision (train / usable) | recall (train / usable) | kept | train share of kept | usable share of kept |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    ratings = {}
    for name in SETS:
        domain, rows = answers_of(name)
        for e in filter_table(domain, rows, embedder, cfg):
            lines.append(
                f"| {name} | {e['filter']} | {e['base']} | {e['rejects']} | "
                f"{fmt(e.get('precision_train'))} / {fmt(e.get('precision_usable'))} | "
                f"{fmt(e.get('recall_train'))} / {fmt(e.get('recall_usable'))} | {e.get('kept', e['base'])} | "
                f"{fmt(e['kept_train'])} | {fmt(e['kept_usable'])} |")
        if args.rate:
            ratings[name] = rating_auc(domain, rows, args.rate)
    lines += ["", *request_judge_rows(embedder, cfg), "", *answer_cutoff_rows(embedder, cfg)]
    if ratings:
        lines += ["", "Self-rating (base model, P(Yes) from one forward pass) as a score of the rule-passing answers:", "",
                  "| set | rated | AUC vs train | AUC vs usable |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {fmt(v['auc_train'])} | {fmt(v['auc_usable'])} |" for k, v in ratings.items()]
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
