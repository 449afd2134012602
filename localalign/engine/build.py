"""How llama-cpp-python is built for this machine, and what the build in use contains.

llama-cpp-python ships only as source; its build compiles llama.cpp with `-march=native`,
so the result runs on the CPU family it was built on and may trap on another. Two things
went wrong with that (docs/benchmarks.md, "llama.cpp build"):

- On a Xeon with AMX (amx_tile, amx_int8), `-march=native` switches ggml's AMX kernels on
  and they die with SIGILL (`tilezero`) at the first q8_0 decode, although the CPU has the
  feature. So the build always leaves AMX out (`-mno-amx-*`; GCC lets an explicit -mno-*
  win over -march=native whatever their order). ggml's portable alternative
  (GGML_CPU_ALL_VARIANTS) is no escape: its variant list holds a `sapphirerapids` build
  with AMX_TILE/AMX_INT8 that the run-time scorer picks on exactly those CPUs.
- pip's wheel cache keys a source build by name and version only, so a native wheel built
  on one CPU is reinstalled on another (a shared home, a copied venv). So the wheel is
  built with pip's cache off, into a wheel directory of our own keyed by everything that
  decides its machine code: the CPU's model and flags, the compiler, the build flags, the
  CUDA architecture. Another CPU gets another key, and its own build.

Where `nvidia-smi` lists a GPU and a CUDA compiler is there (nvcc on PATH or under
CUDA_HOME), the build adds CUDA (`-DGGML_CUDA=on`) for the GPUs' own compute capabilities, and
runs without pip's isolated build environment, which a GPU machine without network cannot
fill; `LLAMA_GPU=0` opts out. `cuda_libraries` names the CUDA libraries a process has mapped
(doctor compares llama.cpp's with torch's: two copies of one in a process is a crash source);
`preload_torch_cuda_libraries` is the fallback where both must share a process anyway.

This module uses the standard library only: `make setup` runs it with the system Python
before the venv has anything in it (`python3 -m localalign.engine.build install ...`).
`describe` reports the build in use (.ci/run prints it, so a CI log names the machine).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_VERSION = "0.3.36"  # the pyproject.toml pin; a test checks they agree
# The multimodal library is not needed for text; leaving it out cuts about a third of the build.
BASE_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF",)
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
RECORD = "llama-build.json"  # written beside the wheel and into the venv it was installed in


# --------------------------------------------------------------------------- the machine


def cpu_info(text: str | None = None) -> tuple[str, list[str]]:
    """(model name, sorted flags) of the first CPU in /proc/cpuinfo; ("", []) where unreadable."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return platform.processor() or platform.machine(), []
    model, flags = "", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = sorted(set(value.split()))
        if model and flags:
            break
    return model, flags


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """Whether llama.cpp is built with CUDA, and the one line that says why."""

    cuda: bool
    reason: str
    arch: str | None = None  # CMAKE_CUDA_ARCHITECTURES
    gpu: str | None = None  # the GPU's name, as nvidia-smi reports it


Run = Callable[[Sequence[str]], str | None]  # a command's stdout, or None if it failed


