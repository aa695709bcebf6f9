"""Duplicate listings: one image under several product ids, found by pixel signatures (torch, polars).

Every usable image has a signature (``images.signature``: the whole image squashed to 32 x 32
RGB). Two listings are duplicates when their images have the same bytes, or when the signature
of one, or a window of it (the other image may be a crop), correlates with the other's at least
``threshold`` (normalised cross-correlation). Measured on the Grocery Store catalog images:
re-encoded and half-size copies score at least 0.99, crops keeping 70 to 90% of each side mostly
0.95 to 0.99, and distinct products in look-alike packaging at most 0.97 (docs/benchmarks.md).

Bounded in memory and never all pairs: each image's ``CANDIDATES`` nearest signatures at 8 x 8
pixels are found blockwise (``match.top_k``), and only those pairs are compared window by
window, ``BLOCK`` images at a time. Pairs join into groups (connected components), so three
copies make one group.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from clipdq import match
from clipdq.images import SIGNATURE_SIZE

CANDIDATES = 10  # nearest coarse signatures compared per image
MAX_PAIRS_PER_IMAGE = 64  # an image that is many images' candidate keeps its most similar ones
BLOCK = 256  # images whose windows exist at a time
PAIR_CHUNK = 512  # pairs compared at a time: 512 x 76 windows x 768 values
COARSE = 8  # side of the signatures that propose candidates
FINE = 16  # side of the windows that decide
SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # window sides, as shares of the image's
OFFSETS = 5  # window positions along each axis

DUPLICATES_SCHEMA = {"group": pl.Int64, "product_id": pl.String, "group_size": pl.Int32, "other_id": pl.String,
                     "similarity": pl.Float32, "kind": pl.String}


def _pixels(signatures: np.ndarray) -> torch.Tensor:
    """(n, 3, S, S) float32 of (n, 3 * S * S) uint8 signatures."""
    return torch.from_numpy(np.asarray(signatures, dtype=np.float32)).reshape(-1, 3, SIGNATURE_SIZE, SIGNATURE_SIZE)


def _centred(images: torch.Tensor, side: int) -> torch.Tensor:
    """(n, 3 * side * side): each image area-resampled to ``side``, minus its mean, unit length."""
    flat = F.interpolate(images, size=(side, side), mode="area").flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-6)


def _windows(images: torch.Tensor) -> torch.Tensor:
    """(n, windows, 3 * FINE * FINE): every window of every scale and offset, as ``_centred``."""
    out = []
    for scale in SCALES:
        side = round(SIGNATURE_SIZE * scale)
        offsets = np.linspace(0, SIGNATURE_SIZE - side, OFFSETS if side < SIGNATURE_SIZE else 1).round().astype(int)
        for y in offsets:
            for x in offsets:
                out.append(_centred(images[:, :, y:y + side, x:x + side], FINE))
    return torch.stack(out, dim=1)


def candidate_pairs(signatures: np.ndarray, sha256: list[str]) -> np.ndarray:
    """(p, 2) row pairs, both ways round, whose coarse signatures are among each other's nearest
    (same bytes excluded: those are grouped by their digest)."""
    coarse = np.concatenate([_centred(_pixels(signatures[i:i + 4096]), COARSE).numpy()
                             for i in range(0, len(signatures), 4096)]) if len(signatures) else np.zeros((0, 1))
    found = match.top_k(coarse, coarse, k=CANDIDATES, query_keys=sha256, reference_keys=sha256)
    rows = np.repeat(np.arange(len(coarse)), CANDIDATES)
    keep = found.indices.ravel() >= 0
    pairs = np.stack([rows[keep], found.indices.ravel()[keep]], axis=1)
    return np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)


def pair_similarity(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(p,) for each (a, b): the best correlation between a window of a and the whole of b."""
    out = np.zeros(len(pairs), np.float32)
    for start in range(0, len(signatures), BLOCK):
        here = np.flatnonzero((pairs[:, 0] >= start) & (pairs[:, 0] < start + BLOCK))
        if not len(here):
            continue
        windows = _windows(_pixels(signatures[start:start + BLOCK]))
        for chunk in np.array_split(here, -(-len(here) // PAIR_CHUNK)):
            wholes = _centred(_pixels(signatures[pairs[chunk, 1]]), FINE)
            windows_a = windows[torch.from_numpy(pairs[chunk, 0] - start)]
            out[chunk] = torch.einsum("pwd,pd->pw", windows_a, wholes).amax(dim=1).numpy()
    return out


def _limit(pairs: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's MAX_PAIRS_PER_IMAGE best-scoring pairs (a hub stays bounded)."""
    order = np.lexsort((-scores, pairs[:, 0]))
    pairs, scores = pairs[order], scores[order]
    first = np.searchsorted(pairs[:, 0], pairs[:, 0], side="left")
    keep = np.arange(len(pairs)) - first < MAX_PAIRS_PER_IMAGE
    return pairs[keep], scores[keep]


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
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


def find(ids: list[str], sha256: list[str], signatures: np.ndarray, *, threshold: float) -> pl.DataFrame:
    """Duplicate listings (DUPLICATES_SCHEMA) among images ``ids`` with their digests and (n, 3 * S * S)
    uint8 ``signatures``: one row per product in a group of two or more, with its most similar
    other product, their similarity (1 for the same bytes) and its kind (identical bytes, or
    near-identical pixels: re-encoded, resized, cropped)."""
    n = len(ids)
    if n < 2:
        return pl.DataFrame(schema=DUPLICATES_SCHEMA)
    pairs = candidate_pairs(signatures, sha256)
    scores = pair_similarity(signatures, pairs)
    scores = np.maximum(scores, scores[_reverse_index(pairs)])  # a crop either way round
    pairs, scores = _limit(pairs[scores >= threshold], scores[scores >= threshold])
    digests = pl.Series(sha256).cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    same = _same_bytes(digests)
    roots = _components(n, np.concatenate([pairs, same]))
    sizes = np.bincount(roots, minlength=n)
    best = _best_other(n, np.concatenate([pairs, same, same[:, ::-1]]),
                       np.concatenate([scores, np.ones(2 * len(same), np.float32)]))
    members = np.flatnonzero(sizes[roots] >= 2)
    other = best[0][members]
    identical = digests[members] == digests[other]
    return pl.DataFrame({
        "group": np.unique(roots[members], return_inverse=True)[1].astype(np.int64),
        "product_id": [ids[i] for i in members], "group_size": sizes[roots[members]].astype(np.int32),
        "other_id": [ids[i] for i in other], "similarity": best[1][members].astype(np.float32),
        "kind": np.where(identical, "identical bytes", "near-identical pixels").tolist(),
    }, schema=DUPLICATES_SCHEMA).sort("group", "product_id")


def _reverse_index(pairs: np.ndarray) -> np.ndarray:
    """Position of (b, a) for each (a, b) of ``pairs``, which holds both (sorted, unique)."""
    base = int(pairs.max(initial=0)) + 1
    return np.searchsorted(pairs[:, 0] * base + pairs[:, 1], pairs[:, 1] * base + pairs[:, 0])


def _same_bytes(digests: np.ndarray) -> np.ndarray:
    """(p, 2) pairs linking each image to the first image of the same digest."""
    first = {}
    pairs = [(first.setdefault(code, i), i) for i, code in enumerate(digests.tolist()) if first.setdefault(code, i) != i]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _best_other(n: int, pairs: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(most similar other row, its similarity) of every row; (itself, 0) where it has none."""
    other, best = np.arange(n), np.zeros(n, np.float32)
    order = np.argsort(scores, kind="stable")  # the best last: it wins the assignment
    other[pairs[order, 0]], best[pairs[order, 0]] = pairs[order, 1], scores[order]
    return other, best


def of_images(images: pl.DataFrame, *, threshold: float) -> pl.DataFrame:
    """``find`` over an audit's usable images (audit.IMAGES_SCHEMA)."""
    signatures = np.frombuffer(b"".join(images["signature"].to_list()), np.uint8).reshape(images.height, -1)
    return find(images["product_id"].to_list(), images["sha256"].to_list(), signatures, threshold=threshold)

