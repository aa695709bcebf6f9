"""Train / validation / test splits and folds, stratified and group-aware, and the near-duplicate
groups that keep near-copies of an image on one side (numpy only).

``labels`` map attribute -> (n,) value indices with -1 where unknown; ``groups`` are (n,) keys of
rows that must share a split.

Photos of one product shot in one session, re-encoded or resized copies and the same packshot
under two ids look alike far more than two photos of one product from different sessions. If
such near-copies sit on both sides of a train/validation split, validation accuracy and every
threshold chosen on it promise more than new photos deliver. ``near_duplicate_groups`` links
every pair of images whose embeddings' cosine similarity reaches a threshold and returns the
connected groups; splits then deal whole groups.
"""

from __future__ import annotations

import numpy as np

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]  # (train, val, test) row indices
NEAR_DUPLICATE_COSINE = 0.8  # centred image-tower features; on shelf photos: one session, not merely one product


def near_duplicate_groups(
    image_emb: np.ndarray, *, threshold: float = NEAR_DUPLICATE_COSINE, block: int = 2048
) -> np.ndarray:
    """(n,) group number per image: connected components of the pairs with cosine >= ``threshold``.

    ``image_emb`` is (n, d); rows are centred on their mean (features after a ReLU are all positive,
    which crowds their cosines together) and normalised here. Similarities are computed ``block``
    rows at a time, so memory stays at block x n.
    """
    emb = image_emb - image_emb.mean(axis=0)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(emb), block):
        rows, cols = np.nonzero(np.triu(emb[start : start + block] @ emb.T >= threshold, k=start + 1))
        pairs.append(np.stack([rows + start, cols], axis=1))
    roots = connected_components(len(emb), np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))
    return np.unique(roots, return_inverse=True)[1]


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) the smallest row of each row's component, given (p, 2) linked row pairs (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def _stratified_order(labels: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row indices sorted by their label combination over all attributes, random within one."""
    n = len(next(iter(labels.values())))
    keys = np.stack([labels[name] for name in sorted(labels)] + [rng.random(n)], axis=1)
    return np.lexsort(keys.T[::-1])


def _by_group(labels: dict[str, np.ndarray], groups: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(labels of each group's first row, group index per row); without groups every row is its own."""
    if groups is None:
        n = len(next(iter(labels.values())))
        return labels, np.arange(n)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return {name: values[first] for name, values in labels.items()}, inverse


def fold_of(labels: dict[str, np.ndarray], *, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(n,) fold number in 0..k-1 per row, stratified on the joint labels like ``split_indices``;
    rows of one group share a fold."""
    group_labels, row_group = _by_group(labels, groups)
    order = _stratified_order(group_labels, np.random.default_rng(seed))
    folds = np.empty(len(order), dtype=int)
    folds[order] = np.arange(len(order)) % k
    return folds[row_group]


def split_indices(
    labels: dict[str, np.ndarray],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    train_only: np.ndarray | None = None,
) -> Splits:
    """(train, val, test) row indices, stratified on the joint labels of all attributes.

    Groups of rows are ordered by their label combination (random within one), then each is dealt
    to the split furthest below its share of the rows dealt so far, so every combination is spread
    over the splits in proportion, and a split's share of rows holds even when groups differ in
    size. With ``groups``, whole groups are dealt (stratified on their first row), so
    near-duplicate images of one product family or photo session never land on two sides;
    without, each row is its own group. ``train_only``: (n,) rows that only train; their groups
    join the training split and the shares apply to the other rows. Validation gets at least one group.
    """
    rng = np.random.default_rng(seed)
    group_labels, row_group = _by_group(labels, groups)
    order = _stratified_order(group_labels, rng)
    sizes = np.bincount(row_group, minlength=len(order))
    if train_only is not None:
        order = order[~np.isin(order, row_group[train_only])]
        if not len(order):
            raise ValueError("every labeled row is train-only: none is left to validate and calibrate on")
    shares = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    dealt, assigned = np.zeros(3), np.zeros(len(sizes), dtype=int)  # train unless dealt elsewhere
    for group in order:
        split = int(np.argmax(shares * (dealt.sum() + sizes[group]) - dealt))
        assigned[group] = split
        dealt[split] += sizes[group]
    if not (assigned == 1).any():
        assigned[order[0]] = 1
    assigned = assigned[row_group]
    return np.flatnonzero(assigned == 0), np.flatnonzero(assigned == 1), np.flatnonzero(assigned == 2)
