"""The approximate index of product matching (faiss's inverted lists) against the exact search:
recall on clustered embeddings, same-byte references left out, and when ``search`` picks it."""

from __future__ import annotations

import numpy as np
import pytest

from clipdq import index, match


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float = 0.8) -> np.ndarray:
    """Photos of products: each embedding a product's centre plus noise, as image embeddings cluster."""
    picks = rng.integers(0, len(centres), n)
    return centres[picks] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)


def test_approximate_top_k_finds_what_the_exact_search_finds() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, 64), dtype=np.float32)
    references, queries = clustered(rng, centres, 20000, 0.4), clustered(rng, centres, 300, 0.4)
    exact = match.top_k(queries, references, k=5)
    approximate = index.top_k(queries, references, k=5)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approximate.indices, exact.indices)])
    assert recall >= 0.9, recall
    right = approximate.indices == exact.indices
    np.testing.assert_allclose(approximate.scores[right], exact.scores[right], atol=0.02)  # 8-bit vectors
    assert (np.diff(approximate.scores, axis=1) <= 1e-6).all()  # best first


def test_approximate_top_k_leaves_out_the_querys_own_bytes() -> None:
    rng = np.random.default_rng(1)
    references = rng.standard_normal((3000, 32), dtype=np.float32)
    digests = [f"sha-{i}" for i in range(3000)]
    found = index.top_k(references[:10], references, k=3, query_keys=digests[:10], reference_keys=digests)
    assert found.excluded.tolist() == [1] * 10
    assert all(q not in found.indices[q] for q in range(10))
    assert (found.indices >= 0).all()


def test_approximate_top_k_with_fewer_references_than_k() -> None:
    found = index.top_k(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2], k=4)
    assert sorted(found.indices[0, :2].tolist()) == [0, 1] and found.indices[0, 2:].tolist() == [-1, -1]
    assert np.isneginf(found.scores[:, 2:]).all()
    empty = index.top_k(np.eye(3, dtype=np.float32), np.zeros((0, 3), np.float32), k=2)
    assert (empty.indices == -1).all()


def embedded(embeddings: np.ndarray, prefix: str) -> match.Embedded:
    n = len(embeddings)
    return match.Embedded(ids=[f"{prefix}{i}" for i in range(n)], sha256=[f"{prefix}-sha-{i}" for i in range(n)],
                          errors=[None] * n, embeddings=embeddings)


def test_search_auto_goes_approximate_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    references = embedded(rng.standard_normal((500, 16), dtype=np.float32), "r")
    queries = embedded(rng.standard_normal((20, 16), dtype=np.float32), "q")
    assert match.match_embedded(references, queries, k=3, search="auto")[1]["search"] == "exact"
    monkeypatch.setattr(match, "APPROXIMATE_ABOVE", 499)
    matches, summary = match.match_embedded(references, queries, k=3, search="auto")
    assert summary["search"] == "approximate" and matches.height == 60
    agreement = match.ValueAgreement(["a"], [np.eye(16, dtype=np.float32)[:2]], [10.0], [np.zeros(500, np.int64)])
    with pytest.raises(ValueError, match="exact search"):
        match.match_embedded(references, queries, k=3, search="approximate", agreement=agreement)
