"""Sentence embeddings and a nearest-neighbour index over samples.

Two jobs in the ISARA loop: pick the in-context examples for a new sample (the k nearest
neighbours of a query sample), and tell how close a candidate is to everything already
accepted (novelty). Both use one embedding per sample: its prompt and response together,
because in a domain like safety two near-identical prompts can deserve different answers
(explain vs refuse), and the pair is what the model learns from. MiniLM reads the first
256 word pieces, which covers a prompt and the opening of its response.

Vectors are L2-normalized float32, so the cosine similarity is a dot product and usearch's
"cos" distance is 1 - similarity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from localalign.errors import UserError
from localalign.fsutil import atomic_write, commit_temp, temp_path_for
from localalign.models import DEFAULT_EMBEDDER, embedder_path
from localalign.samples import Sample, iter_jsonl, sample_from_json

INDEX_FILE = "index.usearch"
SAMPLES_FILE = "samples.jsonl"  # sidecar: line i is the sample under key i
META_FILE = "index.json"


def sample_text(sample: Sample) -> str:
    """The text a sample is embedded as."""
    return f"{sample.prompt}\n\n{sample.response}"


class Embedder:
    """A sentence-transformers model on CPU; `embed` returns normalized float32 rows."""

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, batch_size: int = 32):
        path = embedder_path(name_or_path)
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device="cpu", trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the embedder at {path}: {e}") from None
        self.name = name_or_path
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_samples(self, samples: Sequence[Sample]) -> np.ndarray:
        return self.embed([sample_text(s) for s in samples])


class SampleIndex:
    """Samples with their vectors, searchable by cosine similarity (usearch, exact search).

    Exact search: the sets here are hundreds to a few thousand samples, where brute force
    costs microseconds, and novelty decisions should not depend on HNSW's approximation.
    """

    def __init__(self, dim: int):
        from usearch.index import Index

        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.index = Index(ndim=dim, metric="cos", dtype="f32")
        self.samples: list[Sample] = []

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, samples: Sequence[Sample], vectors: np.ndarray) -> None:
        vectors = self._check(vectors)
        if len(samples) != len(vectors):
            raise ValueError(f"{len(samples)} samples but {len(vectors)} vectors")
        if not samples:
            return
        keys = np.arange(len(self.samples), len(self.samples) + len(samples), dtype=np.uint64)
        self.index.add(keys, vectors)
        self.samples.extend(samples)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[Sample, float]]:
        """The k most similar samples, most similar first, with their cosine similarity."""
        vector = self._check(vector)
        if len(vector) != 1:
            raise ValueError("search takes one vector")
        k = min(k, len(self.samples))
        if k <= 0:
            return []
        matches = self.index.search(vector[0], k, exact=True)
        return [(self.samples[int(key)], float(1.0 - d)) for key, d in zip(matches.keys, matches.distances)]

    def vector(self, i: int) -> np.ndarray:
        """The stored vector of sample i (in insertion order)."""
        if not 0 <= i < len(self.samples):
            raise IndexError(f"sample {i} of {len(self.samples)}")
        return np.asarray(self.index.get(i), dtype=np.float32)

    def max_similarity(self, vectors: np.ndarray) -> np.ndarray:
        """For each row, the highest cosine similarity to any indexed sample (-1 if empty)."""
        vectors = self._check(vectors)
        if not self.samples or len(vectors) == 0:
            return np.full(len(vectors), -1.0, dtype=np.float32)
        matches = self.index.search(vectors, 1, exact=True)
        return (1.0 - np.asarray(matches.distances, dtype=np.float32).reshape(len(vectors), -1)[:, 0]).astype(
            np.float32
        )

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {vectors.shape}")
        return np.ascontiguousarray(vectors)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        """Write index file, sample sidecar and metadata into `directory` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(directory / INDEX_FILE)
        self.index.save(str(tmp))
        commit_temp(tmp, directory / INDEX_FILE)
        with atomic_write(directory / SAMPLES_FILE) as f:
            for s in self.samples:
                f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
        with atomic_write(directory / META_FILE) as f:
            json.dump({"dim": self.dim, "count": len(self.samples), "metric": "cos"}, f)

    @classmethod
    def load(cls, directory: str | Path) -> "SampleIndex":
        directory = Path(directory)
        for name in (INDEX_FILE, SAMPLES_FILE, META_FILE):
            if not (directory / name).is_file():
                raise UserError(f"{directory}: not a sample index (missing {name})")
        try:
            meta = json.loads((directory / META_FILE).read_text())
            dim, count = int(meta["dim"]), int(meta["count"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{directory / META_FILE}: unreadable index metadata ({e})") from None
        index = cls(dim)
        path = directory / SAMPLES_FILE
        index.samples = [sample_from_json(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]
        try:
            index.index.load(str(directory / INDEX_FILE))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{directory / INDEX_FILE}: usearch could not load it ({e})") from None
        if len(index.index) != count or len(index.samples) != count:
            raise UserError(
                f"{directory}: index holds {len(index.index)} vectors, sidecar {len(index.samples)} samples, "
                f"metadata says {count}: the files do not belong together"
            )
        if index.index.ndim != dim:
            raise UserError(f"{directory}: index dimension {index.index.ndim} != metadata {dim}")
        return index
