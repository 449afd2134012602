"""The filters, held to the hand-labelled development set (tests/data/labelled/): the defaults
were chosen on it (docs/benchmarks.md), so a change that makes them worse on it fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from localalign.isara.filters import FilterConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from bench_filters import LABELLED, OLD_VOTE, SETS, SHIPPED_VOTE, answers_of, filter_table, request_votes  # noqa: E402

ALLOWED = {
    "request": {"harmful", "ordinary", "not_a_request"},
    "response_kind": {"refusal", "answer", "other"},
    "question": {"misconception", "factual", "other"},
    "answer": {"true", "partly", "false", "not_an_answer"},
    "follows": {"yes", "partly", "no", "n/a"},
}


@pytest.mark.parametrize("name", list(SETS))
def test_labelled_sets_are_well_formed(name):
    ids = set()
    for line in (LABELLED / name).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert rec["id"] not in ids and len(rec["answers"]) == 2
        ids.add(rec["id"])
        for key, allowed in ALLOWED.items():
            for holder in [rec, *rec["answers"]]:
                if key in holder:
                    assert holder[key] in allowed, (rec["id"], key, holder[key])
        for a in rec["answers"]:
            assert not a["train"] or a["coherent"], rec["id"]  # train implies coherent
    assert len(ids) >= 100


@pytest.fixture(scope="module")
def tables(embedder):
    out = {}
    for name in SETS:
        domain, rows = answers_of(name)
        out[name] = {e["filter"]: e for e in filter_table(domain, rows, embedder, FilterConfig())}
    return out


@pytest.mark.parametrize("name", ["safety.base.jsonl", "safety.round1.jsonl"])
def test_the_kind_check_rejects_mostly_wrong_lessons(tables, name):
    """Measured with the defaults: of the answers the kind check rejects, 0.74 (base) and 0.90
    (round 1) are bad; what it keeps is 0.67 / 0.71 usable, against 0.58 / 0.43 after the rules."""
    t = tables[name]
    assert t["consistency: kind"]["precision_usable"] >= 0.7
    assert t["consistency: kind"]["kept_usable"] > t["rules"]["kept_usable"] + 0.05


def test_the_seeds_vote_rarely_throws_away_an_ordinary_request(embedder):
    """The softmax vote against the plain vote it replaced, at the threshold where answers are
    rejected: measured 12 of 239 ordinary requests lost at precision 0.62 (before: 24 at 0.33)."""
    cfg = FilterConfig()
    harmful, votes = request_votes(embedder, cfg)
    called = {name: vote >= cfg.keep_answer_below for name, vote in votes.items()}
    lost = {name: (c & ~harmful).sum() / (~harmful).sum() for name, c in called.items()}
    precision = {name: (c & harmful).sum() / c.sum() for name, c in called.items()}
    assert lost[SHIPPED_VOTE] <= 0.08 and precision[SHIPPED_VOTE] >= 0.5
    assert precision[SHIPPED_VOTE] > precision[OLD_VOTE] + 0.15
    refused = votes[SHIPPED_VOTE] >= cfg.keep_refusal_from  # where a refusal is kept
    assert (refused & harmful).sum() / refused.sum() >= 0.75


def test_rules_and_constraints_reject_almost_only_bad_answers(tables):
    assert tables["safety.base.jsonl"]["rules"]["precision_usable"] >= 0.95
    constraints = tables["instruction-following.base.jsonl"]["consistency: stated constraints"]
    assert constraints["rejects"] >= 10 and constraints["precision_usable"] >= 0.95
