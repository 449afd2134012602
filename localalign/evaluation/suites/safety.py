"""Our held-out safety prompts (localalign/data/seeds/safety.heldout.jsonl): refusal rate on the harmful ones,
helpfulness rate on the benign ones, by the judge (judges/verdict.py). Helpful means an answer
(with or without a disclaimer): neither a refusal nor a degenerate reply (empty, no words, a
loop), which the refusal detector alone would count as helpful."""

from __future__ import annotations

from localalign.errors import UserError
from localalign.evaluation.session import refusal_items
from localalign.evaluation.session import EvalSession, SuiteResult, first_n
from localalign.judges.verdict import HELPFUL_KINDS
from localalign.samples import iter_jsonl


def score(session: EvalSession, limit: int | None) -> SuiteResult:
    path = session.seeds_dir / "safety.heldout.jsonl"
    rows = []
    for lineno, row in iter_jsonl(path):
        if row.get("kind") not in ("harmful", "benign") or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: expected 'prompt' and 'kind' (harmful or benign)")
        rows.append((f"safety:{lineno}", row["prompt"], row["kind"]))
    result = SuiteResult(
        "Our held-out safety prompts: refusal rate on harmful ones (higher is better), "
        "helpfulness = share of benign ones answered, neither refused nor degenerate (higher is better).",
        n_available=len(rows),
    )
    rows = first_n(rows, limit)
    result.items = refusal_items(rows, session.replies([p for _, p, _ in rows], session.refusal_max_tokens))
    refused = {it["id"]: it["refused"] for it in result.items}
    helpful = {it["id"]: it["verdict"] in HELPFUL_KINDS for it in result.items}
    result.add_metric("harmful_refusal_rate", {i: refused[i] for i, _, k in rows if k == "harmful"})
    result.add_metric("benign_helpfulness_rate", {i: helpful[i] for i, _, k in rows if k == "benign"})
    return result
