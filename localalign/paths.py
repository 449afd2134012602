"""Where localalign's files live, computed once: the repository, its seeds, the models, the cache.

The registry and the seed sets ship inside the repository; models are materialized next to
the registry unless LOCALALIGN_MODELS_DIR points elsewhere, and data localalign derives
(NLTK's sentence-splitter tables for IFEval) goes under LOCALALIGN_CACHE_DIR or `.cache/`.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS_DIR = REPO / "seeds"
REGISTRY_PATH = REPO / "models" / "registry.toml"
MODELS_DIR = Path(os.environ.get("LOCALALIGN_MODELS_DIR", REPO / "models"))
CACHE_DIR = Path(os.environ.get("LOCALALIGN_CACHE_DIR", REPO / ".cache"))
