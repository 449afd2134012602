"""bench/bench_gpu.py without a GPU: its pure pieces, its one-line refusal on a machine without
CUDA, and its dry run (`--device cpu --tiny`), which runs every worker on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_busy_time_is_the_union_of_kernel_intervals(bench):
    assert bench.busy_seconds([]) == 0
    assert bench.busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4  # overlapping streams count once
    assert bench.busy_seconds([(5, 6), (0, 10)]) == 10


def test_steady_rate_leaves_out_the_first_steps(bench):
    log = [{"step": i, "tokens": 100, "seconds": 10.0 if i < 4 else 1.0} for i in range(1, 7)]
    assert bench.steady_rate(log) == pytest.approx(100.0)
    assert bench.steady_rate(log[:3]) is None


def test_the_dry_run_takes_small_settings_unless_given(bench):
    args = bench.parse_args(["--device", "cpu", "--tiny", "--samples", "40"])
    assert (args.samples, args.epochs, args.widths, args.eval_limit) == (40, 1, "2,4,auto,auto+fa", 2)
    full = bench.parse_args([])
    assert (full.device, full.samples, full.epochs, full.profile_steps) == ("cuda", 256, 3, "8:12")
    with pytest.raises(ValueError):
        bench.profile_window("3:2")


def test_sweep_settings_and_parts_are_checked_before_anything_runs(bench):
    assert bench.width_setting("64") == (64, False)
    assert bench.width_setting("auto+fa") == ("auto", True)
    for bad in ("auto+xx", "wide", "-3"):
        with pytest.raises(ValueError):
            bench.width_setting(bad)
    assert bench.parse_args([]).parts == ("train", "gen")
    assert bench.parse_args(["--round"]).parts == ("train", "gen", "round")
    assert bench.parse_args(["--parts", "gen,round"]).parts == ("gen", "round")
    assert bench.parse_args(["--parts", ""]).parts == ()  # measure nothing: report --results
    for bad in (["--parts", "train,eval"], ["--widths", "32,auto+x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_the_shape_it_builds_from_is_the_default_models(bench):
    import json

    config = json.loads((bench.SHAPE_DIR / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert all((bench.SHAPE_DIR / name).exists() for name in bench.SHAPE_FILES)


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_without_cuda_it_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run()
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.count("\n") <= 1
    assert "sees no CUDA GPU" in proc.stderr and "--device cpu --tiny" in proc.stderr


@pytest.mark.slow
def test_a_dry_run_exercises_every_path_and_leaves_the_docs_alone():
    docs = [(REPO / "docs" / n).read_text() for n in ("benchmarks.md", "scaling.md")]
    proc = run("--device", "cpu", "--tiny", "--round", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "a dry run on a CPU" in out
    assert "| localalign `train`, defaults" in out and "| transformers.Trainer + peft" in out
    assert "Largest CPU costs over 2 profiled steps" in out
    assert "| auto | 32 |" in out  # parallel="auto" on a CPU
    for stage in ("generation", "training", "export", "evaluation"):
        assert f"| {stage} |" in out
    assert "docs/ left alone (a dry run)" in proc.stderr
    assert docs == [(REPO / "docs" / n).read_text() for n in ("benchmarks.md", "scaling.md")]


@pytest.mark.slow
def test_a_run_in_parts_keeps_each_measurement_and_reports_them_together(tmp_path):
    results = tmp_path / "r.json"
    first = run("--device", "cpu", "--tiny", "--threads", "1", "--parts", "train", "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.loads(results.read_text())
    assert {"ours", "hf", "ours_profile", "hf_profile"} <= set(saved) and "gen" not in saved
    assert "Generation sweep: not measured yet." in first.stdout
    again = run("--device", "cpu", "--tiny", "--threads", "1", "--parts", "", "--results", str(results))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| localalign `train`, defaults" in again.stdout  # from the file: nothing was measured this time
    assert "--parts train" in again.stdout and "then `python bench/bench_gpu.py --device cpu --tiny --threads 1 --parts '' " in again.stdout
    assert len(json.loads(results.read_text())["runs"]) == 1  # a call that measures nothing writes nothing back


def test_a_report_from_nothing_or_from_a_bad_results_file_is_one_line(tmp_path):
    nothing = run("--device", "cpu", "--tiny", "--parts", "", timeout=120)
    assert nothing.returncode == 1 and nothing.stderr.count("\n") <= 1
    assert "measures nothing" in nothing.stderr and "--results" in nothing.stderr
    for text in ("{not json", '{"ours": 1}'):
        bad = tmp_path / "r.json"
        bad.write_text(text)
        proc = run("--device", "cpu", "--tiny", "--parts", "", "--results", str(bad), timeout=120)
        assert proc.returncode == 1 and proc.stderr.count("\n") <= 1, proc.stderr
        assert "is not a results file of this script" in proc.stderr
        assert bad.read_text() == text  # left as it was


def test_a_worker_killed_by_a_signal_is_named_and_keeps_what_it_finished(bench, monkeypatch):
    def killed_after_one_width(cmd, **kw):
        settings = json.loads(cmd[cmd.index("--worker-args") + 1])
        Path(settings["progress"]).write_text(json.dumps({"rows": [{"setting": "32"}], "prompts": 8}))

        class Killed:
            returncode, stdout, stderr = -11, "", "ggml_cuda_init: found 1 CUDA devices"

        return Killed()

    monkeypatch.setattr(bench.subprocess, "run", killed_after_one_width)
    result = bench.run_worker("gen", bench.parse_args(["--device", "cpu", "--tiny"]))
    assert result["failed"] == "killed by SIGSEGV" and result["rows"] == [{"setting": "32"}]
    assert "ggml_cuda_init" in result["stderr"]


def test_a_worker_stopped_at_its_time_limit_keeps_the_stages_it_finished(bench, monkeypatch):
    def runs_out(cmd, **kw):
        assert kw["timeout"] == 42.0
        settings = json.loads(cmd[cmd.index("--worker-args") + 1])
        Path(settings["progress"]).write_text(json.dumps({"stages": {"generation": {"seconds": 30.0}}}))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], stderr=b"training...")

    monkeypatch.setattr(bench.subprocess, "run", runs_out)
    result = bench.run_worker("round", bench.parse_args(["--device", "cpu", "--tiny"]), timeout=42.0)
    assert result["stages"] == {"generation": {"seconds": 30.0}}
    assert result["timed_out"] == "stopped at the time limit, 42 s" and result["stderr"] == "training..."


def test_a_worker_saves_its_progress_where_it_is_told(bench, tmp_path):
    import argparse

    bench.save_progress(argparse.Namespace(progress=str(tmp_path / "p.json")), {"rows": [1]})
    assert json.loads((tmp_path / "p.json").read_text()) == {"rows": [1]}
    bench.save_progress(argparse.Namespace(), {"rows": [2]})  # no progress file asked for: nothing written
    assert json.loads((tmp_path / "p.json").read_text()) == {"rows": [1]}


def test_a_budget_must_be_positive(bench):
    assert bench.parse_args(["--budget", "90"]).budget == 90
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--budget", bad])


PARTIAL = {
    "runs": [{"command": "python bench/bench_gpu.py --parts gen", "started": "2026-12-03 08:00 UTC"}],
    "ours": {"timed_out": "stopped at the time limit, 200 s", "stderr": ""},
    "gen": {"rows": [{"setting": "32", "parallel": 32, "tokens": 3200, "seconds": 1.6},
                     {"setting": "auto", "parallel": 255, "tokens": 3200, "seconds": 0.4}],
            "prompts": 50, "timed_out": "stopped at the time limit, 60 s", "stderr": ""},
    "round": {"stages": {"generation": {"seconds": 21.5, "candidates": 360, "prompts": 90, "parallel": 255,
                                        "read": 9000, "written": 70000},
                         "training": {"seconds": 30.2, "samples": 316, "epochs": 3, "steps": 119,
                                      "tokens_per_s": 5000.0}},
              "failed": "killed by SIGSEGV", "stderr": ""},
}


def test_a_report_of_parts_that_ran_out_of_time_says_what_was_and_was_not_measured(bench):
    args = bench.parse_args(["--device", "cpu", "--tiny", "--widths", "32,auto,auto+fa,64"])
    text = bench.report(args, PARTIAL)
    assert "Training: ours stopped at the time limit, 200 s; transformers.Trainer not measured yet." in text
    assert "| auto | 255 | 3200 | 0.40 | 8000 | 4.00x |" in text and "**4.00x** (target: at least 3x)" in text
    assert "The sweep ended early (stopped at the time limit, 60 s): auto+fa, 64 not measured." in text
    round_text = bench.round_section(args, PARTIAL)
    assert "| generation | 21.5 | 360 candidates from 90 few-shot prompts, 255 sequences" in round_text
    assert "| export | - | not reached |" in round_text and "| evaluation | - | not reached |" in round_text
    assert "| **the round** | - | failed (killed by SIGSEGV), after 52 s of the stages above" in round_text


def test_a_spent_budget_skips_each_measurement_and_says_so(tmp_path):
    results = tmp_path / "r.json"
    proc = run("--device", "cpu", "--tiny", "--threads", "1", "--parts", "train", "--budget", "0.001",
               "--results", str(results), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(results.read_text())
    for key in ("ours", "hf", "ours_profile", "hf_profile"):
        assert saved[key] == {"skipped": "out of time: this call's --budget of 0.001 s was spent before it began"}
    assert "Training: ours out of time" in proc.stdout


# --------------------------------------------------------------------------- bench/gpu_session.sh

SESSION = REPO / "bench" / "gpu_session.sh"


def session(tmp_path: Path, *args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    """The session script with its state, venv and files under tmp_path."""
    settings = {"OUT": str(tmp_path / "out"), "STATE": str(tmp_path / "state"), "VENV": str(tmp_path / "venv"),
                "CARRY": str(tmp_path / "carry"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SESSION), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **settings}, cwd=REPO)


def test_the_session_takes_no_argument_but_prepare(tmp_path):
    proc = session(tmp_path, "--round")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "takes no argument but 'prepare', got '--round'" in proc.stderr


def test_the_session_stops_in_one_line_without_a_gpu_or_without_its_carried_source(tmp_path):
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = session(tmp_path)
    assert proc.returncode == 1 and "error: no nvidia-smi here" in proc.stdout
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 580.159.04, 143771 MiB'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = session(tmp_path, PATH=f"{fake}:{os.environ['PATH']}")
    assert proc.returncode == 1
    assert "has no llama_cpp_python-0.3.36.tar.gz: run 'bash bench/gpu_session.sh prepare'" in proc.stdout
    assert not (tmp_path / "venv").exists()  # stopped before it made anything


@pytest.mark.slow
def test_a_dry_session_makes_its_venv_measures_within_its_budget_and_reports(tmp_path):
    """DEVICE=cpu: the session's own steps (the venv over this Python's packages, a part under its
    budget, doctor, the report and the files it returns) with bench_gpu's dry run, the sweep alone."""
    proc = session(tmp_path, DEVICE="cpu", PARTS="gen", SESSION_SECONDS="300", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"session.log", "doctor.txt", "results.json", "report.md",
                                               "benchmarks.md", "scaling.md"}
    log = (out / "session.log").read_text()
    assert "bench_gpu --parts gen, at most 75 s" in log and "the gen part ended with exit code 0" in log
    assert "--budget 75" in (out / "report.md").read_text() and "| auto | 32 |" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert [row["setting"] for row in results["gen"]["rows"]] == ["2", "4", "auto", "auto+fa"]
    assert "--parts train" not in log and "--parts round" not in log  # PARTS chose the parts
    venv_python = tmp_path / "venv" / "bin" / "python"
    check = subprocess.run([str(venv_python), "-c", "import sys, torch; print(sys.prefix)"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == str(tmp_path / "venv")  # this Python's torch, seen from the venv
