"""Duplicate listings: one image under several product ids, found by pixel signatures (torch, polars).

Every usable image has a signature (``images.signature``: the whole image squashed to 32 x 32
RGB). Two listings are duplicates when their images have the same bytes, or when the signature
of one, or a window of it (the other image may be a crop), correlates with the other's at least
``threshold`` (normalised cross-correlation). Measured on the Grocery Store catalog images:
re-encoded and half-size copies score above 0.99, and so do crops keeping 80% of each side
(centred or not) and most keeping 70%; two distinct products in look-alike packaging at most
0.983 (docs/benchmarks.md).

Bounded in memory and never all pairs: the signatures may be in a file (an audit writes its
shards' signatures to one: ``images.SignatureFile``), read a block at a time; each image's
``CANDIDATES`` nearest images by its signature at 8 x 8 pixels, and as many by its colour
histogram (which a crop keeps where its whole-image signature does not), are found QUERY_ROWS
images at a time (``neighbours.top_k``; past APPROXIMATE_CANDIDATES_ABOVE images, faiss's inverted
lists, the descriptors computed as the index reads them), and only those pairs are compared, the
pairs of QUERY_ROWS images at a time: windows of one image on a grid of sides and positions,
``BLOCK`` images at a time, then the best window of each close pair moved and resized in small
steps until no step improves it (a crop is seldom exactly on the grid). Pairs join into groups
(connected components), so three copies make one group. The way round that scores best says
which image is the crop; its window's area, how much the crop keeps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from clipdq.checks import neighbours
from clipdq.checks.match import Embedded
from clipdq.checks.schemas import DUPLICATE_SEARCH_SCHEMA, DUPLICATES_SCHEMA
from clipdq.core.splits import connected_components
from clipdq.io.images import SIGNATURE_SIZE, Signatures, row_indices

IMAGES = pl.Schema({"product_id": pl.String, "sha256": pl.String})  # the images searched, a row each

CANDIDATES = 5  # nearest images by each descriptor compared per image
APPROXIMATE_CANDIDATES_ABOVE = (
    100_000  # images past which candidates come from an approximate index (clipdq.checks.index)
)
INDEX_BITS = 4  # a descriptor's values in the approximate index: 96 bytes an image at 8 x 8 RGB
PROBES = 16  # cells of the approximate index searched per image: a copy sits in its original's or beside it
QUERY_ROWS = 65_536  # images whose candidates are paired and compared at a time: memory flat in the catalog
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
SETTLED_STEP = FIRST_STEP / 32  # a pair whose move has halved to this (a 50th of a signature pixel) stops
HOPELESS_AFTER = 4  # moves after which a pair ALIGN_MARGIN or more below the threshold stops: the Grocery
ALIGN_MARGIN = 0.05  # crops found at 0.99 gained at most 0.017 after their fourth move (the look-alikes stop)
CROP_BELOW = 0.9  # a copy whose window of the other image covers less of its area than this is a crop
KINDS = ("identical bytes", "near-identical pixels", "cropped from the other", "the other cropped from it")


def _pixels(signatures: np.ndarray) -> torch.Tensor:
    """(n, 3, S, S) float32 of (n, 3 * S * S) uint8 signatures."""
    return torch.from_numpy(np.asarray(signatures, dtype=np.float32)).reshape(-1, 3, SIGNATURE_SIZE, SIGNATURE_SIZE)


def _unit(flat: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, unit length, in place: every caller's tensor is new (a block's
    windows are 137 MB, and two more such copies cost more than the arithmetic)."""
    flat = flat.sub_(flat.mean(dim=-1, keepdim=True))
    return flat.div_(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min_(1e-6))


def _centred(images: torch.Tensor, side: int) -> torch.Tensor:
    """(n, 3 * side * side): each image area-resampled to ``side``, minus its mean, unit length."""
    return _unit(F.interpolate(images, size=(side, side), mode="area").flatten(1))


def _coarse(images: torch.Tensor) -> torch.Tensor:
    """(n, 3 * COARSE * COARSE): the images at COARSE pixels, centred, unit length."""
    return _centred(images, COARSE)


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


