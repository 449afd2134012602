"""`localalign doctor`: each check on faked machine facts, the fix printed under each problem, the
exit code, and one real run on this machine."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from localalign import doctor
from localalign.cli import main
from localalign.doctor import Finding
from localalign.engine.build import GpuPlan

AMX_XEON = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw amx_tile amx_int8\n"
OLD_CPU = "model name\t: Old CPU\nflags\t\t: fpu sse2 avx\n"


def test_cpu_line_names_the_flags_llama_cpp_uses():
    (f,) = doctor.check_cpu(AMX_XEON)
    assert f.status == "ok" and "avx2 fma f16c" in f.text and "avx512: bw f" in f.text
    assert "amx: amx_int8 amx_tile (left out of the build" in f.text


def test_a_cpu_without_avx2_is_a_note(monkeypatch):
    monkeypatch.setattr(doctor.platform, "machine", lambda: "x86_64")
    (f,) = doctor.check_cpu(OLD_CPU)
    assert f.status == "note" and "without AVX2" in f.text


LOADED = {"version": doctor.LLAMA_CPP_VERSION, "offload": False, "features": "AVX2 FMA"}


def fake_build(monkeypatch, record_key: str | None, gpu: str | None = None):
    spec = doctor.build_spec(doctor.plan_gpu({"LLAMA_GPU": "0"}), "cp311")
    monkeypatch.setattr(doctor, "installed_record",
                        lambda python: None if record_key is None else {"key": record_key, "kind": "cpu", "cpu_model": "Elsewhere"})
    monkeypatch.setattr(doctor, "build_spec", lambda g, tag: spec)
    monkeypatch.setattr(doctor, "plan_gpu", lambda env: GpuPlan(False, "reason", gpu=gpu))
    monkeypatch.setattr(doctor, "_instruction_check", lambda flags: [])
    return spec


def test_llama_cpp_built_for_this_machine_is_ok(monkeypatch):
    spec = fake_build(monkeypatch, record_key=None)
    monkeypatch.setattr(doctor, "installed_record", lambda python: {"key": spec.key, "kind": "cpu"})
    (f,) = doctor.check_llama_cpp(probe=lambda: LOADED)
    assert f.status == "ok" and f"key {spec.key}" in f.text and "GPU offload: no" in f.text


def test_llama_cpp_built_elsewhere_is_a_problem_with_the_setup_command(monkeypatch):
    fake_build(monkeypatch, record_key="0123456789abcdef")
    (f,) = doctor.check_llama_cpp(probe=lambda: LOADED)
    assert f.status == "problem" and "built for another machine ('Elsewhere'" in f.text
    assert f.fix == doctor.setup_fix() and ("setup" in f.fix or "engine.build install" in f.fix)


def test_a_build_that_does_not_load_and_a_gpu_left_unused(monkeypatch):
    fake_build(monkeypatch, record_key=None, gpu="NVIDIA H100")
    (f,) = doctor.check_llama_cpp(probe=lambda: {"error": "killed by SIGILL"})
    assert f.status == "problem" and "SIGILL" in f.text
    findings = doctor.check_llama_cpp(probe=lambda: LOADED)
    assert [x.status for x in findings] == ["note", "note"]  # not localalign's build; a GPU it does not use
    assert "LLAMA_GPU=1" in findings[1].fix


def test_low_memory_and_low_disk(monkeypatch, tmp_path):
    (f,) = doctor.check_memory("MemTotal: 8000000 kB\nMemAvailable: 1000000 kB\n")
    assert f.status == "note" and "1.0 GiB available of 7.6 GiB" in f.text
    assert doctor.check_memory("MemTotal: 8000000 kB\nMemAvailable: 6000000 kB\n")[0].status == "ok"
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: type("U", (), {"free": 300 << 20})())
    (f,) = doctor.check_home(tmp_path / "not" / "yet" / "models", tmp_path / "cache", "LOCALALIGN_HOME")
    assert f.status == "problem" and "0.3 GiB free" in f.text and f.fix.startswith("export LOCALALIGN_HOME=")


def test_models_missing_materialized_and_broken(monkeypatch, tmp_path):
    monkeypatch.setattr("localalign.models.MODELS_DIR", tmp_path)
    default = lambda findings: next(f for f in findings if f.topic == "model" and "smollm2-135m-instruct" in f.text)  # noqa: E731
    model = default(doctor.check_models())
    if model.status == "problem":  # the model's package is not installed here
        assert "not installed" in model.text
    else:
        assert model.status == "note" and model.fix == "localalign models pull smollm2-135m-instruct"
    d = tmp_path / "smollm2-135m-instruct"
    (d / "hf").mkdir(parents=True)
    (d / "hf" / "config.json").write_text("{}")
    (d / "model.gguf").write_bytes(b"GGUF")
    (d / "copy-check.json").write_text(json.dumps({"ok": False, "problems": ["logits differ by 9.0"]}))
    model = default(doctor.check_models())
    assert model.status == "problem" and "logits differ by 9.0" in model.text
    assert model.fix == f"rm -rf {d} && localalign models pull smollm2-135m-instruct"


def test_the_command_prints_each_fix_and_exits_1_on_a_problem(monkeypatch):
    monkeypatch.setattr(doctor, "CHECKS", (lambda: [Finding("cpu", "ok", "fine")],
                                           lambda: [Finding("torch", "problem", "torch is not installed", "make setup")]))
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "problem  torch     torch is not installed" in result.output
    assert "fix: make setup" in result.output and "1 problem(s), 0 note(s)" in result.output


def test_doctor_on_this_machine():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code in (0, 1), result.output
    for topic in ("cpu", "llama.cpp", "torch", "memory", "home", "model", "embedder"):
        assert f" {topic} " in result.output
    assert ("ready to run" in result.output) == (result.exit_code == 0)
    print(result.output)


# --------------------------------------------------------------------------- llama.cpp beside torch


def test_llama_and_torch_sharing_cuda_is_checked_only_where_both_use_it():
    def load(gguf):
        raise AssertionError("no child process where one side runs on the CPU")

    offloads = {**LOADED, "offload": True}
    assert doctor.check_llama_beside_torch(lambda: LOADED, lambda: True, load) == []
    assert doctor.check_llama_beside_torch(lambda: offloads, lambda: False, load) == []
    assert doctor.check_llama_beside_torch(lambda: {"error": "killed by SIGILL"}, lambda: True, load) == []


def test_a_crash_beside_torch_is_a_problem_whose_fix_builds_llama_cpp_for_the_cpu(monkeypatch, tmp_path):
    from localalign.models import ModelFiles

    offloads = {**LOADED, "offload": True}
    gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(doctor, "materialized", lambda name: ModelFiles("m", None, None))
    (f,) = doctor.check_llama_beside_torch(lambda: offloads, lambda: True, lambda g: None)
    assert f.status == "note" and "models pull" in f.fix
    monkeypatch.setattr(doctor, "materialized", lambda name: ModelFiles("m", gguf, tmp_path))
    seen = []
    (f,) = doctor.check_llama_beside_torch(lambda: offloads, lambda: True, lambda g: seen.append(g) or "killed by SIGSEGV")
    assert seen == [gguf]
    assert f.status == "problem" and "SIGSEGV" in f.text and "LLAMA_GPU=0" in f.fix
    (f,) = doctor.check_llama_beside_torch(lambda: offloads, lambda: True, lambda g: None)
    assert f.status == "ok" and "share a process" in f.text


def test_the_child_loads_beside_torch_and_names_what_stopped_it(tiny_gguf, tmp_path, monkeypatch):
    assert doctor.load_beside_torch(tiny_gguf, device="cpu", layers=0) is None  # torch imported first, then llama.cpp
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf file at all")
    why = doctor.load_beside_torch(bad, device="cpu", layers=0)
    assert why is not None and "gguf" in why.lower()

    class Killed:
        returncode, stdout, stderr = -11, "", ""

    monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: Killed())
    assert doctor.load_beside_torch(tiny_gguf) == "killed by SIGSEGV"


# --------------------------------------------------------------------------- the CUDA libraries each side loads

TOOLKIT = "/usr/local/cuda-13.0/targets/x86_64-linux/lib"
TORCH_LIBS = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib"
DRIVER = "/usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04"


def maps_of(*paths: str) -> str:
    return "".join(f"7f{i:010x}-7f{i + 1:010x} r-xp 00000000 fd:01 {i} {p}\n" for i, p in enumerate(paths))


LLAMA_MAPS = maps_of(f"{TOOLKIT}/libcublas.so.13.0.2.14", f"{TOOLKIT}/libcudart.so.13.0.96", DRIVER,
                     "/venv/lib/python3.12/site-packages/llama_cpp/lib/libggml-cuda.so")


def test_one_copy_of_each_cuda_library_is_ok_and_names_them():
    offloads = {**LOADED, "offload": True}
    torch_maps = maps_of(f"{TOOLKIT}/libcublas.so.13.0.2.14", DRIVER)
    (f,) = doctor.check_cuda_copies(lambda: offloads, lambda: True, {"llama.cpp": LLAMA_MAPS, "torch": torch_maps}.get)
    assert f.status == "ok" and f.topic == "gpu"
    assert "llama.cpp maps libcublas.so.13.0.2.14, libcuda.so.580.159.04, libcudart.so.13.0.96, libggml-cuda.so" in f.text
    assert "torch maps libcublas.so.13.0.2.14, libcuda.so.580.159.04" in f.text


def test_two_copies_of_a_cuda_library_are_a_problem_naming_both_files_and_their_sides():
    offloads = {**LOADED, "offload": True}
    torch_maps = maps_of(f"{TORCH_LIBS}/libcublas.so.13", f"{TORCH_LIBS}/libcudart.so.13", DRIVER)
    (f,) = doctor.check_cuda_copies(lambda: offloads, lambda: True, {"llama.cpp": LLAMA_MAPS, "torch": torch_maps}.get)
    assert f.status == "problem" and "LLAMA_GPU=0" in f.fix
    assert (f"libcublas from {TORCH_LIBS}/libcublas.so.13 (torch) and {TOOLKIT}/libcublas.so.13.0.2.14 (llama.cpp)"
            in f.text)
    assert "libcudart from" in f.text and "libcuda from" not in f.text  # one driver, both sides
    assert "preload_torch_cuda_libraries()" in f.text


def test_cuda_copies_are_checked_only_where_llama_cpp_offloads_with_cuda():
    def no_child(side):
        raise AssertionError("no child process where llama.cpp does not offload")

    assert doctor.check_cuda_copies(lambda: LOADED, lambda: True, no_child) == []
    offloads = {**LOADED, "offload": True}
    vulkan = maps_of("/venv/lib/python3.12/site-packages/llama_cpp/lib/libggml-vulkan.so")
    assert doctor.check_cuda_copies(lambda: offloads, lambda: False, {"llama.cpp": vulkan}.get) == []
    (f,) = doctor.check_cuda_copies(lambda: offloads, lambda: False, {"llama.cpp": LLAMA_MAPS}.get)
    assert f.status == "ok" and "torch maps" not in f.text  # torch on the CPU: llama.cpp's side alone

    def crashed(side):
        raise RuntimeError("killed by SIGSEGV")

    (f,) = doctor.check_cuda_copies(lambda: offloads, lambda: True, crashed)
    assert f.status == "note" and "llama.cpp loads could not be listed: killed by SIGSEGV" in f.text


def test_the_maps_child_reports_what_it_loaded():
    text = doctor.process_maps("llama.cpp")
    assert "llama_cpp/lib/libllama" in text or "llama_cpp/lib/libggml" in text


def test_a_gpu_plan_that_cannot_be_made_names_its_own_fix(monkeypatch):
    from localalign.engine.build import PlanError

    def no_cap(env):
        raise PlanError("nvidia-smi lists NVIDIA H200 without a compute capability (none)", "LLAMA_GPU=0")

    monkeypatch.setattr(doctor, "plan_gpu", no_cap)
    (f,) = doctor.check_llama_cpp(probe=lambda: LOADED)
    assert f.status == "problem" and "without a compute capability" in f.text and f.fix == doctor.setup_fix(" LLAMA_GPU=0")
