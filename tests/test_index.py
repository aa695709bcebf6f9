"""The approximate index of product matching (faiss's inverted lists) against the exact search:
recall on clustered embeddings, same-byte references left out, and when ``search`` picks it."""

from __future__ import annotations

import numpy as np
import pytest
from test_match import agreement_of, embedded

from clipdq.checks import index, match, neighbours
from clipdq.io import storage


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float = 0.8) -> np.ndarray:
    """Photos of products: each embedding a product's centre plus noise, as image embeddings cluster."""
    picks = rng.integers(0, len(centres), n)
    return centres[picks] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)


def test_approximate_top_k_finds_what_the_exact_search_finds() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, 64), dtype=np.float32)
    references, queries = clustered(rng, centres, 20000, 0.4), clustered(rng, centres, 300, 0.4)
    exact = neighbours.top_k(queries, references, k=5)
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


def test_search_auto_goes_approximate_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    references = embedded(rng.standard_normal((500, 16), dtype=np.float32), "r")
    queries = embedded(rng.standard_normal((20, 16), dtype=np.float32), "q")
    assert match.match_embedded(references, queries, k=3, search="auto")[1]["search"] == "exact"
    monkeypatch.setattr(match, "APPROXIMATE_ABOVE", 499)
    matches, summary = match.match_embedded(references, queries, k=3, search="auto")
    assert summary["search"] == "approximate" and matches.height == 60


def test_candidates_rescored_with_the_agreement_rank_as_the_exact_search_ranks() -> None:
    rng = np.random.default_rng(3)
    queries, references = rng.normal(size=(40, 16)), rng.normal(size=(90, 16))
    agreement = agreement_of(rng, 90, 16)
    exact = neighbours.top_k(queries, references, k=5, agreement=agreement)
    shuffled = np.stack([rng.permutation(90) for _ in range(40)])  # every reference a candidate, in any order
    shuffled[:, -1] = -1  # and a missing candidate, as the index leaves when its cells hold too few
    candidates = neighbours.Neighbours(shuffled, np.zeros((40, 90), np.float32), np.zeros(40, np.int64))
    rescored = neighbours.rescore(candidates, queries, references, agreement, k=5, query_block=16)
    left_out = np.array([set(exact.indices[q]) - set(shuffled[q]) for q in range(40)], dtype=object)
    same = np.array([not gone for gone in left_out])  # queries whose exact top 5 are all candidates
    assert same.sum() > 30
    np.testing.assert_array_equal(rescored.indices[same], exact.indices[same])
    np.testing.assert_allclose(rescored.scores[same], exact.scores[same], rtol=1e-4, atol=1e-4)


def test_approximate_search_with_the_agreement_rescores_the_images_candidates() -> None:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((100, 16), dtype=np.float32)
    references = embedded(clustered(rng, centres, 3000, 0.5), "r")
    queries = embedded(clustered(rng, centres, 50, 0.5), "q")
    agreement = agreement_of(rng, 3000, 16, weight=0.05)
    exact, _ = match.match_embedded(references, queries, k=3, search="exact", agreement=agreement)
    approximate, summary = match.match_embedded(references, queries, k=3, search="approximate", agreement=agreement)
    assert (
        summary["search"] == "approximate"
        and summary["approximate_index"]["candidates_rescored"] == match.RESCORED_CANDIDATES
    )
    assert approximate.height == 150
    both = approximate.join(exact, on=["query_id", "rank"], suffix="_exact")
    assert (both["reference_id"] == both["reference_id_exact"]).mean() >= 0.9


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_built_index_is_kept_and_read_while_the_references_stay_the_same(where, tmp_path, request) -> None:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((50, 16), dtype=np.float32)
    references = embedded(clustered(rng, centres, 4000, 0.5), "r")
    queries = embedded(clustered(rng, centres, 30, 0.5), "q")
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    folder = storage.join(root, "approximate_index")
    runs = [match.match_embedded(references, queries, k=3, search="approximate", index_folder=folder) for _ in range(2)]
    assert [summary["approximate_index"]["read_from_an_earlier_run"] for _, summary in runs] == [False, True]
    assert runs[0][0].equals(runs[1][0])
    first = storage.list_files(folder)
    assert len(first) == 1 and first[0].endswith(".faiss")

    storage.write_bytes(storage.join(folder, first[0]), b"not an index")  # unreadable: built again, not a failure
    again, summary = match.match_embedded(references, queries, k=3, search="approximate", index_folder=folder)
    assert not summary["approximate_index"]["read_from_an_earlier_run"] and again.equals(runs[0][0])

    references.sha256[0] = "another image"  # a reference changed: a new index, and the old one goes
    _, summary = match.match_embedded(references, queries, k=3, search="approximate", index_folder=folder)
    assert not summary["approximate_index"]["read_from_an_earlier_run"]
    kept = storage.list_files(folder)
    assert len(kept) == 1 and kept != first
