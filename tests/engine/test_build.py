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
from localalign.engine.build import BuildSpec, GpuPlan, cuda_architectures, instruction_families, plan_gpu

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
    assert _spec(cuda_arch="native").dirname.startswith("llama-cpp-python-0.3.36-cp311-cuda-")
    env = _spec().environment()
    assert "-mno-amx-tile" in env["CFLAGS"] and env["CFLAGS"] == env["CXXFLAGS"]


def test_version_pin_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={llama_build.LLAMA_CPP_VERSION}" in deps


def _fake_machine(gpus: str | None, nvcc: str | None, nvcc_release: str = "13.0", cmake: str = "3.25.1"):
    tools = {"nvidia-smi": "/usr/bin/nvidia-smi" if gpus is not None else None, "nvcc": nvcc}

    def which(name):
        return tools.get(name)

    def run(cmd):
        if cmd[0] == "nvidia-smi":
            return gpus
        if cmd[0].endswith("nvcc"):
            return f"Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.88"
        if cmd[0] == "cmake":
            return f"cmake version {cmake}\n"
        return None

    return which, run


def test_gpu_plan_cpu_when_no_gpu():
    which, run = _fake_machine(gpus=None, nvcc="/usr/local/bin/nvcc")
    plan = plan_gpu({}, which, run)
    assert not plan.cuda and "no NVIDIA GPU" in plan.reason


def test_gpu_plan_cuda_when_gpu_and_nvcc():
    which, run = _fake_machine(gpus="NVIDIA H200, 9.0\n", nvcc="/usr/local/bin/nvcc")
    plan = plan_gpu({}, which, run)
    assert plan == GpuPlan(True, plan.reason, "native", "NVIDIA H200")
    assert "CUDA build for NVIDIA H200" in plan.reason
    spec = llama_build.build_spec(plan, "cp311", run=run, cpuinfo="model name: X\nflags: avx2\n")
    assert "-DGGML_CUDA=on" in spec.cmake_args and "-DCMAKE_CUDA_ARCHITECTURES=native" in spec.cmake_args


def test_gpu_plan_old_toolchain_uses_the_gpus_compute_capability():
    which, run = _fake_machine(gpus="NVIDIA A10, 8.6\n", nvcc="/opt/nvcc", nvcc_release="11.4", cmake="3.22.1")
    assert plan_gpu({}, which, run).arch == "86"
    assert cuda_architectures("release 12.4", (3, 23), ["86", "90"]) == "86;90"


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
    with pytest.raises(ValueError, match="lists no GPU"):
        plan_gpu({"LLAMA_GPU": "1"}, which_none, run_none)
    with pytest.raises(ValueError, match="LLAMA_GPU must be"):
        plan_gpu({"LLAMA_GPU": "yes"}, which, run)


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
