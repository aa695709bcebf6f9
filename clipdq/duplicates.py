"""Duplicate listings: one image under several product ids, found by pixel signatures (torch, polars).

Every usable image has a signature (``images.signature``: the whole image squashed to 32 x 32
RGB). Two listings are duplicates when their images have the same bytes, or when the signature
of one, or a window of it (the other image may be a crop), correlates with the other's at least
``threshold`` (normalised cross-correlation). Measured on the Grocery Store catalog images:
re-encoded and half-size copies score above 0.99, centred crops keeping 80 to 90% of each side
reach 0.99 about half the time, and two distinct products in look-alike packaging at most
0.9825 (docs/benchmarks.md).

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
from clipdq.audit import DUPLICATES_SCHEMA
from clipdq.images import SIGNATURE_BYTES, SIGNATURE_SIZE
from clipdq.splits import connected_components

CANDIDATES = 10  # nearest coarse signatures compared per image
MAX_PAIRS_PER_IMAGE = 32  # an image that is many images' candidate keeps its most similar ones
BLOCK = 256  # images whose windows exist at a time
COARSE = 8  # side of the signatures that propose candidates
FINE = 16  # side of the windows that decide
SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # window sides, as shares of the image's
OFFSETS = 5  # window positions along each axis



def _pixels(signatures: np.ndarray) -> torch.Tensor:
    """(n, 3, S, S) float32 of (n, 3 * S * S) uint8 signatures."""
    return torch.from_numpy(np.asarray(signatures, dtype=np.float32)).reshape(-1, 3, SIGNATURE_SIZE, SIGNATURE_SIZE)


def _centred(images: torch.Tensor, side: int) -> torch.Tensor:
    """(n, 3 * side * side): each image area-resampled to ``side``, minus its mean, unit length."""
    flat = F.interpolate(images, size=(side, side), mode="area").flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-6)


def _windows(images: torch.Tensor) -> torch.Tensor:
    """(n, windows, 3 * FINE * FINE) centred, unit-length: for each scale, the image resampled so
    that a window of that share of its side is FINE pixels, then FINE-pixel windows at up to
    OFFSETS positions along each axis."""
    out = []
    for scale in SCALES:
        side = round(FINE / scale)
        offsets = np.unique(np.linspace(0, side - FINE, OFFSETS).round().astype(int)).tolist()
        resized = F.interpolate(images, size=(side, side), mode="area")
        out += [resized[:, :, y:y + FINE, x:x + FINE].flatten(1) for y in offsets for x in offsets]
    windows = torch.stack(out, dim=1)
    windows = windows - windows.mean(dim=2, keepdim=True)
    return windows / torch.linalg.vector_norm(windows, dim=2, keepdim=True).clamp_min(1e-6)


def candidate_pairs(signatures: np.ndarray, sha256: list[str]) -> np.ndarray:
    """(p, 2) row pairs, both ways round and sorted, whose coarse signatures are among each other's
    nearest (same bytes excluded: those are grouped by their digest); an image that is many
    images' candidate keeps its MAX_PAIRS_PER_IMAGE most similar."""
    coarse = np.concatenate([_centred(_pixels(signatures[i:i + 4096]), COARSE).numpy()
                             for i in range(0, len(signatures), 4096)])
    found = match.top_k(coarse, coarse, k=CANDIDATES, query_keys=sha256, reference_keys=sha256)
    keep = found.indices.ravel() >= 0
    pairs = np.stack([np.repeat(np.arange(len(coarse)), CANDIDATES)[keep], found.indices.ravel()[keep]], axis=1)
    scores = found.scores.ravel()[keep]
    pairs, first = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0, return_index=True)
    scores = np.concatenate([scores, scores])[first]
    order = np.lexsort((-scores, pairs[:, 0]))  # by image, the most similar first
    rank = np.arange(len(order)) - np.searchsorted(pairs[order, 0], pairs[order, 0])
    return np.unique(pairs[order][rank < MAX_PAIRS_PER_IMAGE], axis=0)


