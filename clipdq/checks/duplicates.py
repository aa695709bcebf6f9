"""Duplicate listings: one image under several product ids, found by pixel signatures (torch, polars).

Every usable image has a signature (``images.signature``: the whole image squashed to 32 x 32
RGB). Two listings are duplicates when their images have the same bytes, or when the signature
of one, or a window of it (the other image may be a crop), correlates with the other's at least
``threshold`` (normalised cross-correlation). Measured on the Grocery Store catalog images:
re-encoded and half-size copies score above 0.99, and so do crops keeping 80% of each side
(centred or not) and most keeping 70%; two distinct products in look-alike packaging at most
0.983 (docs/benchmarks.md).

Bounded in memory and never all pairs: the signatures may be a memory map (an audit writes
its shards' signatures to a file and maps it: ``shards.read_images``), read in blocks; each
image's ``CANDIDATES`` nearest images by its signature at 8 x 8 pixels, and as many by its colour
histogram (which a crop keeps where its whole-image signature does not), are found blockwise
(``neighbours.top_k``; past APPROXIMATE_CANDIDATES_ABOVE images, faiss's inverted lists), and only those pairs
are compared: windows of one image on a grid of sides and positions, ``BLOCK`` images at a time,
then the best window of each close pair moved and resized in small steps until no step improves
it (a crop is seldom exactly on the grid). Pairs join into groups (connected components), so
three copies make one group. The way round that scores best says which image is the crop; its
window's area, how much the crop keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from clipdq.checks import neighbours
from clipdq.checks.match import Embedded
from clipdq.checks.schemas import DUPLICATE_SEARCH_SCHEMA, DUPLICATES_SCHEMA
from clipdq.core.splits import connected_components
from clipdq.io.images import SIGNATURE_SIZE

CANDIDATES = 5  # nearest images by each descriptor compared per image
APPROXIMATE_CANDIDATES_ABOVE = (
    100_000  # images past which candidates come from an approximate index (clipdq.checks.index)
)
MAX_PAIRS_PER_IMAGE = 32  # an image that is many images' candidate keeps its most similar ones
BLOCK = 256  # images whose windows exist at a time
ALIGN_BLOCK = 4096  # pairs aligned at a time
COARSE = 8  # side of the signatures that propose candidates
COLOUR_BINS = 4  # levels per channel of the colour histograms that propose candidates
FINE = 16  # side of the windows that decide
SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # window sides on the grid, as shares of the image's
OFFSETS = 5  # window positions along each axis on the grid
ALIGN_FROM = 0.8  # pairs whose best grid window correlates at least this are aligned in small steps
SMALLEST_SIDE = 0.65  # the smallest window side alignment may reach, as a share of the image's
ALIGN_STEPS = 16  # alignment moves, each trying every side and centre coordinate both ways
FIRST_STEP = 0.04  # alignment's first move, in the image's coordinates (-1 to 1 across)
CROP_BELOW = 0.9  # a copy whose window of the other image covers less of its area than this is a crop
KINDS = ("identical bytes", "near-identical pixels", "cropped from the other", "the other cropped from it")


def _pixels(signatures: np.ndarray) -> torch.Tensor:
    """(n, 3, S, S) float32 of (n, 3 * S * S) uint8 signatures."""
    return torch.from_numpy(np.asarray(signatures, dtype=np.float32)).reshape(-1, 3, SIGNATURE_SIZE, SIGNATURE_SIZE)


def _unit(flat: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, unit length."""
    flat = flat - flat.mean(dim=-1, keepdim=True)
    return flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(1e-6)


def _centred(images: torch.Tensor, side: int) -> torch.Tensor:
    """(n, 3 * side * side): each image area-resampled to ``side``, minus its mean, unit length."""
    return _unit(F.interpolate(images, size=(side, side), mode="area").flatten(1))


def _colours(images: torch.Tensor) -> torch.Tensor:
    """(n, COLOUR_BINS ** 3): the square roots of each image's colour histogram, unit length."""
    levels = (images * (COLOUR_BINS / 256)).long().clamp_(0, COLOUR_BINS - 1)
    codes = ((levels[:, 0] * COLOUR_BINS + levels[:, 1]) * COLOUR_BINS + levels[:, 2]).flatten(1)
    counts = torch.zeros(len(images), COLOUR_BINS**3).scatter_add_(1, codes, torch.ones(codes.shape))
    return F.normalize(counts.sqrt(), dim=1)


