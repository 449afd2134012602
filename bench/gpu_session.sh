#!/usr/bin/env bash
# Issue 27's GPU measurements in one device call of at most 8 minutes, on a fresh H100/H200
# machine that reaches no network. Two steps:
#
#   bash bench/gpu_session.sh prepare    # here, where PyPI is reachable: fills .gpu-carry/ (about 25 MB)
#   bash bench/gpu_session.sh            # there, as one call: run(command="bash bench/gpu_session.sh",
#                                        #   carry=[".gpu-carry"], timeout_s=480)
#
# What it assumes the GPU machine has (this workplace's CUDA image): nvidia-smi and a GPU; a
# `python3` whose environment holds torch with CUDA, accelerate, tokenizers, safetensors,
# huggingface-hub, numpy, jinja2, click, scikit-build-core, pathspec and packaging; CMake (3.21+)
# and ninja; nvcc on PATH or under CUDA_HOME (default /usr/local/cuda); 16 cores. What it does not
# find there comes from .gpu-carry/wheels: our pins of transformers, peft, gguf and platformdirs,
# llama-cpp-python's diskcache, and llama-cpp-python's source trimmed to what a CUDA build reads.
#
# The plan, every part against the clock (SESSION_SECONDS from the start, 450 by default, so that
# a 480-second call ends with its files written):
#   1. a venv (.venv-gpu) over python3's packages, our wheels installed into it, offline;
#   2. llama-cpp-python built with CUDA in the background (`python -m localalign.engine.build
#      install`: CMAKE_CUDA_ARCHITECTURES from nvidia-smi, e.g. 90-real, pip's isolation off, the
#      source from .gpu-carry), at nice 19, while
#   3. bench_gpu's training part runs (ours against transformers.Trainer, with profiles);
#   4. once llama.cpp is in: the generation sweep (32 sequences up to 255 with parallel="auto",
#      flash attention off and on), `localalign doctor` (which CUDA libraries llama.cpp and torch
#      each map), then a whole 256-sample round by stage with the time that is left;
#   5. the report from everything measured, which rewrites docs/benchmarks.md ("One GPU") and
#      docs/scaling.md (the round).
# Every bench_gpu part has a hard --budget and saves each measurement (each width, each stage of
# the round) as it ends: what was measured comes back when a part runs out of time or crashes.
# Back in $OUT (8 files): session.log, build.log.gz, llama-build.json, doctor.txt, results.json,
# report.md, benchmarks.md, scaling.md.
#
# A second call straight after, while the machine is warm (30 s), finds the venv with llama.cpp
# built and adds to the same results, e.g. the round alone with the whole time:
#   run(command="PARTS=round SESSION_SECONDS=200 bash bench/gpu_session.sh", carry=[".gpu-carry"], timeout_s=230)
#
# Settings (environment): SESSION_SECONDS; PARTS (train,gen,round); PYTHON (python3); CARRY
# (.gpu-carry); OUT (set by the device machine); STATE and VENV (in the checkout's ignored folders);
# DEVICE=cpu runs the same plan on a CPU as a dry run (bench_gpu --device cpu --tiny, no build:
# PYTHON must import llama_cpp), which is how the tests run it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

