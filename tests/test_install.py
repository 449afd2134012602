"""The installed tool (a wheel in a fresh venv, run from a directory outside the checkout): the
seeds and the registry come from its package data, models go to its home, and the commands work,
a tiny align included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localalign.paths import EVAL_DATA_DIR, REGISTRY_PATH, SEEDS_DIR
from localalign.samples import read_samples

pytestmark = pytest.mark.slow


def where(tool, **env) -> dict:
    code = ("import json, localalign, localalign.paths as p; print(json.dumps({'package': localalign.__file__, "
            "'seeds': str(p.SEEDS_DIR), 'eval': str(p.EVAL_DATA_DIR), 'registry': str(p.REGISTRY_PATH), 'origin': p.HOME_ORIGIN, "
            "'models': str(p.MODELS_DIR), 'cache': str(p.CACHE_DIR)}))")
    r = tool.run(str(tool.python), "-c", code, **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_installed_package_reads_its_own_data_and_keeps_models_in_its_home(installed_tool):
    tool = installed_tool
    found = where(tool)
    site = Path(found["package"]).parent.parent
    assert site.is_relative_to(tool.venv)  # the wheel's copy, not this checkout
    assert Path(found["seeds"]) == site / "localalign" / "data" / "seeds"
    assert Path(found["registry"]).read_bytes() == REGISTRY_PATH.read_bytes()
    for f in SEEDS_DIR.glob("*.jsonl"):
        assert (Path(found["seeds"]) / f.name).read_bytes() == f.read_bytes()
    # the evaluation-only sets too (the contrast pairs), each with its README
    assert Path(found["eval"]) == site / "localalign" / "data" / "eval"
    shipped = [f for f in EVAL_DATA_DIR.iterdir() if f.is_file()]
    assert {"README.md", "contrast.jsonl"} <= {f.name for f in shipped}
    for f in shipped:
        assert (Path(found["eval"]) / f.name).read_bytes() == f.read_bytes()
    assert (found["origin"], found["models"], found["cache"]) == \
        ("LOCALALIGN_HOME", str(tool.home / "models"), str(tool.home / "cache"))
    # no LOCALALIGN_HOME and no checkout: the platform's user cache directory
    xdg = tool.workdir / "xdg-cache"
    found = where(tool, LOCALALIGN_HOME="", XDG_CACHE_HOME=str(xdg))
    assert (found["origin"], found["models"]) == ("user cache", str(xdg / "localalign" / "models"))


def test_models_list_align_help_and_doctor_from_any_directory(installed_tool):
    tool = installed_tool
    r = tool.run(str(tool.cli), "models", "list")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout and "all-minilm-l6-v2" in r.stdout
    assert "localalign models pull smollm2-135m-instruct" in r.stdout or "not installed" in r.stdout  # its home is empty
    r = tool.run(str(tool.cli), "align", "--help")
    assert r.returncode == 0 and "--domain" in r.stdout and "--quiet" in r.stdout
    r = tool.run(str(tool.cli), "doctor", timeout=300)
    assert r.returncode in (0, 1), r.stderr
    assert f"models in {tool.home / 'models'}" in r.stdout.replace("\n" + " " * 21, " ")


def test_a_tiny_align_runs_from_the_installed_tool(installed_tiny_run, installed_tool):
    run_dir, r = installed_tiny_run
    assert installed_tool.workdir / r.stdout.strip() == run_dir / "final.gguf"
    assert (run_dir / "final.gguf").exists() and (run_dir / "report.html").exists()
    # the seeds it generated from are the package's
    pool = read_samples(run_dir / "round-1" / "index" / "samples.jsonl")
    assert [s.prompt for s in pool if s.source == "seed"] == [s.prompt for s in read_samples(SEEDS_DIR / "safety.jsonl")]
    # no progress bars in a log; the one-line summaries instead
    assert "round-1/generate: accepted 4/4" in r.stderr and "train: " in r.stderr and "\r" not in r.stderr
    shown = installed_tool.run(str(installed_tool.cli), "runs", "show", "run")
    assert shown.returncode == 0 and f"report:      {(run_dir / 'report.html').resolve()}" in shown.stdout
