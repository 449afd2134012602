"""`GenerationConfig.parallel`: a number, or "auto" (32 on a CPU; on a GPU, as many sequences as
their KV caches fit in its free memory). The choice with numbers, the config and CLI forms, and
the generator resolving it with a pretend GPU."""

from __future__ import annotations

import pytest

from localalign.config import from_dict, read_toml, to_toml
from localalign.engine.base import (
    CPU_PARALLEL,
    GPU_COMPUTE_RESERVE,
    MAX_PARALLEL,
    GenerationConfig,
    auto_parallel,
    kv_bytes_per_sequence,
)
from localalign.errors import UserError

GB = 10**9
# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, f16 cache, 2048 tokens per sequence
SMOLLM2_SEQ = kv_bytes_per_sequence(2048, 30, 3, 64, 64)


def test_kv_cache_per_sequence_for_the_default_model():
    assert SMOLLM2_SEQ == 2048 * 30 * 3 * 128 * 2 == 47_185_920


def test_auto_parallel_fills_free_gpu_memory_up_to_the_cap():
    assert auto_parallel(None, SMOLLM2_SEQ, 512) == CPU_PARALLEL == 32
    assert auto_parallel(70 * GB, SMOLLM2_SEQ, 512) == MAX_PARALLEL == 255  # an H100: the cap
    # an 8 GB card with 7 GB free: 80% of it less 1 GiB of compute buffers, one sequence for the prefix
    assert auto_parallel(7 * GB, SMOLLM2_SEQ, 512) == (int(7 * GB * 0.8) - GPU_COMPUTE_RESERVE) // SMOLLM2_SEQ - 1 == 94
    assert auto_parallel(2 * GB, SMOLLM2_SEQ, 512) == 10
    assert auto_parallel(GB // 2, SMOLLM2_SEQ, 512) == 1  # never none
    assert auto_parallel(70 * GB, SMOLLM2_SEQ, 64) == 63  # each decode holds a token of every sequence
    assert auto_parallel(None, SMOLLM2_SEQ, 16) == 15


def test_parallel_is_a_number_or_auto():
    assert GenerationConfig().parallel == "auto"
    assert GenerationConfig(parallel=MAX_PARALLEL).parallel == 255
    for bad in (0, 256, "many", True, 2.0):
        with pytest.raises(UserError, match="parallel"):
            GenerationConfig(parallel=bad)
    with pytest.raises(UserError, match="n_batch"):
        GenerationConfig(parallel=64, n_batch=64)


def test_parallel_in_toml_and_back(tmp_path):
    for value in ("auto", 128):
        path = tmp_path / f"{value}.toml"
        path.write_text(to_toml({"parallel": value}))
        assert from_dict(GenerationConfig, read_toml(path)).parallel == value
    with pytest.raises(UserError, match="parallel"):
        from_dict(GenerationConfig, {"parallel": "wide"})


def test_cli_parallel_takes_auto_or_a_number():
    from click.testing import CliRunner

    from localalign.cli import main, parallel_setting

    assert parallel_setting("auto") == "auto" and parallel_setting("64") == 64 and parallel_setting(None) is None
    r = CliRunner().invoke(main, ["generate", "--seeds", "s.jsonl", "--n", "1", "--out", "o.jsonl", "--parallel", "wide"])
    assert r.exit_code == 2 and "neither a number nor 'auto'" in r.output


def test_generator_resolves_auto_on_a_cpu_and_on_a_pretend_gpu(tiny_gguf, monkeypatch):
    """On this CPU-only build "auto" is 32; with llama.cpp offloading and a GPU's free memory
    faked, the generator sizes itself from the model's KV cache, and decodes that wide."""
    import localalign.engine.llamacpp as llamacpp
    from localalign.engine.llamacpp import BatchGenerator

    cfg = GenerationConfig(threads=1, n_ctx=256, max_tokens=8, temperature=0)
    with BatchGenerator(tiny_gguf, cfg) as g:
        assert g.parallel == CPU_PARALLEL and g.n_seq == 33
        want = g.complete(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"] * 3)
        lib = g.lib
        per_seq = kv_bytes_per_sequence(256, lib.llama_model_n_layer(g.model), lib.llama_model_n_head_kv(g.model),
                                        16, 16)
    free = GPU_COMPUTE_RESERVE * 2
    monkeypatch.setattr(llamacpp, "offloads", lambda: True)
    monkeypatch.setattr(llamacpp, "gpu_free_bytes", lambda: free)
    with BatchGenerator(tiny_gguf, cfg) as g:
        assert per_seq == 256 * 2 * 2 * 32 * 2  # the tiny model: 2 layers, 2 KV heads of 16 dims
        assert g.parallel == auto_parallel(free, per_seq, cfg.n_batch) == MAX_PARALLEL
        assert g.complete(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"] * 3) == want
    monkeypatch.setattr(llamacpp, "gpu_free_bytes", lambda: (GPU_COMPUTE_RESERVE + 40 * per_seq) * 5 // 4 + 8)
    with BatchGenerator(tiny_gguf, cfg) as g:
        assert g.parallel == 39  # 40 KV caches fit: one is the prefix's
