"""How llama.cpp is loaded in this process: the module, a model, threads and GPU layers.

Every import of llama_cpp goes through `llama_cpp()`, after the package has set
OMP_WAIT_POLICY=PASSIVE (localalign/__init__.py): llama.cpp's OpenMP threads read it once,
when its library loads.
"""

from __future__ import annotations

import os
from types import ModuleType

from localalign.errors import UserError
from localalign.gguf_header import check_gguf_file


def llama_cpp() -> ModuleType:
    """Import llama_cpp, its C logging silenced."""
    import llama_cpp as module

    _silence_llama_log(module)
    return module


_log_silenced = False


def _silence_llama_log(module: ModuleType) -> None:
    # llama.cpp prints hundreds of lines per model load to stderr; we report what matters ourselves.
    global _log_silenced
    if _log_silenced or os.environ.get("LOCALALIGN_LLAMA_LOG"):
        return

    @module.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        pass

    module.llama_log_set(_quiet, None)
    _silence_llama_log.callback = _quiet  # keep a reference: ctypes callbacks die with their object
    _log_silenced = True


def default_threads() -> int:
    """Threads for llama.cpp and torch: LOCALALIGN_THREADS, else every core the OS reports."""
    return int(os.environ.get("LOCALALIGN_THREADS") or os.cpu_count() or 1)


def gpu_layers(setting: int | str | None, supports_offload: bool, env: str | None = None) -> int:
    """llama.cpp's n_gpu_layers for a `setting` of "auto" (or None) or a number of layers.

    "auto": LOCALALIGN_GPU_LAYERS (`env`) if set, else every layer (-1) when this
    llama-cpp-python build can offload (CUDA, Metal, Vulkan ...), else none (0). A small
    model fits a consumer GPU whole; to share a GPU, set a number. Asking for layers on a
    CPU-only build is an error: llama.cpp would silently run everything on the CPU.
    """
    if setting is None or setting == "auto":
        if env is None or env.strip() in ("", "auto"):
            return -1 if supports_offload else 0
        setting = env
    try:
        layers = int(setting)
    except ValueError:
        raise UserError(f"n_gpu_layers must be 'auto' or a number of layers (-1 = all), got {setting!r}") from None
    if layers < -1:
        raise UserError(f"n_gpu_layers must be >= -1 (-1 = all layers), got {layers}")
    if layers != 0 and not supports_offload:
        raise UserError(
            f"n_gpu_layers={layers}, but this llama-cpp-python build has no GPU offload; reinstall it with "
            "CMAKE_ARGS=\"-DGGML_CUDA=on\" (see docs/scaling.md) or use n_gpu_layers=0"
        )
    return layers


def offloads() -> bool:
    """Whether models load with layers on a GPU: a build that can offload, and
    LOCALALIGN_GPU_LAYERS not 0 (`gpu_layers`)."""
    module = llama_cpp()
    return gpu_layers("auto", bool(module.llama_supports_gpu_offload()), os.environ.get("LOCALALIGN_GPU_LAYERS")) != 0


def gpu_free_bytes() -> int | None:
    """Free memory of the GPUs llama.cpp sees (summed: it spreads layers and their KV cache over
    them), from ggml's device API; None when it sees none. Integrated GPUs count only when
    there is no discrete one (their memory is the host's)."""
    import ctypes

    from llama_cpp._ggml import libggml as ggml

    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    llama_cpp()  # the backends are registered when llama.cpp loads
    free_by_type: dict[int, int] = {}
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(dev)
        if kind in (GGML_DEVICE_GPU, GGML_DEVICE_IGPU):
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            free_by_type[kind] = free_by_type.get(kind, 0) + free.value
    return free_by_type.get(GGML_DEVICE_GPU, free_by_type.get(GGML_DEVICE_IGPU))


# ggml's enum ggml_backend_dev_type: CPU, GPU, IGPU (integrated, host memory), ACCEL
GGML_DEVICE_GPU, GGML_DEVICE_IGPU = 1, 2


def load_llama(
    gguf_path: str | os.PathLike,
    n_ctx: int = 2048,
    threads: int | None = None,
    logits_all: bool = False,
    lora_path: str | os.PathLike | None = None,
    seed: int = 0,
    vocab_only: bool = False,
    n_batch: int = 512,
    n_gpu_layers: int | str = "auto",
):
    """Load a GGUF with llama-cpp-python; a file llama.cpp cannot load is a UserError.

    `n_gpu_layers`: layers offloaded to the GPU, "auto" = all of them when the build can
    offload (see `gpu_layers`).
    """
    check_gguf_file(gguf_path)
    if lora_path is not None:
        check_gguf_file(lora_path)
    module = llama_cpp()
    threads = threads or default_threads()
    layers = gpu_layers(n_gpu_layers, bool(module.llama_supports_gpu_offload()), os.environ.get("LOCALALIGN_GPU_LAYERS"))
    try:
        return module.Llama(
            model_path=str(gguf_path),
            n_gpu_layers=layers,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            lora_path=str(lora_path) if lora_path else None,
            seed=seed,
            vocab_only=vocab_only,
            verbose=False,
        )
    except (ValueError, RuntimeError) as e:
        what = f"{gguf_path}" + (f" with adapter {lora_path}" if lora_path else "")
        raise UserError(f"llama.cpp could not load {what}: {e}") from None