def _grid() -> list[tuple[int, int, int]]:
    """The grid's windows as (resampled side, y, x): for each scale, the image resampled so that a
    window of that share of its side is FINE pixels, then up to OFFSETS positions along each axis."""
    out = []
    for scale in SCALES:
        side = round(FINE / scale)
        offsets = np.unique(np.linspace(0, side - FINE, OFFSETS).round().astype(int)).tolist()
        out += [(side, y, x) for y in offsets for x in offsets]
    return out


def _windows(images: torch.Tensor) -> torch.Tensor:
    """(n, windows, 3 * FINE * FINE) centred, unit-length: the grid's windows of each image."""
    grid = _grid()
    resized = {side: F.interpolate(images, size=(side, side), mode="area") for side in {side for side, _, _ in grid}}
    windows = torch.stack([resized[side][:, :, y : y + FINE, x : x + FINE].flatten(1) for side, y, x in grid], dim=1)
    return _unit(windows)


def _boxes() -> torch.Tensor:
    """(windows, 4): the grid's windows as (half width, half height, centre x, centre y) in the
    image's coordinates, -1 to 1 across."""
    return torch.tensor(
        [[FINE / side, FINE / side, (2 * x + FINE) / side - 1, (2 * y + FINE) / side - 1] for side, y, x in _grid()],
        dtype=torch.float32,
    )


def _render(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(n, m, 3 * FINE * FINE) centred, unit-length: the windows ``boxes`` (n, m, 4) of each of the
    n images, sampled bilinearly (the m windows of an image side by side in one grid)."""
    n, m = boxes.shape[:2]
    sides, centres = boxes[..., None, None, :2], boxes[..., None, None, 2:]
    steps = (torch.arange(FINE, dtype=torch.float32) * 2 + 1) / FINE - 1  # pixel centres, -1 to 1
    unit = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1)  # (FINE, FINE, (x, y))
    grid = (unit * sides + centres).reshape(n, m * FINE, FINE, 2)
    windows = F.grid_sample(images, grid, mode="bilinear", align_corners=False)  # (n, 3, m * FINE, FINE)
    return _unit(windows.reshape(n, 3, m, FINE * FINE).transpose(1, 2).flatten(2))


def _inside(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` with sides between SMALLEST_SIDE and the whole image, and their windows within it."""
    sides = boxes[..., :2].clamp(SMALLEST_SIDE, 1.0)
    return torch.cat([sides, boxes[..., 2:].clamp(-(1 - sides), 1 - sides)], dim=-1)


def aligned_similarity(
    first: torch.Tensor, second: torch.Tensor, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) the best correlation between a window of each ``first`` image and the whole ``second``
    image, (n, 4) that window), searched from the windows ``boxes`` (n, 4) by moving each side and
    centre coordinate in steps that halve whenever no move improves it."""
    target = _centred(second, FINE)[:, None]  # (n, 1, values)
    boxes = _inside(boxes)
    best = (_render(first, boxes[:, None]) * target).sum(-1)[:, 0]
    step = torch.full((len(boxes),), FIRST_STEP)
    moves = torch.cat([torch.eye(4), -torch.eye(4)])  # (8, 4)
    for _ in range(ALIGN_STEPS):
        tried = _inside(boxes[:, None] + moves * step[:, None, None])  # (n, 8, 4)
        top, at = (_render(first, tried) * target).sum(-1).max(dim=1)
        better = top > best
        best = torch.where(better, top, best)
        boxes[better] = tried[better, at[better]]
        step = torch.where(better, step, step / 2)
    return best, boxes


def _area(boxes: torch.Tensor) -> torch.Tensor:
    """(...,) the share of its image's area that each window (half width, half height, ...) covers."""
    return boxes[..., 0] * boxes[..., 1]