def _run(cmd: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def find_nvcc(env: Mapping[str, str], which: Callable[[str], str | None] = shutil.which) -> str | None:
    """nvcc on PATH, else under CUDA_HOME (or CUDA_PATH)."""
    found = which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    return None


class PlanError(ValueError):
    """A build plan that cannot be made; `setting` is the LLAMA_GPU value that gets past it."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


GPU_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]


def plan_gpu(
    env: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    run: Run = _run,
) -> GpuPlan:
    """CUDA where a GPU is seen and nvcc is there; LLAMA_GPU=0 opts out, LLAMA_GPU=1 insists."""
    wanted = env.get("LLAMA_GPU", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "0", "1"):
        raise PlanError(f"LLAMA_GPU must be auto, 0 or 1, got {wanted!r}", "LLAMA_GPU=auto")
    if wanted == "0":
        return GpuPlan(False, "LLAMA_GPU=0: llama.cpp is built for the CPU only")
    gpus = list_gpus(run) if which("nvidia-smi") else []
    if not gpus:
        if wanted == "1":
            raise PlanError("LLAMA_GPU=1, but nvidia-smi lists no GPU", "LLAMA_GPU=auto")
        return GpuPlan(False, "no NVIDIA GPU seen (nvidia-smi): llama.cpp is built for the CPU")
    name = " + ".join(dict.fromkeys(gpu for gpu, _ in gpus))
    nvcc = find_nvcc(env, which)
    if nvcc is None:
        message = (
            f"a GPU is present ({name}) but no CUDA compiler was found (nvcc on PATH or under CUDA_HOME): "
            "generation will run on the CPU; install the CUDA toolkit and run `make setup` again, "
            "or set LLAMA_GPU=0 to build for the CPU without this note"
        )
        if wanted == "1":
            raise PlanError(message, "LLAMA_GPU=0")
        return GpuPlan(False, message, gpu=name)
    arch = cuda_architectures(gpus)
    return GpuPlan(True, f"CUDA build for {name} (CMAKE_CUDA_ARCHITECTURES={arch}) with {nvcc}", arch, name)


def list_gpus(run: Run = _run) -> list[tuple[str, str]]:
    """(name, compute capability as nvidia-smi prints it, e.g. "9.0") of each GPU; a driver too old
    for the compute_cap field still lists the names, with an empty capability."""
    listing = run(GPU_QUERY)
    if listing is None:
        names = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or ""
        return [(line.strip(), "") for line in names.splitlines() if line.strip()]
    rows = [line.rsplit(",", 1) if "," in line else [line, ""] for line in listing.splitlines() if line.strip()]
    return [(gpu.strip(), cap.strip()) for gpu, cap in rows]


def cuda_architectures(gpus: Sequence[tuple[str, str]]) -> str:
    """CMAKE_CUDA_ARCHITECTURES for these GPUs: each distinct compute capability as real machine
    code ("90-real", "86-real;90-real"). Not "native": that asks CMake to detect the GPUs at
    build time, which needs one visible to the build and a CMake that detects it; and no PTX
    (plain "90"), which only a GPU newer than all of these would use."""
    caps = set()
    for gpu, cap in gpus:
        if not re.fullmatch(r"\d+\.\d", cap):
            raise PlanError(
                f"nvidia-smi lists {gpu} without a compute capability ({cap or 'none'}), so the CUDA "
                "architecture to build for is unknown: update the NVIDIA driver (newer ones report it), "
                "or set LLAMA_GPU=0 to build llama.cpp for the CPU", "LLAMA_GPU=0")
        caps.add(int(cap.replace(".", "")))
    return ";".join(f"{cap}-real" for cap in sorted(caps))


def cmake_version(run: Run = _run) -> tuple[int, ...]:
    out = run(["cmake", "--version"]) or ""
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# --------------------------------------------------------------------------- the build


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything that decides the machine code of a llama-cpp-python wheel."""

    version: str
    cpu_model: str
    cpu_flags: tuple[str, ...]
    compiler: str
    python: str  # e.g. cp311: the wheel's extension ABI
    cmake_args: tuple[str, ...]
    cflags: str
    cuda_arch: str | None

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda_arch else "cpu"

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{LLAMA_CPP_PYTHON}-{self.version}-{self.python}-{self.kind}-{self.key}"

    def environment(self) -> dict[str, str]:
        """What the source build is given: CMake reads CFLAGS/CXXFLAGS as its initial flags."""
        return {"CMAKE_ARGS": " ".join(self.cmake_args), "CFLAGS": self.cflags, "CXXFLAGS": self.cflags}


def build_spec(gpu: GpuPlan, python_tag: str, run: Run = _run, cpuinfo: str | None = None) -> BuildSpec:
    model, flags = cpu_info(cpuinfo)
    compiler = ((run(["cc", "--version"]) or "unknown").splitlines() or ["unknown"])[0]
    cmake_args = list(BASE_CMAKE_ARGS)
    if gpu.cuda:
        # GGML_CUDA_FA (the flash-attention kernels, much of the CUDA compile time) stays at
        # llama.cpp's default, built. On an H200 (2026-11-26) a plain CMake build with 90-real and
        # those kernels built wrote 2108 tokens/s at 32 sequences, in a process without torch; the
        # pip build with "native" that left them out segfaulted beside torch (docs/benchmarks.md,
        # "One GPU"). Which difference mattered is not known: this keeps what the working one had.
        cmake_args += ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={gpu.arch}"]
    return BuildSpec(
        version=LLAMA_CPP_VERSION,
        cpu_model=model,
        cpu_flags=tuple(flags),
        compiler=compiler,
        python=python_tag,
        cmake_args=tuple(cmake_args),
        cflags=NO_AMX_FLAGS if platform.machine() in ("x86_64", "AMD64") else "",
        cuda_arch=gpu.arch if gpu.cuda else None,
    )


def wheelhouse(env: Mapping[str, str] = os.environ) -> Path:
    """Where built wheels are kept across checkouts and venvs: one folder per BuildSpec key."""
    if env.get("LOCALALIGN_WHEELHOUSE"):
        return Path(env["LOCALALIGN_WHEELHOUSE"])
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "localalign" / "wheels"


def python_tag(python: str) -> str:
    out = _run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"])
    if not out:
        raise RuntimeError(f"{python} does not run")
    return out.strip()


def ensure_wheel(spec: BuildSpec, python: str, house: Path, log: Callable[[str], None] = print) -> Path:
    """The wheel for `spec`, built once (pip's cache off) into house/<spec.dirname>/, from the
    source distribution `ensure_sdist` keeps."""
    target = house / spec.dirname
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    if spec.kind == "cuda":
        ensure_build_requirements(python, log=log)
    sdist = ensure_sdist(python, house, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}-", dir=house))
    log(f"building {LLAMA_CPP_PYTHON}=={spec.version} from source ({spec.kind}, key {spec.key}); "
        "about 6 min on a quiet 2-core box, once per CPU type")
    t0 = time.monotonic()
    env = {**os.environ, **spec.environment()}
    cmd = wheel_command(spec, python, [str(sdist)], tmp)
    try:
        subprocess.run(cmd, env=env, check=True)
        record = {**dataclasses.asdict(spec), "kind": spec.kind, "key": spec.key, "build_seconds": round(time.monotonic() - t0, 1),
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        os.rename(tmp, target)  # whole or absent: a killed build leaves only a dot-directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built in {time.monotonic() - t0:.0f} s: {target}")
    return sorted(target.glob("llama_cpp_python-*.whl"))[0]


SDIST_DIR = f"{LLAMA_CPP_PYTHON}-{LLAMA_CPP_VERSION}-sdist"  # in the wheelhouse: the source, once per version
CONVERTER_DIR = f"llama.cpp-converter-{LLAMA_CPP_VERSION}"  # in the wheelhouse: the converters, once per version
# What the export needs of llama.cpp's source tree (vendor/llama.cpp/ in the source distribution):
# its two converters, the per-family modules they import and the gguf-py they were written with.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def ensure_sdist(python: str, house: Path, log: Callable[[str], None] = print) -> Path:
    """llama-cpp-python's source distribution, downloaded once per version into the wheelhouse
    (the wheel is built from it and the converters are taken from it)."""
    folder = house / SDIST_DIR
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[0]
    house.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SDIST_DIR}-", dir=house))
    log(f"downloading the {LLAMA_CPP_PYTHON}=={LLAMA_CPP_VERSION} source distribution (77 MB, once)")
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{LLAMA_CPP_PYTHON}=={LLAMA_CPP_VERSION}", "-d", str(tmp)]
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        if not list(tmp.glob("llama_cpp_python-*.tar.gz")):
            raise RuntimeError(f"pip download left no source distribution of {LLAMA_CPP_PYTHON} in {tmp}")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(folder.glob("llama_cpp_python-*.tar.gz"))[0]


def extract_converter(sdist: Path, out: Path) -> Path:
    """CONVERTER_FILES of the source distribution's vendor/llama.cpp/ into `out` (whole or absent)."""
    import tarfile

    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with tarfile.open(sdist) as tar:
            root = f"{LLAMA_CPP_PYTHON.replace('-', '_')}-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
            wanted = [m for m in tar.getmembers() if m.name.startswith(root)
                      and m.name[len(root):].split("/")[0] in CONVERTER_FILES and (m.isfile() or m.isdir())]
            for member in wanted:
                member.name = member.name[len(root):]
            tar.extractall(tmp, members=wanted, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def converter_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where llama.cpp's converters are: LOCALALIGN_CONVERTER if set, else the wheelhouse's copy."""
    if env.get("LOCALALIGN_CONVERTER"):
        return Path(env["LOCALALIGN_CONVERTER"])
    return wheelhouse(env) / CONVERTER_DIR


def ensure_converter(python: str, env: Mapping[str, str] = os.environ, log: Callable[[str], None] = print) -> Path:
    """llama.cpp's converters of the pinned version, kept beside the keyed wheels (CPU-independent)."""
    out = converter_dir(env)
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    path = extract_converter(ensure_sdist(python, wheelhouse(env), log), out)
    log(f"llama.cpp's converters ({LLAMA_CPP_VERSION}) in {path}")
    return path


def wheel_command(spec: BuildSpec, python: str, source: Sequence[str], out: Path) -> list[str]:
    """`pip wheel` of llama-cpp-python from `source` into `out`, pip's cache off. A CUDA build
    runs without pip's isolated build environment: pip fills that from the package index
    (scikit-build-core, and cmake whenever it judges the one on PATH unfit), which a GPU machine
    without network does not reach (docs/scaling.md); `ensure_build_requirements` puts them in
    the venv instead. The CPU build keeps its isolated environment: unchanged, it needs nothing
    in the venv."""
    isolation = ["--no-build-isolation"] if spec.kind == "cuda" else []
    return [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", *isolation, *source, "-w", str(out)]


@dataclasses.dataclass(frozen=True)
class Requirement:
    name: str
    minimum: tuple[int, ...]
    pin: str  # what is installed where it is missing: the version an isolated build resolves to today

    def __str__(self) -> str:
        return f"{self.name}>={'.'.join(map(str, self.minimum))}"


# What llama-cpp-python 0.3.36's build needs in the environment it runs in, once pip's isolated
# one is off: its pyproject's build-system.requires (scikit-build-core>=0.9.2), scikit-build-core's
# own requirements, and the cmake.minimum-version of its [tool.scikit-build] (3.21), on PATH or as
# the `cmake` package in the venv. Ninja is optional (scikit-build-core falls back to make).
BUILD_REQUIREMENTS = (
    Requirement("scikit-build-core", (0, 9, 2), "scikit-build-core==1.1.2"),
    Requirement("packaging", (23, 2), "packaging==26.4"),
    Requirement("pathspec", (0, 12, 0), "pathspec==1.1.1"),
)
CMAKE = Requirement("cmake", (3, 21), "cmake==3.31.10")
_VERSIONS_CHILD = (
    "import importlib.metadata as m, json, sys\n"
    "def v(name):\n"
    "    try:\n"
    "        return m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    "print(json.dumps({name: v(name) for name in sys.argv[1:]}))"
)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    m = re.match(r"(\d+(?:\.\d+)*)", text or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def missing_build_requirements(python: str, run: Run = _run) -> list[Requirement]:
    """The BUILD_REQUIREMENTS that `python`'s environment lacks, and CMAKE where neither PATH
    nor that environment has one recent enough."""
    out = run([python, "-c", _VERSIONS_CHILD, *(r.name for r in (*BUILD_REQUIREMENTS, CMAKE))])
    if out is None:
        raise RuntimeError(f"{python} does not run")
    found = json.loads(out.strip().splitlines()[-1])
    missing = [r for r in BUILD_REQUIREMENTS if _version_tuple(found.get(r.name)) < r.minimum]
    if max(cmake_version(run), _version_tuple(found.get(CMAKE.name))) < CMAKE.minimum:
        missing.append(CMAKE)
    return missing


def ensure_build_requirements(python: str, run: Run = _run, install: Callable[[list[str]], str | None] | None = None,
                              log: Callable[[str], None] = print) -> None:
    """Install what a build without isolation needs into `python`'s environment from the package
    index (or where PIP_INDEX_URL / PIP_FIND_LINKS point pip); one line naming what is missing
    where pip cannot get it. `install(pins)` returns None, or why it failed."""
    missing = missing_build_requirements(python, run)
    if not missing:
        return
    pins = [r.pin for r in missing]
    log(f"installing what the CUDA build needs into {python}'s environment: {' '.join(pins)}")
    failed = (install or (lambda reqs: _pip_install(python, reqs)))(pins)
    still = missing if failed else missing_build_requirements(python, run)
    if still:
        raise RuntimeError(
            f"the CUDA build of {LLAMA_CPP_PYTHON} runs without pip's isolated build environment and needs "
            f"{', '.join(map(str, still))} in {python}'s environment, which pip could not install "
            f"({failed or 'still missing after pip install'}): offline, install them from wheels "
            f"({python} -m pip install --no-index --find-links DIR {' '.join(r.pin for r in still)}) and run `make setup` again")


def _pip_install(python: str, requirements: list[str]) -> str | None:
    done = subprocess.run([python, "-m", "pip", "install", "-q", *requirements], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"pip exit code {done.returncode}"])[-1]


def environment_prefix(python: str) -> Path:
    """sys.prefix of `python`: the venv itself (its python is a symlink into the base install)."""
    out = _run([python, "-c", "import sys; print(sys.prefix)"])
    if not out:
        raise RuntimeError(f"{python} does not run")
    return Path(out.strip())


def installed_record(python: str) -> dict | None:
    """The RECORD of the build installed in `python`'s environment, if we installed one."""
    try:
        return json.loads((environment_prefix(python) / RECORD).read_text())
    except (OSError, ValueError, RuntimeError):
        return None


def install(python: str, env: Mapping[str, str] = os.environ, log: Callable[[str], None] = print) -> None:
    """Build (once per key) and install the llama-cpp-python wheel that fits this machine."""
    ensure_converter(python, env, log)
    gpu = plan_gpu(env)
    spec = build_spec(gpu, python_tag(python))
    current = installed_record(python)
    if current is not None and current.get("key") == spec.key:
        log(f"{LLAMA_CPP_PYTHON} {spec.version} is installed, built for this machine ({gpu.reason})")
        return
    log(gpu.reason)
    wheel = ensure_wheel(spec, python, wheelhouse(env), log)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir", "--force-reinstall", str(wheel)],
                   check=True)
    shutil.copyfile(wheel.parent / RECORD, environment_prefix(python) / RECORD)
    log(f"installed {wheel.name} ({spec.kind}, key {spec.key})")


def setup_fix(extra: str = "") -> str:
    """The command that installs what localalign needs: `make setup` in a checkout, else the
    llama.cpp build step `make setup` runs, for this Python. `localalign doctor` prints it under
    its problems, and a crash of the engine process on an instruction this CPU lacks names it."""
    from localalign.paths import checkout_root  # not at the top: `make setup` runs this module bare

    root = checkout_root()
    if root is not None:
        return f"make -C {root} setup{extra}"
    py = sys.executable
    return (f"{extra.strip()} " if extra else "") + f"{py} -m localalign.engine.build install --python {py}"


# --------------------------------------------------------------------------- what a build contains

# Instruction families by mnemonic, as objdump prints them, and the /proc/cpuinfo flag each
# needs. Checked on each line in this order; every rule that matches counts.
_FAMILIES: tuple[tuple[str, re.Pattern], ...] = (
    ("amx_tile", re.compile(r"^(ldtilecfg|sttilecfg|tilerelease|tilezero|tileloadd|tileloaddt1|tilestored)\b")),
    ("amx_int8", re.compile(r"^tdpb(ss|su|us|uu)d\b")),
    ("amx_bf16", re.compile(r"^tdpbf16ps\b")),
    ("amx_fp16", re.compile(r"^tdpfp16ps\b")),
    ("avx512_fp16", re.compile(r"^(?!vcvtps2ph\b)v\w*(ph|sh)\b|^vcvt\w*ph2\w*x\b")),
    ("avx512_bf16", re.compile(r"^(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)\b(?!.*\{vex\})")),
    ("avx_vnni", re.compile(r"^\{vex\} vpdp(bu|ws)sds?\b")),
    ("avx_vnni_int8", re.compile(r"^vpdpb(ss|su|uu)ds?\b")),
    ("avx512_vnni", re.compile(r"^vpdp(bu|ws)sds?\b.*%zmm")),
    ("avx512vbmi", re.compile(r"^(vpermb|vpermi2b|vpermt2b|vpmultishiftqb)\b")),
    ("avx512f", re.compile(r"%zmm|%k[1-7]\b")),
    ("fma", re.compile(r"^vfn?m(add|sub)(sub|add)?\d{3}[ps][sd]\b")),
    ("f16c", re.compile(r"^(vcvtph2ps|vcvtps2ph)\b(?!.*%zmm)")),
    ("avx2", re.compile(r"^(vpbroadcast[bwdq]|vperm2i128|vinserti128|vextracti128|vpermq|vpermd|vpgather\w+|vpmaskmov[dq])\b|^vp(?!ermil|erm2f128)\w*\s.*%ymm")),
    ("bmi2", re.compile(r"^(pdep|pext|shlx|shrx|sarx|rorx|bzhi|mulx)\b")),
)


def instruction_families(disassembly: str, examples: int = 3) -> dict[str, list[str]]:
    """{cpu flag: a few instructions that need it} found in `objdump -d` output."""
    found: dict[str, list[str]] = {}
    for line in disassembly.splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].rstrip().endswith(":"):
            continue  # not an instruction line ("  4a2f0:\tvpaddd %zmm1,...")
        text = parts[-1].strip()
        for flag, pattern in _FAMILIES:
            if pattern.search(text):
                hits = found.setdefault(flag, [])
                if len(hits) < examples:
                    hits.append(text)
    return found


def disassemble(library: Path) -> str:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True)
    return out.stdout


