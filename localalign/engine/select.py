"""Which backend generates: the embedded llama.cpp generator, or an OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path

from localalign.engine.base import BackendConfig, GenerationConfig, Generator
from localalign.engine.llamacpp import BatchGenerator
from localalign.engine.openai import OpenAIGenerator


def open_generator(
    model: str | Path, config: GenerationConfig, backend: BackendConfig | None = None, lora_path=None
) -> Generator:
    """The generator for `backend` (default: embedded). `model` is the GGUF; for `openai` it
    supplies the tokenizer and chat template (vocab only) of the model the server serves."""
    backend = backend or BackendConfig()
    if backend.kind == "llama-cpp":
        return BatchGenerator(model, config, lora_path=lora_path)
    return OpenAIGenerator(model, config, backend)