def pair_similarity(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(p,) for each (a, b) of the sorted ``pairs``: the best correlation between a window of a and
    the whole of b; BLOCK images' windows at a time, each against its own candidates."""
    out = np.zeros(len(pairs), np.float32)
    for start in range(0, len(signatures), BLOCK):
        lo, hi = np.searchsorted(pairs[:, 0], [start, start + BLOCK])
        if lo == hi:
            continue
        block = pairs[lo:hi]
        rows = torch.from_numpy(block[:, 0] - start)
        slots = torch.from_numpy(np.arange(hi - lo) - np.searchsorted(block[:, 0], block[:, 0]))
        windows = _windows(_pixels(signatures[start:start + BLOCK]))  # (images, windows, values)
        others = torch.zeros(len(windows), int(slots.max()) + 1, windows.shape[2])
        others[rows, slots] = _centred(_pixels(signatures[block[:, 1]]), FINE)
        out[lo:hi] = torch.bmm(windows, others.transpose(1, 2)).amax(dim=1)[rows, slots].numpy()
    return out


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
    scores = either_way(pairs, scores)
    pairs, scores = pairs[scores >= threshold], scores[scores >= threshold]
    digests = pl.Series(sha256).cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    same = _same_bytes(digests)
    roots = connected_components(n, np.concatenate([pairs, same]))
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


def either_way(pairs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The better of each sorted pair's score and its reverse's where both were scored: a crop
    matches a window of its original, not the other way round."""
    base = int(pairs.max(initial=0)) + 1
    keys = pairs[:, 0] * base + pairs[:, 1]
    at = np.minimum(np.searchsorted(keys, pairs[:, 1] * base + pairs[:, 0]), max(len(pairs) - 1, 0))
    found = keys[at] == pairs[:, 1] * base + pairs[:, 0] if len(pairs) else np.zeros(0, bool)
    return np.where(found, np.maximum(scores, scores[at]), scores)


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
    signatures = np.frombuffer(b"".join(images["signature"].to_list()), np.uint8).reshape(-1, SIGNATURE_BYTES)
    return find(images["product_id"].to_list(), images["sha256"].to_list(), signatures, threshold=threshold)



def flag_near_identical(matches: pl.DataFrame, references: match.Embedded, queries: match.Embedded, *,
                        threshold: float) -> tuple[pl.DataFrame, dict]:
    """(``matches`` with each ranked pair whose query and reference images are near-identical
    pixels, at ``threshold`` as for duplicate listings, marked in its detail; what the summary
    says of them). The same photo on both sides says nothing of the model."""
    ranked = matches["rank"].is_not_null().to_numpy()
    query_row = {pid: i for i, pid in enumerate(np.array(queries.ids, dtype=object)[queries.ok])}
    reference_row = {pid: i for i, pid in enumerate(np.array(references.ids, dtype=object)[references.ok])}
    q = np.array([query_row[pid] for pid in matches["query_id"].filter(ranked)], dtype=np.int64)
    r = np.array([reference_row[pid] for pid in matches["reference_id"].filter(ranked)], dtype=np.int64)
    used = np.unique(r)
    signatures = np.concatenate([queries.signatures, references.signatures[used]])
    pairs = np.stack([q, len(queries.signatures) + np.searchsorted(used, r)], axis=1)
    both = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)
    scores = either_way(both, pair_similarity(signatures, both)) if len(both) else np.zeros(0, np.float32)
    base = int(both.max(initial=0)) + 1
    at = np.searchsorted(both[:, 0] * base + both[:, 1], pairs[:, 0] * base + pairs[:, 1])
    similarity = np.full(matches.height, np.nan, np.float32)
    similarity[ranked] = scores[at] if len(at) else []
    near = np.flatnonzero(similarity >= threshold)
    detail = matches["detail"].to_list()
    for i in near:
        detail[i] = f"near-identical pixels (similarity {similarity[i]:.4f}): this query shows the reference's own image"
    return matches.with_columns(detail=pl.Series(detail, dtype=pl.String)), {
        "threshold": threshold, "pairs": len(near), "queries": matches["query_id"][near].n_unique()}