PIXEL_CENTRES = (torch.arange(FINE, dtype=torch.float32) * 2 + 1) / FINE - 1  # of a window's row, -1 to 1


def _correlations(images: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, m): the correlation of each window ``boxes`` (n, m, 4) of the n images, sampled
    bilinearly at FINE pixels (an image's m windows side by side in one grid), with the centred,
    unit-length ``target`` (n, 3 * FINE * FINE) of its image."""
    n, m = boxes.shape[:2]
    xs = torch.addcmul(boxes[..., 2, None], PIXEL_CENTRES, boxes[..., 0, None])  # (n, m, FINE)
    ys = torch.addcmul(boxes[..., 3, None], PIXEL_CENTRES, boxes[..., 1, None])
    grid = torch.stack([xs[..., None, :].expand(n, m, FINE, FINE), ys[..., None].expand(n, m, FINE, FINE)], -1)
    windows = F.grid_sample(images, grid.reshape(n, m * FINE, FINE, 2), mode="bilinear", align_corners=False)
    windows = windows.reshape(n, 3, m, FINE * FINE)
    windows = windows.sub_(windows.mean((1, 3), keepdim=True))
    dot = torch.matmul(windows, target.reshape(n, 3, FINE * FINE, 1)).sum((1, 3))
    return dot / torch.linalg.vector_norm(windows, dim=(1, 3)).clamp_min(1e-6)


def _inside(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` with sides between SMALLEST_SIDE and the whole image, and their windows within it."""
    sides = boxes[..., :2].clamp(SMALLEST_SIDE, 1.0)
    return torch.cat([sides, boxes[..., 2:].clamp(-(1 - sides), 1 - sides)], dim=-1)


def aligned_similarity(
    first: torch.Tensor, second: torch.Tensor, boxes: torch.Tensor, *, threshold: float = -math.inf
) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) the best correlation between a window of each ``first`` image and the whole ``second``
    image, (n, 4) that window), searched from the windows ``boxes`` (n, 4) by moving each side and
    centre coordinate in steps that halve whenever no move improves it, until they are SETTLED_STEP;
    a pair still ALIGN_MARGIN below ``threshold`` after HOPELESS_AFTER moves stops where it is."""
    target = _centred(second, FINE)
    boxes = _inside(boxes)
    best = _correlations(first, boxes[:, None], target)[:, 0]
    step = torch.full((len(boxes),), FIRST_STEP)
    moves = torch.cat([torch.eye(4), -torch.eye(4)])  # (8, 4)
    moving = torch.arange(len(boxes))
    for move in range(ALIGN_STEPS):
        hopeful = best[moving] >= threshold - ALIGN_MARGIN if move >= HOPELESS_AFTER else True
        moving = moving[(step[moving] >= SETTLED_STEP) & hopeful]
        tried = _inside(boxes[moving, None] + moves * step[moving, None, None])  # (moving, 8, 4)
        top, at = _correlations(first[moving], tried, target[moving]).max(dim=1)
        better = top > best[moving]
        best[moving[better]], boxes[moving[better]] = top[better], tried[better, at[better]]
        step[moving[~better]] /= 2
    return best, boxes


def _area(boxes: torch.Tensor) -> torch.Tensor:
    """(...,) the share of its image's area that each window (half width, half height, ...) covers."""
    return boxes[..., 0] * boxes[..., 1]