LLAMA_VERSION=$(sed -n 's/^LLAMA_CPP_VERSION = "\([0-9.]*\)".*/\1/p' localalign/engine/build.py)
# llama-cpp-python's own runtime requirement that the image lacks (its import needs it).
DISKCACHE=diskcache==5.6.3
CARRY=${CARRY:-.gpu-carry}
case $CARRY in /*) ;; *) CARRY=$REPO/$CARRY ;; esac

# --------------------------------------------------------------------------- prepare (here)

# What the device machine's image lacks of our pins (pyproject.toml), or has at another version.
carried_pins() {
    python3 - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wanted = ("transformers", "peft", "gguf", "platformdirs")
print(" ".join(d for d in deps if re.split(r"[=<>]", d)[0] in wanted))
EOF
}

# The source without what a CUDA build on Linux never reads: git history, documentation, test
# models, examples and tools (off unless llama.cpp is built alone), the other backends (each
# added only when its GGML_<NAME> is on). The converters stay (the export uses them).
trim_sdist() {  # $1: the source distribution, $2: where the trimmed one goes
    local tmp root v
    tmp=$(mktemp -d)
    tar -xzf "$1" -C "$tmp" || return 1
    root="$tmp/llama_cpp_python-$LLAMA_VERSION"
    v="$root/vendor/llama.cpp"
    rm -rf "$root"/{.git,.github,docker,docs,examples,tests} \
        "$v"/{.git,.github,models,docs,media,tests,benches,examples,pocs,tools,app,scripts,ci,skills}
    for backend in blas cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; do
        rm -rf "$v/ggml/src/ggml-$backend"
    done
    tar -czf "$2" -C "$tmp" "llama_cpp_python-$LLAMA_VERSION" && rm -rf "$tmp"
}

prepare() {
    local wheels="$CARRY/wheels" sdist tmp
    mkdir -p "$wheels"
    # shellcheck disable=SC2046
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$wheels" $(carried_pins) "$DISKCACHE" || { echo "error: pip could not download the wheels" >&2; return 1; }
    sdist=$(ls "${LOCALALIGN_WHEELHOUSE:-$HOME/.cache/localalign/wheels}"/llama-cpp-python-"$LLAMA_VERSION"-sdist/*.tar.gz 2>/dev/null | head -1)
    if [ -z "$sdist" ]; then
        tmp=$(mktemp -d)
        python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp" ||
            { echo "error: pip could not download llama-cpp-python's source" >&2; return 1; }
        sdist=$(ls "$tmp"/*.tar.gz)
    fi
    trim_sdist "$sdist" "$wheels/llama_cpp_python-$LLAMA_VERSION.tar.gz" || { echo "error: could not trim $sdist" >&2; return 1; }
    ls -l "$wheels"
    du -sh "$CARRY"
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit
elif [ -n "${1:-}" ]; then
    echo "error: bench/gpu_session.sh takes no argument but 'prepare', got '$1'" >&2
    exit 2
fi

# --------------------------------------------------------------------------- the session (there)

T0=$(date +%s)
SESSION_SECONDS=${SESSION_SECONDS:-450}
END=$((T0 + SESSION_SECONDS))
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS-train,gen,round}  # "" runs none: the venv, the build, doctor and the report alone
OUT=${OUT:-$REPO/bench/out/gpu-session}
# Kept in the checkout's ignored folders, not in $OUT (emptied before each call): a second call on
# the still-warm machine finds the venv with llama.cpp built (the build step returns at once) and
# adds to the same results.
STATE=${STATE:-$REPO/bench/out/gpu-session-state}
VENV=${VENV:-$REPO/.venv-gpu}
PY=$VENV/bin/python
RESULTS=$STATE/results.json
LOG=$OUT/session.log
# Seconds kept for the last report; the least worth starting a part with; the most the training
# part and the sweep are given (training took about 150 s beside the build on the H200, the
# sweep below about 45 s); the least the sweep is left by the build's deadline.
REPORT_RESERVE=25 PART_MINIMUM=25 TRAIN_SECONDS=210 GEN_SECONDS=75 GEN_LEAST=45
if [ "$DEVICE" = cuda ]; then
    # 510 requests: two full waves of 255 at parallel="auto"; 64 tokens each keeps the sweep under a minute.
    BENCH=(--gen-prompts 510 --gen-tokens 64 --widths 32,auto,auto+fa,64,128)
else
    BENCH=(--device cpu --tiny --threads 1)
fi
mkdir -p "$OUT" "$STATE"
# Built wheels, and the source beside them where localalign keeps it (a copy of the carried one:
# nothing to download for the build or for llama.cpp's converters the export may take from it).
export LOCALALIGN_WHEELHOUSE=$STATE/wheels

left() { echo $((END - $(date +%s))); }
say() { echo "[gpu_session +$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
stop() { say "error: $*"; exit 1; }
logged() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

# The seconds a part may take: at most $1, and REPORT_RESERVE left for the report.
budget_for() {
    local b=$(($(left) - REPORT_RESERVE))
    [ "$b" -gt "$1" ] && b=$1
    echo "$b"
}

# One bench_gpu part under its --budget (a backstop `timeout` in case the call hangs outside a worker).
bench_part() {  # $1: the part, $2: the most it may take
    local part=$1 b
    b=$(budget_for "$2")
    if [ "$b" -lt "$PART_MINIMUM" ]; then
        say "no time left for the $part part ($b s)"
        return
    fi
    say "bench_gpu --parts $part, at most $b s"
    logged timeout --kill-after=10 $((b + 20)) env PYTHONPATH="$REPO" PYTHONUNBUFFERED=1 \
        "$PY" bench/bench_gpu.py "${BENCH[@]}" --parts "$part" --results "$RESULTS" --budget "$b" --no-docs
    say "the $part part ended with exit code $?"
}

say "start: $SESSION_SECONDS s in all, device $DEVICE, parts $PARTS, files in $OUT"
if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null || stop "no nvidia-smi here: this script is for a CUDA machine (DEVICE=cpu for a dry run)"
    logged nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
    if ! command -v nvcc >/dev/null; then
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
        export PATH=$CUDA_HOME/bin:$PATH  # CMake looks for the CUDA compiler on PATH
    fi
    logged nvcc --version
    logged cmake --version
    [ -f "$CARRY/wheels/llama_cpp_python-$LLAMA_VERSION.tar.gz" ] ||
        stop "$CARRY/wheels has no llama_cpp_python-$LLAMA_VERSION.tar.gz: run 'bash bench/gpu_session.sh prepare' where PyPI is reachable, and carry $CARRY"
    mkdir -p "$LOCALALIGN_WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION-sdist"
    cp "$CARRY/wheels/llama_cpp_python-$LLAMA_VERSION.tar.gz" "$LOCALALIGN_WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION-sdist/"
elif [ -z "${LOCALALIGN_CONVERTER:-}" ]; then
    # A dry run uses this machine's converters (make setup put them in the usual wheelhouse).
    export LOCALALIGN_CONVERTER=$HOME/.cache/localalign/wheels/llama.cpp-converter-$LLAMA_VERSION
fi

# 1. The venv: python3's own packages (torch with CUDA) seen through a .pth file, since python3 is
# itself a venv there and --system-site-packages would reach only its base interpreter's; what is
# installed into the venv comes first on sys.path.
[ -x "$PY" ] || "$PYTHON" -m venv --without-pip "$VENV" || stop "$PYTHON could not make a venv in $VENV"
SITES=$("$PYTHON" -c "import sysconfig; print(' '.join(sorted({sysconfig.get_paths()[k] for k in ('purelib', 'platlib')})))")
VSITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for site in $SITES; do echo "import site; site.addsitedir('$site')"; done > "$VSITE/_gpu_session_base.pth"
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    logged "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$CARRY"/wheels/*.whl ||
        stop "the carried wheels did not install"
fi
say "venv $VENV: $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -1)"
if [ "$DEVICE" = cuda ]; then  # llama.cpp's converters for the export, from the copied source (no download)
    logged env PYTHONPATH="$REPO" "$PY" -m localalign.engine.build converter || stop "could not extract llama.cpp's converters"
fi

# 2. The CUDA build in the background (at once where this venv has it), with a deadline that leaves
# the sweep its time.
BUILD_PID=
if [ "$DEVICE" = cuda ]; then
    limit=$(($(left) - GEN_LEAST - REPORT_RESERVE))
    [ "$limit" -ge "$PART_MINIMUM" ] || stop "SESSION_SECONDS=$SESSION_SECONDS leaves the build no time"
    say "llama-cpp-python $LLAMA_VERSION with CUDA, in the background, at most $limit s: $OUT/build.log"
    LLAMA_GPU=1 PIP_NO_INDEX=1 PIP_FIND_LINKS="$CARRY/wheels" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PYTHONPATH="$REPO" \
        nice -n 19 timeout --kill-after=10 "$limit" "$PY" -m localalign.engine.build install --python "$PY" \
        > "$OUT/build.log" 2>&1 &
    BUILD_PID=$!
fi

# 3. Training, while it builds.
wants train && bench_part train "$TRAIN_SECONDS"

# 4. Once llama.cpp is in: what CUDA libraries each side maps, the sweep, the round.
llama_ok=1
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    rc=$?
    say "the build ended with exit code $rc: $(tail -1 "$OUT/build.log")"
    [ "$rc" -eq 0 ] || llama_ok=0
    cp "$VENV/llama-build.json" "$OUT/" 2>/dev/null
    gzip -9f "$OUT/build.log"
fi
if [ "$llama_ok" = 1 ]; then
    wants gen && bench_part gen "$GEN_SECONDS"
    timeout 45 env PYTHONPATH="$REPO" "$PY" -m localalign doctor > "$OUT/doctor.txt" 2>&1
    say "localalign doctor ended with exit code $?: $(grep -E '^  [a-z]+ +(gpu|llama.cpp) ' "$OUT/doctor.txt" | cut -c1-160)"
    wants round && bench_part round "$SESSION_SECONDS"
else
    say "llama.cpp did not build: no sweep, no round (the log: $OUT/build.log.gz)"
fi

# 5. The report from everything measured (this call's and an earlier call's), and the docs it rewrote.
if [ -f "$RESULTS" ]; then
    timeout 60 env PYTHONPATH="$REPO" "$PY" bench/bench_gpu.py "${BENCH[@]}" --parts "" --results "$RESULTS" \
        > "$OUT/report.md" 2>> "$LOG"
    say "the report ended with exit code $?: $OUT/report.md"
    cp "$RESULTS" docs/benchmarks.md docs/scaling.md "$OUT/"
else
    say "nothing was measured"
fi
say "done, $(left) s to spare"
