"""Our held-out instruction-following prompts (localalign/data/seeds/instruction-following.heldout.jsonl), each
with machine-checked constraints: the share of prompts whose constraints are all met, and of
single constraints met. The checker is localalign.judges.constraints.
"""

from __future__ import annotations

from localalign.errors import UserError
from localalign.evaluation.session import EvalSession, SuiteResult, first_n
from localalign.judges.constraints import check_constraint, validate_constraint
from localalign.samples import iter_jsonl


def score(session: EvalSession, limit: int | None) -> SuiteResult:
    path = session.seeds_dir / "instruction-following.heldout.jsonl"
    rows = []
    for lineno, row in iter_jsonl(path):
        cons = row.get("constraints")
        if not isinstance(row.get("prompt"), str) or not isinstance(cons, list) or not cons:
            raise UserError(f"{path}:{lineno}: expected 'prompt' and a non-empty 'constraints' list")
        rows.append((f"if:{lineno}", row["prompt"], [validate_constraint(c, f"{path}:{lineno}") for c in cons]))
    result = SuiteResult(
        "Our held-out instruction-following prompts with machine-checked constraints "
        "(localalign/data/seeds/README.md): prompts with every constraint met, and single constraints met.",
        n_available=len(rows),
    )
    rows = first_n(rows, limit)
    replies = session.replies([p for _, p, _ in rows], session.max_tokens)
    prompt_ok, constraint_ok = {}, {}
    for (item_id, prompt, cons), reply in zip(rows, replies):
        passed = [check_constraint(reply, c) for c in cons]
        prompt_ok[item_id] = all(passed)
        constraint_ok.update({f"{item_id}#{j}": ok for j, ok in enumerate(passed)})
        result.items.append({"id": item_id, "prompt": prompt, "reply": reply, "constraints": cons, "passed": passed})
    result.add_metric("prompt_pass_rate", prompt_ok)
    result.add_metric("constraint_pass_rate", constraint_ok)
    return result
