"""Near-duplicate groups of images, so that no split holds near-copies of another's images (numpy only).

Photos of one product shot in one session, re-encoded or resized copies and the same packshot
under two ids look alike far more than two photos of one product from different sessions. If
such near-copies sit on both sides of a train/validation split, validation accuracy and every
threshold chosen on it promise more than new photos deliver. ``near_duplicate_groups`` links
every pair of images whose embeddings' cosine similarity reaches a threshold and returns the
connected groups; splits then deal whole groups.
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_COSINE = 0.8  # centred image-tower features; on shelf photos: one session, not merely one product


def near_duplicate_groups(image_emb: np.ndarray, *, threshold: float = NEAR_DUPLICATE_COSINE,
                          block: int = 2048) -> np.ndarray:
    """(n,) group number per image: connected components of the pairs with cosine >= ``threshold``.

    ``image_emb`` is (n, d); rows are centred on their mean (features after a ReLU are all positive,
    which crowds their cosines together) and normalised here. Similarities are computed ``block``
    rows at a time, so memory stays at block x n.
    """
    emb = image_emb - image_emb.mean(axis=0)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    parent = np.arange(len(emb))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(emb), block):
        sims = emb[start : start + block] @ emb.T
        rows, cols = np.nonzero(np.triu(sims >= threshold, k=start + 1))
        for a, b in zip((rows + start).tolist(), cols.tolist()):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(emb))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1]
