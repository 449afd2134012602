"""The llama.cpp build: only instructions this CPU runs, decoding that does not trap, CUDA where asked.

The library and decode tests read the llama-cpp-python installed in this environment, so a
wheel built for another CPU (or with AMX switched on) fails here rather than in a user's run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from localalign.engine import build as llama_build
from localalign.engine.build import BuildSpec, GpuPlan, PlanError, cuda_architectures, instruction_families, plan_gpu

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- pure parts

DISASSEMBLY = """
libggml-cpu.so:     file format elf64-x86-64

0000000000012340 <ggml_vec_dot_q8_0_q8_0>:
   12340:\tpush   %rbp
   12341:\tvpaddd %ymm1,%ymm2,%ymm3
   12345:\tvfmadd231ps %ymm0,%ymm1,%ymm2
   12349:\tvcvtph2ps %xmm0,%ymm1
   1234d:\tvcvtps2ph $0x0,%ymm0,%xmm1
   12351:\tvpermilps $0x1b,%ymm0,%ymm1
0000000000012400 <ggml_amx_kernel>:
   12400:\tldtilecfg (%rdi)
   12404:\ttilezero %tmm0
   12408:\ttileloadd (%rsi,%rax,1),%tmm1
   1240c:\ttdpbssd %tmm2,%tmm1,%tmm0
   12410:\tvpdpbusd %zmm1,%zmm2,%zmm3
   12414:\t{vex} vpdpbusd %ymm1,%ymm2,%ymm3
   12418:\tvdpbf16ps %zmm1,%zmm2,%zmm3
   1241c:\tvfmadd231ph %zmm1,%zmm2,%zmm3
   12420:\tvpermt2b %zmm1,%zmm2,%zmm3
   12424:\tshlx   %rax,%rbx,%rcx
