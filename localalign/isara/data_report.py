"""What a round's accepted data teaches, measured against the seeds (the only labels there are).

- kind_agreement: the share of accepted pairs whose response kind (refusal or answer, by the
  refusal detector) is the kind the seeds' vote gives their prompt (the filter's softmax
  vote at `temperature`, majority). Meaningful where the seeds hold both kinds (safety).
- refusals: the share of accepted responses that refuse.
- constraints_met: of the accepted pairs whose prompt states constraints the reader
  recognises (judges/constraints.py), the share whose response meets all of them (`n` says how
  many had any). Meaningful for instruction-following.
- seed_agreement: of the accepted pairs whose prompt is close to a seed's (cosine >=
  `NEAR_PROMPT`), the share whose response is close to that seed's response (cosine >=
  `NEAR_RESPONSE`): a weak check that a truthfulness answer says what the seed says, when the
  question is nearly the seed's.

Each figure comes with its n, so a share of 2 pairs is not read as a share of 200.
"""

from __future__ import annotations

import numpy as np

from localalign.isara.consistency import SeedKinds
from localalign.isara.retrieve import Embedder
from localalign.judges.constraints import check_constraint, constraints_in_prompt
from localalign.judges.refusal import is_refusal
from localalign.samples import Sample

NEAR_PROMPT = 0.7
NEAR_RESPONSE = 0.6


def _share(hits: int, n: int) -> dict:
    return {"value": round(hits / n, 4) if n else None, "n": n}


def data_report(accepted: list[Sample], seeds: list[Sample], embedder: Embedder, temperature: float) -> dict:
    """The figures of the module docstring for one round's accepted samples."""
    if not accepted:
        return {"accepted": 0}
    kinds = SeedKinds.of(seeds, embedder.embed([s.prompt for s in seeds]), embedder.embed([s.response for s in seeds]))
    prompts = embedder.embed([s.prompt for s in accepted])
    responses = embedder.embed([s.response for s in accepted])
    refused = np.array([is_refusal(s.response) for s in accepted])
    report = {"accepted": len(accepted), "refusals": _share(int(refused.sum()), len(accepted))}
    if kinds.refuses.any() and not kinds.refuses.all():
        expect_refusal = kinds.refusal_vote(prompts, temperature) >= 0.5
        report["kind_agreement"] = _share(int((expect_refusal == refused).sum()), len(accepted))
    stated = [(s, constraints_in_prompt(s.prompt)) for s in accepted]
    stated = [(s, cs) for s, cs in stated if cs]
    report["constraints_met"] = _share(sum(all(check_constraint(s.response, c) for c in cs) for s, cs in stated), len(stated))
    sims = prompts @ kinds.prompt_vectors.T
    nearest = sims.argmax(axis=1)
    near = sims.max(axis=1) >= NEAR_PROMPT
    agree = (responses * kinds.response_vectors[nearest]).sum(axis=1) >= NEAR_RESPONSE
    report["seed_agreement"] = _share(int((agree & near).sum()), int(near.sum()))
    return report


def format_share(record: dict | None) -> str:
    if not record or record.get("value") is None:
        return "n/a"
    return f"{record['value']:.2f} (n={record['n']})"