def unsupported_instructions(library: Path, cpu_flags: Sequence[str]) -> dict[str, list[str]]:
    """The instruction families in `library` that this CPU does not list, with examples."""
    flags = set(cpu_flags)
    return {f: ex for f, ex in instruction_families(disassemble(library)).items() if f not in flags}


def llama_cpp_lib_dir() -> Path | None:
    """llama_cpp/lib of the installed package, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if lib.is_dir() else None


def cpu_libraries(lib_dir: Path) -> list[Path]:
    """ggml's CPU backend: one libggml-cpu.so in a native build, one per variant in a portable one."""
    # A wheel stores libggml-cpu.so, .so.0 and .so.0.x as three copies of one file: keep one.
    by_content: dict[str, Path] = {}
    for p in sorted(lib_dir.glob("libggml-cpu*.so*"), key=lambda p: len(p.name)):
        if p.is_file():
            by_content.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), p)
    return sorted(by_content.values())


# The CUDA libraries llama.cpp and torch both load, and llama.cpp's own CUDA backend.
CUDA_FAMILIES = ("libcuda", "libcudart", "libcublas", "libcublasLt", "libnvJitLink", "libnvrtc", "libggml-cuda")


@dataclasses.dataclass(frozen=True, order=True)
class MappedLibrary:
    family: str  # e.g. libcublasLt
    path: str

    @property
    def name(self) -> str:
        return Path(self.path).name