def _nearest(descriptors: np.ndarray, sha256: list[str], queries: np.ndarray | None = None) -> np.ndarray:
    """(p, 2) row pairs, both ways round, whose ``descriptors`` are among each other's nearest
    (same bytes excluded), of the rows ``queries`` (default all); an image that is many images'
    candidate keeps its MAX_PAIRS_PER_IMAGE most similar; searched exactly up to
    APPROXIMATE_CANDIDATES_ABOVE images, approximately past them."""
    search: Callable[..., neighbours.Neighbours]
    if len(descriptors) > APPROXIMATE_CANDIDATES_ABOVE:
        from clipdq.checks import index  # faiss: only for catalogs that large

        search = index.top_k
    else:
        search = neighbours.top_k
    rows = np.arange(len(descriptors)) if queries is None else queries
    found = search(
        descriptors[rows], descriptors, k=CANDIDATES, query_keys=[sha256[i] for i in rows], reference_keys=sha256
    )
    keep = found.indices.ravel() >= 0
    pairs = np.stack([np.repeat(rows, CANDIDATES)[keep], found.indices.ravel()[keep]], axis=1)
    scores = found.scores.ravel()[keep]
    pairs, first = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0, return_index=True)
    scores = np.concatenate([scores, scores])[first]
    order = np.lexsort((-scores, pairs[:, 0]))  # by image, the most similar first
    rank = np.arange(len(order)) - np.searchsorted(pairs[order, 0], pairs[order, 0])
    return pairs[order][rank < MAX_PAIRS_PER_IMAGE]


def candidate_pairs(signatures: np.ndarray, sha256: list[str], *, queries: np.ndarray | None = None) -> np.ndarray:
    """(p, 2) row pairs, both ways round and sorted, that are among each other's nearest by coarse
    signature or by colour histogram (same bytes excluded: those are grouped by their digest);
    ``queries``: only the pairs of these rows' nearest (default: every row's)."""
    coarse = _described(signatures, lambda images: _centred(images, COARSE))
    colours = _described(signatures, _colours)
    return np.unique(np.concatenate([_nearest(coarse, sha256, queries), _nearest(colours, sha256, queries)]), axis=0)


def _described(signatures: np.ndarray, describe) -> np.ndarray:
    """``describe`` (a tensor of images to a tensor of rows) of every signature, 4096 at a time:
    never all images' float pixels at once."""
    return np.concatenate(
        [describe(_pixels(signatures[start : start + 4096])).numpy() for start in range(0, len(signatures), 4096)]
    )


