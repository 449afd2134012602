"""Which backend generates, and where: the generator `align`, `generate`, `eval` and `chat` use.

Every backend runs in an engine process of its own (process.py), so llama.cpp never shares a
process with torch: the embedded llama.cpp generator, or the OpenAI-compatible server's client
(which loads the GGUF's vocabulary with llama.cpp for its tokens and chat template). The
in-process classes (llamacpp.BatchGenerator, openai.OpenAIGenerator) are what that process
hosts; outside it they are built directly only by their own tests and by the benchmarks that
measure the engine itself (bench/bench_generate.py and its kin, bench_engine_process.py for the
cost of the boundary), where no torch is in the process.
"""

from __future__ import annotations

from pathlib import Path

from localalign.engine.base import BackendConfig, GenerationConfig, Generator
from localalign.engine.process import ProcessGenerator


def open_generator(
    model: str | Path, config: GenerationConfig, backend: BackendConfig | None = None, lora_path=None
) -> Generator:
    """The generator for `backend` (default: embedded), in its engine process. `model` is the
    GGUF; for `openai` it supplies the tokenizer and chat template (vocab only) of the model the
    server serves, and `lora_path` applies to the embedded backend only."""
    return ProcessGenerator(model, config, backend or BackendConfig(), lora_path=lora_path)
