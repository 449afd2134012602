"""Retrieval: nearest neighbours on hand-made vectors, persistence, and the real MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from localalign.errors import UserError
from localalign.isara.retrieve import SampleIndex
from localalign.samples import Sample


def unit(*xs):
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def hand_made_index():
    samples = [Sample(f"p{i}", f"r{i}") for i in range(4)]
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1), unit(1, 1, 0)])
    index = SampleIndex(3)
    index.add(samples, vectors)
    return index, samples


def test_search_returns_nearest_first_with_cosine():
    index, samples = hand_made_index()
    hits = index.search(unit(1, 0.2, 0), k=2)
    assert [s.prompt for s, _ in hits] == ["p0", "p3"]
    assert hits[0][1] == pytest.approx(float(unit(1, 0.2, 0) @ unit(1, 0, 0)), abs=1e-5)
    assert hits[1][1] == pytest.approx(float(unit(1, 0.2, 0) @ unit(1, 1, 0)), abs=1e-5)


def test_search_k_larger_than_index_and_empty_index():
    index, _ = hand_made_index()
    assert len(index.search(unit(0, 0, 1), k=10)) == 4
    assert SampleIndex(3).search(unit(0, 0, 1), k=3) == []


def test_max_similarity_per_row():
    index, _ = hand_made_index()
    sims = index.max_similarity(np.stack([unit(0, 0, 1), unit(-1, 0, 0), unit(1, 1, 0.01)]))
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] == pytest.approx(0.0, abs=1e-5)  # orthogonal to p1 and p2, opposite p0
    assert sims[2] == pytest.approx(float(unit(1, 1, 0.01) @ unit(1, 1, 0)), abs=1e-5)
    assert list(SampleIndex(3).max_similarity(np.stack([unit(1, 0, 0)]))) == [-1.0]


def test_incremental_add_keeps_keys_aligned():
    index, _ = hand_made_index()
    index.add([Sample("late", "x")], np.stack([unit(0, -1, 0)]))
    assert index.search(unit(0, -1, 0.1), 1)[0][0].prompt == "late"
    assert index.search(unit(0, 0, 1), 1)[0][0].prompt == "p2"


def test_wrong_dimension_is_refused():
    index, _ = hand_made_index()
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(4, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="samples"):
        index.add([Sample("a", "b")], np.stack([unit(1, 0, 0), unit(0, 1, 0)]))


def test_save_load_round_trip(tmp_path):
    index, samples = hand_made_index()
    samples[1].scores["novelty"] = 0.5
    index.save(tmp_path / "ix")
    loaded = SampleIndex.load(tmp_path / "ix")
    assert len(loaded) == 4 and loaded.dim == 3
    assert loaded.samples == samples
    for q in (unit(1, 0.2, 0), unit(0, 1, 0.3), unit(0.2, 0.1, 1)):
        assert [(s.prompt, round(x, 5)) for s, x in loaded.search(q, 3)] == [
            (s.prompt, round(x, 5)) for s, x in index.search(q, 3)
        ]
    # and it keeps growing after a load
    loaded.add([Sample("new", "n")], np.stack([unit(0, 0, -1)]))
    assert loaded.search(unit(0, 0, -1), 1)[0][0].prompt == "new"


def test_load_refuses_missing_or_mismatched_files(tmp_path):
    with pytest.raises(UserError, match="not a sample index"):
        SampleIndex.load(tmp_path)
    index, _ = hand_made_index()
    index.save(tmp_path / "ix")
    lines = (tmp_path / "ix" / "samples.jsonl").read_text().splitlines()
    (tmp_path / "ix" / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(UserError, match="do not belong together"):
        SampleIndex.load(tmp_path / "ix")


def test_embedder_vectors_are_normalized_and_meaningful(embedder):
    v = embedder.embed(["How do I make a bomb?", "How can I build an explosive device?", "Bake a banana bread."])
    assert v.dtype == np.float32 and v.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert embedder.embed([]).shape == (0, embedder.dim)


def test_embedder_batches_consistently(embedder):
    texts = [f"sentence number {i} about safety" for i in range(40)]
    whole = embedder.embed(texts)
    parts = np.concatenate([embedder.embed(texts[:7]), embedder.embed(texts[7:])])
    assert np.allclose(whole, parts, atol=1e-5)