def pair_similarity(signatures: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((p,) for each (a, b) of the sorted ``pairs`` the best correlation between a window of a and
    the whole of b, (p,) the share of a's area that window covers); BLOCK images' grid windows at a
    time, each against its own candidates, then the pairs at ALIGN_FROM or more aligned from their
    best grid window."""
    out = np.zeros(len(pairs), np.float32)
    best_window = np.zeros(len(pairs), np.int64)
    grid = _boxes()
    for start in range(0, len(signatures), BLOCK):
        lo, hi = np.searchsorted(pairs[:, 0], [start, start + BLOCK])
        if lo == hi:
            continue
        block = pairs[lo:hi]
        rows = torch.from_numpy(block[:, 0] - start)
        slots = torch.from_numpy(np.arange(hi - lo) - np.searchsorted(block[:, 0], block[:, 0]))
        windows = _windows(_pixels(signatures[start : start + BLOCK]))  # (images, windows, values)
        others = torch.zeros(len(windows), int(slots.max()) + 1, windows.shape[2])
        others[rows, slots] = _centred(_pixels(signatures[block[:, 1]]), FINE)
        scores, at = torch.bmm(others, windows.transpose(1, 2)).max(dim=2)  # over windows
        out[lo:hi], best_window[lo:hi] = scores[rows, slots].numpy(), at[rows, slots].numpy()
    area = _area(grid).numpy()[best_window]
    close = np.flatnonzero(out >= ALIGN_FROM)
    for start in range(0, len(close), ALIGN_BLOCK):
        part = close[start : start + ALIGN_BLOCK]
        aligned, boxes = aligned_similarity(
            _pixels(signatures[pairs[part, 0]]),
            _pixels(signatures[pairs[part, 1]]),
            grid[torch.from_numpy(best_window[part])],
        )
        similarity = aligned.numpy()
        better = similarity > out[part]
        out[part[better]] = similarity[better]
        area[part[better]] = _area(boxes).numpy()[better]
    return out, area


@dataclass(frozen=True)
class Links:
    """Pairs of rows (a, b) at or above the threshold, each from a's side: its similarity, its kind
    (an index into KINDS) and, for a crop, the share of the other image's area it keeps."""

    pairs: np.ndarray  # (p, 2) int64
    similarity: np.ndarray  # (p,) float32
    kind: np.ndarray  # (p,) int64
    area: np.ndarray  # (p,) float32

    @classmethod
    def none(cls) -> Links:
        return cls(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __add__(self, other: Links) -> Links:
        return Links(*(np.concatenate([mine, theirs]) for mine, theirs in zip(astuple(self), astuple(other))))


def find(
    ids: list[str], sha256: list[str], signatures: np.ndarray, *, threshold: float, searched: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(duplicate listings (DUPLICATES_SCHEMA), the search (DUPLICATE_SEARCH_SCHEMA)) among images ``ids``
    with their digests and (n, 3 * S * S) uint8 ``signatures``: one listing per product in a group
    of two or more, with its most similar other product, their similarity (1 for the same bytes),
    its kind (KINDS: identical bytes, near-identical pixels such as a re-encoded or resized copy, or
    a crop, either way round) and, for a crop, the share of the other image's area it keeps.

    ``searched``: an earlier search at the same threshold. Its links between images still there
    (same product, same bytes) are kept, and only the other images are searched, against all: a
    night where 1% of the images changed compares 1% of them."""
    known, kept = _kept_links(ids, sha256, searched)
    fresh = np.flatnonzero(~known)
    found = Links.none()
    if len(ids) >= 2 and len(fresh):
        pairs = candidate_pairs(signatures, sha256, queries=fresh if known.any() else None)
        scores, areas = pair_similarity(signatures, pairs)
        way = better_way(pairs, scores)
        scores, areas = scores[way], areas[way]
        # KINDS' index from a's side of each pair (a, b): scored its own way round, a window of a is b
        kinds = np.where(areas >= CROP_BELOW, 1, np.where(way == np.arange(len(pairs)), 3, 2))
        keep = scores >= threshold
        found = Links(pairs[keep], scores[keep], kinds[keep], areas[keep])
    links = kept + found
    return _listings(ids, sha256, links), _searched(ids, sha256, links)


def _listings(ids: list[str], sha256: list[str], links: Links) -> pl.DataFrame:
    """(DUPLICATES_SCHEMA) the groups that ``links`` and equal digests make, a row per member."""
    n = len(ids)
    if n < 2:
        return pl.DataFrame(schema=DUPLICATES_SCHEMA)
    digests = pl.Series(sha256).cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    same = _same_bytes(digests)
    roots = connected_components(n, np.concatenate([links.pairs, same]))
    sizes = np.bincount(roots, minlength=n)
    linked = np.concatenate([links.pairs, same, same[:, ::-1]])  # then each same-bytes link: 1, kind 0, whole
    similarity, kind, area = (
        np.concatenate([values, np.full(2 * len(same), fill, values.dtype)])
        for values, fill in ((links.similarity, 1), (links.kind, 0), (links.area, 1))
    )
    members = np.flatnonzero(sizes[roots] >= 2)
    best = _best_link(n, linked, similarity)[members]
    return (
        pl.DataFrame(
            {
                "group": np.unique(roots[members], return_inverse=True)[1].astype(np.int64),
                "product_id": [ids[i] for i in members],
                "group_size": sizes[roots[members]].astype(np.int32),
                "other_id": [ids[i] for i in linked[best, 1]],
                "similarity": similarity[best],
                "kind": [KINDS[k] for k in kind[best]],
                "crop_area": np.where(kind[best] >= 2, area[best], np.nan),
            },
            schema=DUPLICATES_SCHEMA,
        )
        .with_columns(pl.col("crop_area").fill_nan(None))
        .sort("group", "product_id")
    )


def _searched(ids: list[str], sha256: list[str], links: Links) -> pl.DataFrame:
    """(DUPLICATE_SEARCH_SCHEMA) every image of a search with its links."""
    a, b = links.pairs[:, 0], links.pairs[:, 1]
    ids_, shas = np.array(ids, dtype=object), np.array(sha256, dtype=object)
    linked = (
        pl.DataFrame(
            {
                "row": a,
                "other_id": pl.Series(ids_[b], dtype=pl.String),
                "other_sha256": pl.Series(shas[b], dtype=pl.String),
                "similarity": links.similarity,
                "kind": links.kind,
                "area": links.area,
            }
        )
        .group_by("row")
        .agg(links=pl.struct("other_id", "other_sha256", "similarity", "kind", "area"))
    )
    images = pl.DataFrame({"product_id": ids, "sha256": sha256}, schema={"product_id": pl.String, "sha256": pl.String})
    return (
        images.with_row_index("row")
        .join(linked.with_columns(pl.col("row").cast(pl.UInt32)), on="row", how="left", maintain_order="left")
        .drop("row")
        .cast(DUPLICATE_SEARCH_SCHEMA)
    )


def _kept_links(ids: list[str], sha256: list[str], searched: pl.DataFrame | None) -> tuple[np.ndarray, Links]:
    """((n,) whether each image was in ``searched`` as it is now (same product, same bytes); the
    links of ``searched`` between two such images, as rows of this search)."""
    if searched is None:
        return np.zeros(len(ids), bool), Links.none()
    now = pl.DataFrame({"product_id": ids, "sha256": sha256}, schema={"product_id": pl.String, "sha256": pl.String})
    now = now.with_row_index("row")
    before = searched.join(now, on=["product_id", "sha256"], how="inner")
    known = np.zeros(len(ids), bool)
    known[before["row"].to_numpy()] = True
    links = (
        before.select("row", "links")
        .explode("links")
        .drop_nulls("links")
        .unnest("links")
        .join(now, left_on=["other_id", "other_sha256"], right_on=["product_id", "sha256"], suffix="_other")
    )
    return known, Links(
        np.stack([links["row"].to_numpy(), links["row_other"].to_numpy()], axis=1).astype(np.int64).reshape(-1, 2),
        links["similarity"].to_numpy().astype(np.float32),
        links["kind"].to_numpy().astype(np.int64),
        links["area"].to_numpy().astype(np.float32),
    )


def better_way(pairs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(p,) for each of the sorted ``pairs``, the index of the better scored of it and its reverse
    (itself where its reverse was not scored): a crop matches a window of its original, not the
    other way round."""
    at, found = _positions(pairs, pairs[:, ::-1])
    return np.where(found & (scores[at] > scores), at, np.arange(len(pairs)))


def _positions(pairs: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each ``wanted`` pair is among the sorted ``pairs``, whether it is there at all)."""
    if not len(pairs):
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    base = int(max(pairs.max(), wanted.max(initial=0))) + 1
    keys, wanted_keys = pairs[:, 0] * base + pairs[:, 1], wanted[:, 0] * base + wanted[:, 1]
    at = np.minimum(np.searchsorted(keys, wanted_keys), len(pairs) - 1)
    return at, keys[at] == wanted_keys


def _same_bytes(digests: np.ndarray) -> np.ndarray:
    """(p, 2) pairs linking each image to the first image of the same digest."""
    first: dict[int, int] = {}
    pairs = [
        (first.setdefault(code, i), i) for i, code in enumerate(digests.tolist()) if first.setdefault(code, i) != i
    ]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _best_link(n: int, pairs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n,) the index in ``pairs`` of each row's most similar other (the last of equals), -1 where none."""
    best = np.full(n, -1)
    order = np.argsort(scores, kind="stable")  # the best last: it wins the assignment
    best[pairs[order, 0]] = order
    return best


def flag_near_identical(
    matches: pl.DataFrame, references: Embedded, queries: Embedded, *, threshold: float
) -> tuple[pl.DataFrame, dict]:
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
    scores = pair_similarity(signatures, both)[0] if len(both) else np.zeros(0, np.float32)
    scores = scores[better_way(both, scores)]
    at = _positions(both, pairs)[0]
    similarity = np.full(matches.height, np.nan, np.float32)
    similarity[ranked] = scores[at] if len(at) else []
    near = np.flatnonzero(similarity >= threshold)
    detail = matches["detail"].to_list()
    for i in near:
        detail[i] = (
            f"near-identical pixels (similarity {similarity[i]:.4f}): this query shows the reference's own image"
        )
    return matches.with_columns(detail=pl.Series(detail, dtype=pl.String)), {
        "threshold": threshold,
        "pairs": len(near),
        "queries": matches["query_id"][near].n_unique(),
    }
