"""The engine turns token ids into tokens: it knows nothing of ISARA or of evaluation.

base.py      the settings, the `Generator` interface and `Completion`, shared by every backend
runtime.py   how llama.cpp is loaded in this process (threads, GPU layers)
llamacpp.py  the embedded backend: many sequences per forward pass; continuation log-probs
openai.py    the backend that asks an OpenAI-compatible server
process.py   either of the two in an engine process of its own (no torch there), and the parity probe
select.py    `open_generator`: one of the two, by `BackendConfig`, in its engine process
local_server.py  llama-cpp-python's own server on a free port (tests, benchmarks, trying it out)
"""