def library_family(filename: str) -> str | None:
    """"libcublasLt" of "libcublasLt.so.13.0.0.19" (and of auditwheel's "libcudart-1a2b3c4d.so.12");
    None for a file that is no shared library."""
    m = re.fullmatch(r"(lib[^.]+?)(?:-[0-9a-f]{8})?\.so(?:\.[0-9]+)*", filename)
    return m.group(1) if m else None


def cuda_libraries(maps: str) -> list[MappedLibrary]:
    """The CUDA_FAMILIES libraries in a process's /proc/<pid>/maps text, one entry per file."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(None, 5)  # address perms offset dev inode path
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        path = fields[5].removesuffix(" (deleted)")
        family = library_family(Path(path).name)
        if family in CUDA_FAMILIES:
            found.add(MappedLibrary(family, path))
    return sorted(found)


def duplicate_copies(*processes: Sequence[MappedLibrary]) -> dict[str, list[str]]:
    """{family: its files} for each library family mapped from more than one file across these
    processes: what one process holding all of them would load twice."""
    paths: dict[str, set[str]] = {}
    for library in (lib for process in processes for lib in process):
        paths.setdefault(library.family, set()).add(library.path)
    return {family: sorted(p) for family, p in sorted(paths.items()) if len(p) > 1}


# The CUDA libraries llama.cpp's CUDA backend links, each after the ones it needs (cuBLAS needs
# cuBLASLt; cuBLASLt may need nvJitLink): preloaded in this order, every one finds its
# dependencies already loaded.
TORCH_CUDA_PRELOAD = ("libnvJitLink", "libcudart", "libcublasLt", "libcublas")


def torch_cuda_libraries(roots: Sequence[Path] | None = None) -> list[Path]:
    """torch's pip-installed copies of TORCH_CUDA_PRELOAD (site-packages/nvidia/*/lib/, e.g.
    nvidia/cu13/lib or nvidia/cublas/lib), in that order; where several versions of one are
    there, the newest. `roots`: the `nvidia` folders, found without importing torch by default."""
    if roots is None:
        spec = importlib.util.find_spec("nvidia")
        roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    by_family: dict[str, list[Path]] = {}
    for root in roots:
        for path in sorted(Path(root).glob("*/lib/lib*.so*")):
            family = library_family(path.name)
            if family in TORCH_CUDA_PRELOAD and path.is_file():
                by_family.setdefault(family, []).append(path)
    newest = {f: max(paths, key=lambda p: (_version_tuple(p.name.partition(".so")[2].lstrip(".")), -len(p.name)))
              for f, paths in by_family.items()}
    return [newest[f] for f in TORCH_CUDA_PRELOAD if f in newest]


def preload_torch_cuda_libraries(roots: Sequence[Path] | None = None,
                                 load: Callable[..., object] | None = None) -> list[Path]:
    """The fallback for a process that must hold llama.cpp and torch together: load torch's own
    CUDA libraries (`torch_cuda_libraries`) with RTLD_GLOBAL before llama_cpp is imported, so
    that llama.cpp's CUDA backend, whose DT_NEEDED names (libcublas.so.13 ...) the loader matches
    against libraries already loaded, uses torch's copies instead of the toolkit's its RPATH
    points to: one copy of each serves both. localalign's own path needs none of this: it keeps
    llama.cpp and torch in separate processes (llama.cpp in the engine process). Returns what was
    loaded, in order."""
    if "llama_cpp" in sys.modules:
        raise RuntimeError("preload_torch_cuda_libraries must run before llama_cpp is imported: "
                           "its CUDA libraries are loaded by then")
    load = load or ctypes.CDLL
    libraries = torch_cuda_libraries(roots)
    for path in libraries:
        load(str(path), mode=ctypes.RTLD_GLOBAL)
    return libraries


def describe(python_record: dict | None = None) -> str:
    """Lines for a CI log: the CPU's vector flags, the build in use, llama.cpp's own feature list."""
    model, flags = cpu_info()
    wide = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni"))]
    lines = [f"cpu: {model or platform.machine()}; {len(flags)} flags; avx512/amx/vnni: {' '.join(wide) or 'none'}"]
    record = python_record if python_record is not None else installed_record(sys.executable)
    if record:
        lines.append(
            f"llama.cpp build: {LLAMA_CPP_PYTHON} {record.get('version')} ({record.get('kind')}), "
            f"key {record.get('key')}, CMAKE_ARGS {' '.join(record.get('cmake_args', []))!r}, CFLAGS {record.get('cflags')!r}, "
            f"built on {record.get('cpu_model')!r}"
        )
    else:
        lines.append("llama.cpp build: not installed by localalign (no llama-build.json in this environment)")
    lib = llama_cpp_lib_dir()
    if lib is not None:
        lines.append("llama.cpp CPU libraries: " + ", ".join(p.name for p in cpu_libraries(lib)))
        try:
            # Here, not at the top: `make setup` runs this module with the system Python,
            # before the venv (and whatever runtime imports) exists.
            from localalign.engine import runtime

            info = runtime.llama_cpp().llama_print_system_info()
            lines.append("llama.cpp system info: " + (info.decode() if isinstance(info, bytes) else str(info)).strip())
        except Exception as e:  # a broken build is exactly what this report is for
            lines.append(f"llama.cpp system info: could not load llama_cpp ({type(e).__name__}: {e})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localalign.engine.build", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="build (once per CPU type) and install llama-cpp-python into a venv")
    p_install.add_argument("--python", required=True, help="the venv's python")
    sub.add_parser("describe", help="print the CPU flags and the llama.cpp build in use")
    sub.add_parser("converter", help="put llama.cpp's converters beside the wheels (from the source distribution)")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(args.python)
        elif args.command == "converter":
            print(ensure_converter(sys.executable))
        else:
            print(describe())
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
