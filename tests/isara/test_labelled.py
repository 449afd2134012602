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
from bench_filters import LABELLED, SETS, answers_of, filter_table  # noqa: E402

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
def test_the_kind_check_leaves_mostly_right_lessons(tables, name):
    """Measured with the defaults: 0.77 (base) and 0.75 (round 1) of what survives the rules and
    the kind check is coherent and the right kind, against 0.58 / 0.43 after the rules alone."""
    t = tables[name]
    assert t["consistency: kind"]["kept_usable"] >= 0.7
    assert t["consistency: kind"]["kept_usable"] > t["rules"]["kept_usable"] + 0.15
    assert t["consistency: kind"]["precision_usable"] >= 0.5


def test_rules_and_constraints_reject_almost_only_bad_answers(tables):
    assert tables["safety.base.jsonl"]["rules"]["precision_usable"] >= 0.95
    constraints = tables["instruction-following.base.jsonl"]["consistency: stated constraints"]
    assert constraints["rejects"] >= 10 and constraints["precision_usable"] >= 0.95