"""


def test_instruction_families_name_each_family_and_its_cpu_flag():
    found = instruction_families(DISASSEMBLY)
    assert found["amx_tile"] == ["ldtilecfg (%rdi)", "tilezero %tmm0", "tileloadd (%rsi,%rax,1),%tmm1"]
    assert found["amx_int8"] == ["tdpbssd %tmm2,%tmm1,%tmm0"]
    assert "vpdpbusd %zmm1,%zmm2,%zmm3" in found["avx512_vnni"]
    assert found["avx_vnni"] == ["{vex} vpdpbusd %ymm1,%ymm2,%ymm3"]
    assert found["avx512_bf16"] == ["vdpbf16ps %zmm1,%zmm2,%zmm3"]
    assert found["avx512_fp16"] == ["vfmadd231ph %zmm1,%zmm2,%zmm3"]
    assert found["avx512vbmi"] == ["vpermt2b %zmm1,%zmm2,%zmm3"]
    assert found["bmi2"] == ["shlx   %rax,%rbx,%rcx"]
    assert found["fma"] == ["vfmadd231ps %ymm0,%ymm1,%ymm2"]
    assert found["f16c"] == ["vcvtph2ps %xmm0,%ymm1", "vcvtps2ph $0x0,%ymm0,%xmm1"]
    assert found["avx2"] == ["vpaddd %ymm1,%ymm2,%ymm3"]  # not vpermilps: that one is plain AVX
    assert "amx_bf16" not in found and "push   %rbp" not in str(found)


def test_cpu_info_reads_model_and_flags():
    text = "processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: sse avx2 amx_tile avx2\n\nprocessor\t: 1\nflags\t: other\n"
    assert llama_build.cpu_info(text) == ("Example CPU", ["amx_tile", "avx2", "sse"])


def _spec(**changes) -> BuildSpec:
    base = dict(version="0.3.36", cpu_model="CPU A", cpu_flags=("avx2", "avx512f"), compiler="gcc 12", python="cp311",
                cmake_args=("-DLLAVA_BUILD=OFF",), cflags=llama_build.NO_AMX_FLAGS, cuda_arch=None)
    return BuildSpec(**{**base, **changes})


def test_wheel_key_changes_with_anything_that_changes_machine_code():
    key = _spec().key
    assert _spec().key == key  # stable
    for change in ({"cpu_flags": ("avx2",)}, {"cpu_model": "CPU B"}, {"compiler": "gcc 13"}, {"cflags": ""},
                   {"cuda_arch": "90"}, {"python": "cp312"}):
        assert _spec(**change).key != key, change
    assert _spec(cuda_arch="90-real").dirname.startswith("llama-cpp-python-0.3.36-cp311-cuda-")
    env = _spec().environment()
    assert "-mno-amx-tile" in env["CFLAGS"] and env["CFLAGS"] == env["CXXFLAGS"]


def test_version_pin_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={llama_build.LLAMA_CPP_VERSION}" in deps


def test_a_cpu_builds_key_and_command_are_what_they_were():
    """A changed key or command makes every existing user rebuild llama.cpp: the CPU build's stay."""
    assert _spec().key == "9a535ef11aa18c3a"  # computed by the code before CUDA builds changed
    cmd = llama_build.wheel_command(_spec(), "py", ["--no-binary", "llama-cpp-python", "llama-cpp-python==0.3.36"], Path("/w"))
    assert cmd == ["py", "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                   "llama-cpp-python==0.3.36", "-w", "/w"]
    cuda = llama_build.wheel_command(_spec(cuda_arch="90-real"), "py", ["src.tar.gz"], Path("/w"))
    assert cuda == ["py", "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-build-isolation", "src.tar.gz",
                    "-w", "/w"]


def _fake_machine(gpus: str | None, nvcc: str | None, names: str | None = None):
    """`gpus`: what `nvidia-smi --query-gpu=name,compute_cap` prints (None: nvidia-smi is absent);
    `names`: what the names-only query prints where a driver refuses the compute_cap field."""
    tools = {"nvidia-smi": "/usr/bin/nvidia-smi" if gpus is not None or names is not None else None, "nvcc": nvcc}

    def which(name):
        return tools.get(name)

    def run(cmd):
        if cmd[0] == "nvidia-smi":
            return gpus if "--query-gpu=name,compute_cap" in cmd else names
        if cmd[0].endswith("nvcc"):
            return "Cuda compilation tools, release 13.0, V13.0.88"
        return None

    return which, run


def test_gpu_plan_cpu_when_no_gpu():
    which, run = _fake_machine(gpus=None, nvcc="/usr/local/bin/nvcc")
    plan = plan_gpu({}, which, run)
    assert not plan.cuda and "no NVIDIA GPU" in plan.reason


def test_gpu_plan_cuda_when_gpu_and_nvcc_builds_for_its_compute_capability():
    which, run = _fake_machine(gpus="NVIDIA H200, 9.0\n", nvcc="/usr/local/bin/nvcc")
    plan = plan_gpu({}, which, run)
    assert plan == GpuPlan(True, plan.reason, "90-real", "NVIDIA H200")
    assert "CUDA build for NVIDIA H200 (CMAKE_CUDA_ARCHITECTURES=90-real)" in plan.reason
    spec = llama_build.build_spec(plan, "cp311", run=run, cpuinfo="model name: X\nflags: avx2\n")
    assert "-DGGML_CUDA=on" in spec.cmake_args and "-DCMAKE_CUDA_ARCHITECTURES=90-real" in spec.cmake_args
    assert not any("GGML_CUDA_FA" in a for a in spec.cmake_args)  # the flash-attention kernels: llama.cpp's default
    assert spec.kind == "cuda" and spec.cuda_arch == "90-real"


def test_mixed_gpus_get_one_real_architecture_each_in_numeric_order():
    which, run = _fake_machine(gpus="NVIDIA H100 80GB HBM3, 9.0\nNVIDIA A10, 8.6\nNVIDIA H100 80GB HBM3, 9.0\n",
                               nvcc="/usr/local/bin/nvcc")
    plan = plan_gpu({}, which, run)
    assert plan.arch == "86-real;90-real" and plan.gpu == "NVIDIA H100 80GB HBM3 + NVIDIA A10"
    assert cuda_architectures([("B200", "10.0"), ("RTX 3090", "8.6")]) == "86-real;100-real"


def test_a_gpu_without_a_compute_capability_is_one_clear_error():
    which, run = _fake_machine(gpus="NVIDIA H200, [N/A]\n", nvcc="/usr/local/bin/nvcc")
    with pytest.raises(PlanError, match=r"lists NVIDIA H200 without a compute capability \(\[N/A\]\)") as e:
        plan_gpu({}, which, run)
    assert e.value.setting == "LLAMA_GPU=0" and "\n" not in str(e.value)
    # a driver that refuses the compute_cap field still names its GPUs
    which, run = _fake_machine(gpus=None, names="Tesla T4\n", nvcc="/usr/local/bin/nvcc")
    with pytest.raises(PlanError, match=r"lists Tesla T4 without a compute capability \(none\)"):
        plan_gpu({"LLAMA_GPU": "auto"}, which, run)
    which, run = _fake_machine(gpus=None, names=None, nvcc="/usr/local/bin/nvcc")
    assert not plan_gpu({}, which, run).cuda  # nvidia-smi there, answering nothing: no GPU


def test_gpu_plan_gpu_without_compiler_says_generation_runs_on_cpu(tmp_path):
    which, run = _fake_machine(gpus="NVIDIA RTX 4090, 8.9\n", nvcc=None)
    plan = plan_gpu({}, which, run)
    assert not plan.cuda and "generation will run on the CPU" in plan.reason and "\n" not in plan.reason
    # CUDA_HOME counts as "a compiler is there"
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert plan_gpu({"CUDA_HOME": str(tmp_path)}, which, lambda cmd: run(["nvcc"] if cmd[0] == str(nvcc) else cmd)).cuda


def test_gpu_plan_opt_out_and_insist():
    which, run = _fake_machine(gpus="NVIDIA H100, 9.0\n", nvcc="/usr/local/bin/nvcc")
    off = plan_gpu({"LLAMA_GPU": "0"}, which, run)
    assert not off.cuda and "LLAMA_GPU=0" in off.reason
    which_none, run_none = _fake_machine(gpus=None, nvcc=None)
    with pytest.raises(PlanError, match="lists no GPU"):
        plan_gpu({"LLAMA_GPU": "1"}, which_none, run_none)
    with pytest.raises(PlanError, match="LLAMA_GPU must be") as e:
        plan_gpu({"LLAMA_GPU": "yes"}, which, run)
    assert e.value.setting == "LLAMA_GPU=auto"


# --------------------------------------------------------------------------- a CUDA build without pip's isolation


def _fake_env(versions: dict[str, str | None], cmake_on_path: str | None = "3.25.1"):
    """A `run` for an environment whose packages have `versions`; state it can change."""
    state = dict(versions)

    def run(cmd):
        if cmd[0] == "cmake":
            return f"cmake version {cmake_on_path}\n" if cmake_on_path else None
        if cmd[1] == "-c":
            return json.dumps({name: state.get(name) for name in cmd[3:]})
        return None

    return run, state


HAS_ALL = {"scikit-build-core": "1.1.2", "packaging": "26.4", "pathspec": "1.1.1", "cmake": None}


def test_build_requirements_missing_are_named_with_their_minimum():
    run, _ = _fake_env(HAS_ALL)
    assert llama_build.missing_build_requirements("py", run) == []
    run, _ = _fake_env({**HAS_ALL, "scikit-build-core": "0.8.2", "pathspec": None})
    assert [str(r) for r in llama_build.missing_build_requirements("py", run)] == ["scikit-build-core>=0.9.2",
                                                                                  "pathspec>=0.12.0"]
    run, _ = _fake_env(HAS_ALL, cmake_on_path="3.18.4")  # too old on PATH, none in the venv
    assert [str(r) for r in llama_build.missing_build_requirements("py", run)] == ["cmake>=3.21"]
    run, _ = _fake_env({**HAS_ALL, "cmake": "3.31.10"}, cmake_on_path=None)  # the venv's cmake package counts
    assert llama_build.missing_build_requirements("py", run) == []


def test_missing_build_requirements_are_installed_from_the_index():
    run, state = _fake_env({**HAS_ALL, "scikit-build-core": None}, cmake_on_path=None)
    asked = []

    def install(pins):
        asked.append(pins)
        state.update({"scikit-build-core": "1.1.2", "cmake": "3.31.10"})
        return None

    llama_build.ensure_build_requirements("py", run, install, log=lambda m: None)
    assert asked == [["scikit-build-core==1.1.2", "cmake==3.31.10"]]


def test_without_network_the_missing_requirements_are_one_line():
    run, _ = _fake_env({**HAS_ALL, "scikit-build-core": None, "packaging": None})
    with pytest.raises(RuntimeError) as e:
        llama_build.ensure_build_requirements(
            "/venv/bin/python", run, lambda pins: "ERROR: No matching distribution found for scikit-build-core==1.1.2",
            log=lambda m: None)
    message = str(e.value)
    assert "\n" not in message
    assert "needs scikit-build-core>=0.9.2, packaging>=23.2 in /venv/bin/python's environment" in message
    assert "No matching distribution found" in message
    assert "/venv/bin/python -m pip install --no-index --find-links DIR scikit-build-core==1.1.2 packaging==26.4" in message


def test_the_requirement_check_reads_a_real_environment(tmp_path):
    import venv

    venv.create(tmp_path / "venv")  # no pip, nothing installed in it
    python = str(tmp_path / "venv" / "bin" / "python")
    missing = [r.name for r in llama_build.missing_build_requirements(python)]
    assert {"scikit-build-core", "packaging", "pathspec"} <= set(missing)


def test_a_cuda_build_checks_its_requirements_before_it_starts(tmp_path, monkeypatch):
    def refuse(python, log=print):
        raise RuntimeError("needs scikit-build-core>=0.9.2")

    def no_build(*a, **k):
        raise AssertionError("pip wheel ran although the build requirements are missing")

    monkeypatch.setattr(llama_build, "ensure_build_requirements", refuse)
    monkeypatch.setattr(llama_build.subprocess, "run", no_build)
    with pytest.raises(RuntimeError, match="scikit-build-core"):
        llama_build.ensure_wheel(_spec(cuda_arch="90-real"), "py", tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # no half-made build directory


# --------------------------------------------------------------------------- the CUDA libraries a process maps

MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1 /usr/bin/python3.12
7f0000000000-7f0000100000 r--p 00000000 fd:01 11 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13.0.2.14
7f0000100000-7f0000900000 r-xp 00100000 fd:01 11 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13.0.2.14
7f0000900000-7f0000a00000 rw-p 00900000 fd:01 11 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13.0.2.14
7f0001000000-7f0001100000 r-xp 00000000 fd:01 12 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublasLt.so.13.0.2.14
7f0002000000-7f0002100000 r-xp 00000000 fd:01 13 /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcudart.so.13.0.96
7f0003000000-7f0003100000 r-xp 00000000 fd:01 14 /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04
7f0004000000-7f0004100000 r-xp 00000000 fd:01 15 /venv/lib/python3.12/site-packages/llama_cpp/lib/libggml-cuda.so
7f0005000000-7f0005100000 r-xp 00000000 fd:01 16 /venv/lib/python3.12/site-packages/llama_cpp/lib/libggml-base.so
7f0006000000-7f0006100000 r-xp 00000000 fd:01 17 /opt/torch/lib/libcudnn.so.9
7f0007000000-7f0007100000 r-xp 00000000 fd:01 18 /tmp/old/libnvrtc.so.13 (deleted)
7f0008000000-7f0008100000 r-xp 00000000 fd:01 19 /old/torch/lib/libcudart-9f3d1a2b.so.12
7f0009000000-7f0009100000 rw-p 00000000 00:00 0 [heap]
7f000a000000-7f000a100000 rw-p 00000000 00:00 0
"""


def test_cuda_libraries_of_a_maps_text_one_entry_per_file():
    libs = llama_build.cuda_libraries(MAPS)
    assert [(lib.family, lib.name) for lib in libs] == [
        ("libcublas", "libcublas.so.13.0.2.14"), ("libcublasLt", "libcublasLt.so.13.0.2.14"),
        ("libcuda", "libcuda.so.580.159.04"), ("libcudart", "libcudart-9f3d1a2b.so.12"),
        ("libcudart", "libcudart.so.13.0.96"), ("libggml-cuda", "libggml-cuda.so"), ("libnvrtc", "libnvrtc.so.13")]
    assert libs[-1].path == "/tmp/old/libnvrtc.so.13"  # "(deleted)" is not part of the path
    assert llama_build.library_family("libc.so.6") == "libc" and llama_build.library_family("python3.12") is None


def test_two_files_of_one_library_across_processes_are_duplicates():
    llama = llama_build.cuda_libraries(MAPS)
    torch_maps = ("7f0000000000-7f0000100000 r-xp 00000000 fd:01 21 /opt/torch/nvidia/cu13/lib/libcublas.so.13\n"
                  "7f0003000000-7f0003100000 r-xp 00000000 fd:01 14 /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04\n")
    twice = llama_build.duplicate_copies(llama, llama_build.cuda_libraries(torch_maps))
    assert twice["libcublas"] == ["/opt/torch/nvidia/cu13/lib/libcublas.so.13",
                                  "/usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13.0.2.14"]
    assert "libcuda" not in twice  # the driver: one file, seen by both
    assert "libcudart" in twice  # two versions inside the first process already
    assert llama_build.duplicate_copies(llama_build.cuda_libraries(torch_maps)) == {}


def _fake_nvidia(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (root / "nvidia" / folder / "lib").mkdir(parents=True)
        for name in names:
            (root / "nvidia" / folder / "lib" / name).write_bytes(b"\x7fELF")
    return root / "nvidia"


def test_torchs_cuda_libraries_are_preloaded_globally_each_after_what_it_needs(tmp_path, monkeypatch):
    import ctypes

    nvidia = _fake_nvidia(tmp_path, {
        "cu13": ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libnvJitLink.so.13", "libcufft.so.12"],
        "cudnn": ["libcudnn.so.9"],
        "cuda_runtime": ["libcudart.so.12"],  # an older runtime beside it: the newest is taken
    })
    loaded = []
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    got = llama_build.preload_torch_cuda_libraries([nvidia], load=lambda path, mode: loaded.append((Path(path).name, mode)))
    assert loaded == [("libnvJitLink.so.13", ctypes.RTLD_GLOBAL), ("libcudart.so.13", ctypes.RTLD_GLOBAL),
                      ("libcublasLt.so.13", ctypes.RTLD_GLOBAL), ("libcublas.so.13", ctypes.RTLD_GLOBAL)]
    assert got == [nvidia / "cu13" / "lib" / name for name, _ in loaded]
    assert llama_build.torch_cuda_libraries([tmp_path / "nowhere"]) == []


def test_preloading_after_llama_cpp_is_loaded_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", object())
    with pytest.raises(RuntimeError, match="before llama_cpp is imported"):
        llama_build.preload_torch_cuda_libraries([tmp_path], load=lambda path, mode: None)


# --------------------------------------------------------------------------- the installed build


def _cpu_libraries() -> list[Path]:
    lib = llama_build.llama_cpp_lib_dir()
    if lib is None:
        pytest.fail("llama_cpp is not installed with a lib/ folder")
    libs = llama_build.cpu_libraries(lib)
    assert libs, f"no libggml-cpu*.so under {lib}"
    return libs


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="reads x86-64 ELF and /proc/cpuinfo")
def test_cpu_library_uses_only_instructions_this_cpu_lists():
    """An AMX kernel (or any instruction family this CPU's flags do not list) in llama.cpp's CPU
    library is a SIGILL waiting for the first decode that reaches it."""
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    _, flags = llama_build.cpu_info()
    assert flags, "/proc/cpuinfo lists no flags"
    problems = {}
    for library in _cpu_libraries():
        found = llama_build.instruction_families(llama_build.disassemble(library))
        amx = {f: ex for f, ex in found.items() if f.startswith("amx")}
        unlisted = {f: ex for f, ex in found.items() if f not in flags}
        if amx or unlisted:
            problems[library.name] = {**amx, **unlisted}
    assert not problems, (
        "llama.cpp's CPU library contains instructions this CPU does not list or that trap (AMX): "
        + json.dumps(problems)
        + "; rebuild with `make setup` (it builds without AMX, for this CPU)"
    )


CHILD_DECODE = """
import sys
from localalign.engine.runtime import load_llama
llm = load_llama(sys.argv[1], n_ctx=256, threads=2)
prompt = "<|im_start|>user\\nWrite three words about the sea, please.<|im_end|>\\n<|im_start|>assistant\\n" * 3
out = llm.create_completion(prompt, max_tokens=16, temperature=0.0)
print(len(out["choices"][0]["text"]))
"""


@pytest.fixture(scope="module")
def quantized_tiny(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    from localalign.convert.quantize import quantize_gguf

    out = tmp_path_factory.mktemp("quantized")
    return {q: quantize_gguf(tiny_gguf, out / f"tiny.{q}.gguf", q) for q in ("q8_0", "q4_0")}


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_decoding_does_not_die_of_a_signal(quantized_tiny, quant):
    """Decode in a child process: an illegal instruction kills the child, not the test run."""
    child = subprocess.run([sys.executable, "-c", CHILD_DECODE, str(quantized_tiny[quant])],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        pytest.fail(f"decoding a {quant} model killed the process with {name}: {child.stderr[-2000:]}")
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().isdigit()


CHILD_GPU = """
import json, sys
from localalign.engine.runtime import load_llama
out = {}
for layers in (-1, 0):
    llm = load_llama(sys.argv[1], n_ctx=256, threads=2, n_gpu_layers=layers)
    toks = llm.tokenize(b"<|im_start|>user\\nCount to ten.<|im_end|>\\n<|im_start|>assistant\\n", add_bos=True, special=True)
    ids = []
    for token in llm.generate(toks, temp=0.0, top_k=1):
        ids.append(int(token))
        if len(ids) == 24:
            break
    out[str(layers)] = ids
    llm.close()
print(json.dumps(out))
"""


def test_gpu_build_offloads_every_layer_and_agrees_with_the_cpu(quantized_tiny, tiny_gguf):
    """On a machine with a GPU and a CUDA build: all layers go to the GPU, greedy text is the CPU's."""
    plan = plan_gpu()
    if plan.gpu is None:
        pytest.skip("no NVIDIA GPU on this machine")
    record = llama_build.installed_record(sys.executable) or {}
    if record.get("kind") != "cuda":
        pytest.skip(f"llama.cpp here is built for the CPU ({plan.reason})")
    env = {**os.environ, "LOCALALIGN_LLAMA_LOG": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD_GPU, str(tiny_gguf)], capture_output=True, text=True,
                           timeout=300, cwd=REPO, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    offloaded = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", child.stderr)
    assert offloaded, child.stderr[-3000:]
    assert offloaded[0][0] == offloaded[0][1], f"only {offloaded[0][0]} of {offloaded[0][1]} layers on the GPU"
    ids = json.loads(child.stdout.strip().splitlines()[-1])
    assert ids["-1"] == ids["0"], "greedy tokens on the GPU differ from the CPU's"