class _Described:
    """The rows of ``signatures`` described as they are read (``describe``: a tensor of images to a
    tensor of rows): the approximate index takes them in blocks, never all at once."""

    def __init__(self, signatures: Signatures, describe: Callable[[torch.Tensor], torch.Tensor]):
        self.signatures, self.describe = signatures, describe
        self.shape = (len(signatures), describe(_pixels(signatures[:1])).shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = row_indices(index, len(self))
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for start in range(0, len(rows), 4096):
            out[start : start + 4096] = self.describe(_pixels(self.signatures[rows[start : start + 4096]])).numpy()
        return out


def _candidates(
    signatures: Signatures, codes: np.ndarray, queries: np.ndarray, describe
) -> tuple[np.ndarray, np.ndarray]:
    """((queries, CANDIDATES) int32 rows, -1 where fewer; their float32 similarities): the nearest
    other images of each of the rows ``queries`` by ``describe`` (same bytes, equal ``codes``, left
    out), QUERY_ROWS at a time: exactly up to APPROXIMATE_CANDIDATES_ABOVE images, past them from
    an index of inverted lists (INDEX_BITS a value) searched PROBES cells deep."""
    described: neighbours.Rows = _Described(signatures, describe)
    if len(described) > APPROXIMATE_CANDIDATES_ABOVE:
        from clipdq.checks import index  # faiss: only for catalogs that large

        built = index.build(described, bits=INDEX_BITS)
        search = functools.partial(index.top_k, references=described, built=built, probes=PROBES)
    else:
        described = described[:]  # (every image's descriptor: a few MB)
        search = functools.partial(neighbours.top_k, references=described)
    indices = np.empty((len(queries), CANDIDATES), np.int32)
    scores = np.empty((len(queries), CANDIDATES), np.float32)
    for start in range(0, len(queries), QUERY_ROWS):
        rows = queries[start : start + QUERY_ROWS]
        found = search(described[rows], k=CANDIDATES, query_keys=codes[rows], reference_keys=codes)
        indices[start : start + len(rows)], scores[start : start + len(rows)] = found.indices, found.scores
    return indices, scores


def _pairs(queries: np.ndarray, found: tuple[np.ndarray, np.ndarray], rows: range) -> np.ndarray:
    """(p, 2) int64 pairs (a, b), a among ``rows``, of a query and one of its ``found`` candidates
    (``_candidates``), either way round; an image that is many images' candidate keeps its
    MAX_PAIRS_PER_IMAGE most similar."""
    candidates, similarity = found
    ours = (queries >= rows.start) & (queries < rows.stop)
    mine = candidates[ours] >= 0  # the candidates of the queries among ``rows``
    theirs = (candidates >= rows.start) & (candidates < rows.stop)  # the queries whose candidate is
    pairs = np.concatenate(
        [
            np.stack([np.repeat(queries[ours], CANDIDATES)[mine.ravel()], candidates[ours][mine]], 1),
            np.stack([candidates[theirs], np.broadcast_to(queries[:, None], theirs.shape)[theirs]], 1),
        ]
    ).astype(np.int64)
    scores = np.concatenate([similarity[ours][mine], similarity[theirs]])
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    scores = scores[first]
    order = np.lexsort((-scores, pairs[:, 0]))  # by image, the most similar first
    rank = np.arange(len(order)) - np.searchsorted(pairs[order, 0], pairs[order, 0])
    return pairs[order][rank < MAX_PAIRS_PER_IMAGE]


def candidate_pairs(signatures: Signatures, codes: np.ndarray, queries: np.ndarray) -> Iterator[np.ndarray]:
    """(p, 2) sorted row pairs (a, b), both ways round, of the rows ``queries`` and their nearest
    images by coarse signature or by colour histogram, QUERY_ROWS values of a at a time; images of
    equal digest ``codes`` are never paired (the same bytes are grouped by their digest)."""
    found = [_candidates(signatures, codes, queries, describe) for describe in (_coarse, _colours)]
    for start in range(0, len(signatures), QUERY_ROWS):
        rows = range(start, min(start + QUERY_ROWS, len(signatures)))
        yield np.unique(np.concatenate([_pairs(queries, kind, rows) for kind in found]), axis=0)


def pair_similarity(
    signatures: Signatures, pairs: np.ndarray, *, threshold: float = -math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """((p,) for each (a, b) of the sorted ``pairs`` the best correlation between a window of a and
    the whole of b, (p,) the share of a's area that window covers); the grid windows of BLOCK of
    the a images at a time, each against its own candidates, then the pairs at ALIGN_FROM or more
    aligned from their best grid window (a pair that cannot reach ``threshold`` stops early: its
    similarity is then a lower bound)."""
    out = np.zeros(len(pairs), np.float32)
    best_window = np.zeros(len(pairs), np.int64)
    grid = _boxes()
    firsts = np.unique(pairs[:, 0])
    for start in range(0, len(firsts), BLOCK):
        images = firsts[start : start + BLOCK]
        lo, hi = np.searchsorted(pairs[:, 0], [images[0], images[-1] + 1])
        block = pairs[lo:hi]
        rows = torch.from_numpy(np.searchsorted(images, block[:, 0]))
        slots = torch.from_numpy(np.arange(hi - lo) - np.searchsorted(block[:, 0], block[:, 0]))
        windows = _windows(_pixels(signatures[images]))  # (images, windows, values)
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
            threshold=threshold,
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
    ids: Sequence[str] | pl.Series,
    sha256: Sequence[str] | pl.Series,
    signatures: Signatures,
    *,
    threshold: float,
    searched: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(duplicate listings (DUPLICATES_SCHEMA), the search (DUPLICATE_SEARCH_SCHEMA)) among images ``ids``
    with their digests and (n, 3 * S * S) uint8 ``signatures``: one listing per product in a group
    of two or more, with its most similar other product, their similarity (1 for the same bytes),
    its kind (KINDS: identical bytes, near-identical pixels such as a re-encoded or resized copy, or
    a crop, either way round) and, for a crop, the share of the other image's area it keeps.

    ``searched``: an earlier search at the same threshold. Its links between images still there
    (same product, same bytes) are kept, and only the other images are searched, against all: a
    night where 1% of the images changed compares 1% of them."""
    images = pl.DataFrame({"product_id": ids, "sha256": sha256}, schema=IMAGES)
    known, kept = _kept_links(images, searched)
    fresh = np.flatnonzero(~known)
    above, codes = Links.none(), neighbours.equal_codes(images["sha256"])
    if images.height >= 2 and len(fresh):
        for pairs in candidate_pairs(signatures, codes, fresh):
            above += _above(signatures, pairs, threshold)
    links = kept + _ways(above)
    return _listings(images, codes, links), _searched(images, links)


def _above(signatures: Signatures, pairs: np.ndarray, threshold: float) -> Links:
    """The sorted ``pairs`` (a, b) where a window of a correlates with the whole of b at least
    ``threshold`` (their kind not known yet: it takes both ways round, ``_ways``)."""
    scores, areas = pair_similarity(signatures, pairs, threshold=threshold)
    keep = scores >= threshold
    return Links(pairs[keep], scores[keep], np.zeros(keep.sum(), np.int64), areas[keep])


def _ways(above: Links) -> Links:
    """The links, both ways round, of the pairs that scored at least the threshold either way
    (``_above``), each pair scored the way round that scores best (the other way, where it is not
    in ``above``, scored less)."""
    pairs = np.unique(np.concatenate([above.pairs, above.pairs[:, ::-1]]), axis=0)
    scores, areas = np.full(len(pairs), -np.inf, np.float32), np.zeros(len(pairs), np.float32)
    at = _positions(pairs, above.pairs)[0]
    scores[at], areas[at] = above.similarity, above.area
    way = better_way(pairs, scores)
    scores, areas = scores[way], areas[way]
    # KINDS' index from a's side of each pair (a, b): scored its own way round, a window of a is b
    kinds = np.where(areas >= CROP_BELOW, 1, np.where(way == np.arange(len(pairs)), 3, 2))
    return Links(pairs, scores, kinds, areas)


def _listings(images: pl.DataFrame, codes: np.ndarray, links: Links) -> pl.DataFrame:
    """(DUPLICATES_SCHEMA) the groups that ``links`` and equal digest ``codes`` make among
    ``images`` (IMAGES), a row per member."""
    n = images.height
    if n < 2:
        return pl.DataFrame(schema=DUPLICATES_SCHEMA)
    same = _same_bytes(codes)
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
                "product_id": images["product_id"].gather(members),
                "group_size": sizes[roots[members]].astype(np.int32),
                "other_id": images["product_id"].gather(linked[best, 1]),
                "similarity": similarity[best],
                "kind": [KINDS[k] for k in kind[best]],
                "crop_area": np.where(kind[best] >= 2, area[best], np.nan),
            },
            schema=DUPLICATES_SCHEMA,
        )
        .with_columns(pl.col("crop_area").fill_nan(None))
        .sort("group", "product_id")
    )


def _searched(images: pl.DataFrame, links: Links) -> pl.DataFrame:
    """(DUPLICATE_SEARCH_SCHEMA) every one of ``images`` (IMAGES) with its links."""
    others = images[links.pairs[:, 1]]
    linked = (
        pl.DataFrame(
            {
                "row": links.pairs[:, 0],
                "other_id": others["product_id"],
                "other_sha256": others["sha256"],
                "similarity": links.similarity,
                "kind": links.kind,
                "area": links.area,
            }
        )
        .group_by("row")
        .agg(links=pl.struct("other_id", "other_sha256", "similarity", "kind", "area"))
    )
    return (
        images.with_row_index("row")
        .join(linked.with_columns(pl.col("row").cast(pl.UInt32)), on="row", how="left", maintain_order="left")
        .drop("row")
        .cast(DUPLICATE_SEARCH_SCHEMA)
    )


def _kept_links(images: pl.DataFrame, searched: pl.DataFrame | None) -> tuple[np.ndarray, Links]:
    """((n,) whether each of ``images`` (IMAGES) was in ``searched`` as it is now (same product,
    same bytes); the links of ``searched`` between two such images, as rows of this search)."""
    if searched is None:
        return np.zeros(images.height, bool), Links.none()
    now = images.with_row_index("row")
    before = searched.join(now, on=["product_id", "sha256"], how="inner")
    known = np.zeros(images.height, bool)
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


def _same_bytes(codes: np.ndarray) -> np.ndarray:
    """(p, 2) pairs linking each image to the first image of the same digest ``codes``."""
    first = np.unique(codes, return_index=True, return_inverse=True)
    firsts = first[1][first[2]]
    rows = np.flatnonzero(firsts != np.arange(len(codes)))
    return np.stack([firsts[rows], rows], axis=1).astype(np.int64).reshape(-1, 2)


def _best_link(n: int, pairs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n,) the index in ``pairs`` of each row's most similar other (the last of equals), -1 where none."""
    best = np.full(n, -1)
    order = np.argsort(scores, kind="stable")  # the best last: it wins the assignment
    best[pairs[order, 0]] = order
    return best


def pixel_similarity(
    queries: Embedded, references: Embedded, query_rows: np.ndarray, reference_rows: np.ndarray
) -> np.ndarray:
    """(p,) the similarity of each query's and reference's pixels (rows among the usable images of
    each), the better way round, as duplicate listings score them."""
    used = np.unique(reference_rows)
    signatures = np.concatenate([queries.signatures, references.signatures[used]])
    pairs = np.stack([query_rows, len(queries.signatures) + np.searchsorted(used, reference_rows)], axis=1)
    both = np.unique(np.concatenate([pairs, pairs[:, ::-1]]), axis=0)
    if not len(both):
        return np.zeros(0, np.float32)
    scores = pair_similarity(signatures, both)[0]
    return scores[better_way(both, scores)][_positions(both, pairs)[0]]


def flag_near_identical(
    matches: pl.DataFrame, references: Embedded, queries: Embedded, *, threshold: float
) -> tuple[pl.DataFrame, dict]:
    """(``matches`` with each ranked pair whose query and reference images are near-identical
    pixels, at ``threshold`` as for duplicate listings, marked in its detail; what the summary
    says of them). The same photo on both sides says nothing of the model."""
    ranked = matches["rank"].is_not_null().to_numpy()
    query_row = {pid: i for i, pid in enumerate(np.array(queries.ids, dtype=object)[queries.ok])}
    usable = zip(*(np.array(column, dtype=object)[references.ok] for column in (references.ids, references.images)))
    reference_row = {image: i for i, image in enumerate(usable)}  # (id, image): a product may have several
    q = np.array([query_row[pid] for pid in matches["query_id"].filter(ranked)], dtype=np.int64)
    shown = matches.filter(ranked).select("reference_id", "reference_image").rows()
    r = np.array([reference_row[image] for image in shown], dtype=np.int64)
    similarity = np.full(matches.height, np.nan, np.float32)
    similarity[ranked] = pixel_similarity(queries, references, q, r)
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
