"""Product matching: the nearest reference images of each query image (``neighbours``), ranked
and accounted for.

With a model fine-tuned on the spec, the score adds what the model reads of each reference's
attribute values (``neighbours.ValueAgreement``): the log-probability that the query shows the
reference's catalog values, so a shelf photo meets the products of its category first, and image
similarity ranks within them. Through the approximate index (``index``), the agreement rescores
each query's ``RESCORED_CANDIDATES`` nearest references by image. A catalog's images arrive as
``Embedded`` (``clipdq.pipeline.matching`` embeds them through the audit's own loop).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from clipdq.checks.neighbours import Neighbours, ValueAgreement, equal_codes, normalised, rescore, top_k
from clipdq.checks.schemas import MATCHES_SCHEMA

APPROXIMATE_ABOVE = 1_000_000  # references past which search "auto" uses the approximate index (clipdq.checks.index)
RESCORED_CANDIDATES = 64  # approximate search with the agreement: candidates by image, rescored by both
NEAR_COPY_CANDIDATES = 10  # with the agreement: each query's nearest references by image checked for its own photo


@dataclass
class Embedded:
    """A catalog's images as embeddings: every row's id, image, digest and image error, and the
    embeddings of the rows whose image is usable, in row order. Several rows of one id are one
    product's gallery."""

    ids: list[str] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)  # the image column's text (None for bytes)
    sha256: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (usable rows, d)
    signatures: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))  # (usable rows, 3 * 32 * 32)
    # uint8: images.signature of each
    counts: Counter = field(default_factory=Counter)  # embedding.COUNT_KEYS

    @property
    def ok(self) -> np.ndarray:
        return np.array([error is None for error in self.errors], dtype=bool)


def search_method(search: str, references: int) -> str:
    """ "exact" or "approximate": ``search`` as asked, "auto" by the number of references."""
    if search == "auto":
        return "approximate" if references > APPROXIMATE_ABOVE else "exact"
    return search


def match_embedded(
    references: Embedded,
    queries: Embedded,
    *,
    k: int,
    agreement: ValueAgreement | None = None,
    search: str = "exact",
    index_folder: str | None = None,
    near_copies: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[pl.DataFrame, dict]:
    """(matches, what the summary says of them): k rows per query with a usable image, ranked from
    1, and one row with its error for each query whose image failed, so every query is accounted for.
    ``search``: exact, approximate (faiss's inverted lists) or auto (approximate past a million);
    ``index_folder``: where the approximate index is kept between runs (None: built every run);
    ``near_copies``: (query rows, reference rows) -> which pairs show one photo; with ``agreement``,
    such a pair among a query's NEAR_COPY_CANDIDATES nearest by image is scored by image alone.
    A product with several images (rows of one reference id) scores as its best image."""
    ref_ok, query_ok = references.ok, queries.ok
    keys = {
        "query_keys": [sha for sha, ok in zip(queries.sha256, query_ok) if ok],
        "reference_keys": [sha for sha, ok in zip(references.sha256, ref_ok) if ok],
    }
    method = search_method(search, int(ref_ok.sum()))
    products, gallery = _products(references)
    wide = k * gallery  # enough images for k products, each with its best image
    found, by_image, searched = search_references(
        queries.embeddings,
        references.embeddings,
        keys,
        k=wide,
        agreement=agreement,
        method=method,
        index_folder=index_folder,
    )
    score = score_summary(agreement)
    if agreement is not None and near_copies is not None:
        found, score["scored_by_image_alone"] = _copies_by_image(
            found, by_image, near_copies, queries, references, k=wide
        )
    if gallery > 1:
        found = _best_per_product(found, products, k=k)
    matches = ranked_rows(found, references, queries)
    summary = {
        "queries": len(queries.ids),
        "references": len(references.ids),
        "reference_products": len(set(references.ids)),
        "k": k,
        "query_image_errors": int((~query_ok).sum()),
        "reference_image_errors": int((~ref_ok).sum()),
        "same_image_excluded": {"queries": int((found.excluded > 0).sum()), "pairs": int(found.excluded.sum())},
        "search": method,
        **searched,
        "score": score,
    }
    return matches, summary


def _products(references: Embedded) -> tuple[np.ndarray, int]:
    """(each usable reference row's product, as a code; the most usable images of one product)."""
    ids = pl.Series(references.ids, dtype=pl.String).filter(pl.Series(references.ok))
    if not len(ids):
        return np.zeros(0, np.int64), 1
    _, codes, counts = np.unique(equal_codes(ids), return_inverse=True, return_counts=True)
    return codes, int(counts.max())


def _best_per_product(found: Neighbours, products: np.ndarray, *, k: int) -> Neighbours:
    """The first ``k`` products of each query's ranked images ``found``, each at its best image."""
    present = found.indices >= 0
    product = np.where(present, products[np.where(present, found.indices, 0)], -1)
    order = np.argsort(product, axis=1, kind="stable")  # a product's images side by side, best first
    ordered = np.take_along_axis(product, order, 1)
    best = np.ones(ordered.shape, bool)
    best[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    keep = np.empty_like(best)
    np.put_along_axis(keep, order, best, 1)
    keep &= present
    position = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept, still best first
    kept = np.take_along_axis(keep, position, 1)
    indices = np.where(kept, np.take_along_axis(found.indices, position, 1), -1)
    scores = np.where(kept, np.take_along_axis(found.scores, position, 1), -np.inf).astype(np.float32)
    return Neighbours(indices, scores, found.excluded)


def _copies_by_image(
    found: Neighbours,
    by_image: Neighbours,
    near_copies: Callable[[np.ndarray, np.ndarray], np.ndarray],
    queries: Embedded,
    references: Embedded,
    *,
    k: int,
) -> tuple[Neighbours, int]:
    """(``found`` with each query's near copies among its nearest by image (``by_image``) scored by
    their cosine similarity alone, the number of such pairs). The agreement only lowers a score (a
    log-probability), so a copy rises, and one already among ``found`` gives up its lower score."""
    rows = by_image.indices[:, :NEAR_COPY_CANDIDATES]
    copy, cosine = np.zeros(rows.shape, bool), np.full(rows.shape, -np.inf, np.float32)
    q, r = np.nonzero(rows >= 0)
    if len(q):
        copy[q, r] = near_copies(q, rows[q, r])
        q, r = q[copy[q, r]], r[copy[q, r]]
        pairs = normalised(queries.embeddings[q]) * normalised(references.embeddings[rows[q, r]])
        cosine[q, r] = pairs.sum(axis=1)
    extra = np.where(copy, rows, -1)
    again = ((found.indices[:, :, None] == extra[:, None, :]) & copy[:, None, :]).any(axis=2)
    scores = np.concatenate([np.where(again, -np.inf, found.scores), cosine], 1)
    indices = np.concatenate([found.indices, extra], 1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, indices = np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)
    indices[~np.isfinite(scores)] = -1
    return Neighbours(indices, scores, found.excluded), int(copy.sum())


def ranked_rows(found: Neighbours, references: Embedded, queries: Embedded) -> pl.DataFrame:
    """(MATCHES_SCHEMA) the neighbours ``found`` for the usable queries as ranked rows, then one row
    with its error for each query whose image failed."""
    ref_ids = np.array(references.ids, dtype=object)[references.ok]
    ref_images = np.array(references.images, dtype=object)[references.ok]
    query_ok = queries.ok
    query_ids = np.array(queries.ids, dtype=object)
    kept = found.indices >= 0
    rows = np.nonzero(kept)
    matched = pl.DataFrame(
        {
            "query_id": query_ids[query_ok][rows[0]].tolist(),
            "rank": (rows[1] + 1).astype(np.int32),
            "reference_id": ref_ids[found.indices[kept]].tolist(),
            "reference_image": ref_images[found.indices[kept]].tolist(),
            "score": found.scores[kept],
            "detail": None,
        },
        schema=MATCHES_SCHEMA,
    )
    failed = pl.DataFrame(
        {
            "query_id": query_ids[~query_ok].tolist(),
            "rank": None,
            "reference_id": None,
            "reference_image": None,
            "score": None,
            "detail": [e for e in queries.errors if e is not None],
        },
        schema=MATCHES_SCHEMA,
    )
    return pl.concat([matched, failed])


def search_references(
    queries: np.ndarray,
    references: np.ndarray,
    keys: dict,
    *,
    k: int,
    agreement: ValueAgreement | None,
    method: str,
    index_folder: str | None,
) -> tuple[Neighbours, Neighbours, dict]:
    """(neighbours, the nearest by image alone (at least NEAR_COPY_CANDIDATES where ``agreement``
    adds to the score), what the summary says of the approximate index): the exact search, or the
    index's candidates (rescored with ``agreement``), the index kept in ``index_folder``."""
    if method == "exact":
        by_image = top_k(queries, references, k=max(k, NEAR_COPY_CANDIDATES) if agreement else k, **keys)
        if agreement is None:
            return by_image, by_image, {}
        return top_k(queries, references, k=k, agreement=agreement, **keys), by_image, {}
    from clipdq.checks import index

    built, reused = None, False
    if index_folder is not None and len(references):
        built, reused = index.kept(references, keys["reference_keys"], index_folder)
    wanted = k if agreement is None else max(k, RESCORED_CANDIDATES)
    by_image = index.top_k(queries, references, k=wanted, built=built, **keys)
    found = by_image if agreement is None else rescore(by_image, queries, references, agreement, k=k)
    return (
        found,
        by_image,
        {
            "approximate_index": {
                "read_from_an_earlier_run": reused,
                "candidates_rescored": wanted if agreement is not None else None,
            }
        },
    )


def score_summary(agreement: ValueAgreement | None) -> dict:
    """What the matches' score is made of, for the summary."""
    if agreement is None:
        return {"formula": "cosine similarity of the image embeddings", "attributes": {}}
    return {
        "formula": f"cosine similarity + {agreement.weight:g} x sum over attributes of log P(same value)",
        "attributes": {
            name: {"references_with_a_catalog_value": int((codes >= 0).sum())}
            for name, codes in zip(agreement.attributes, agreement.codes)
        },
    }


def accuracy(matches: pl.DataFrame, expected: dict[str, str | None]) -> dict:
    """Top-1 and top-5 accuracy over the queries that carry a label and have a usable image."""
    labeled = {query: label for query, label in expected.items() if label is not None}
    ranked = (
        matches.filter(pl.col("rank").is_not_null() & pl.col("query_id").is_in(list(labeled)))
        .group_by("query_id")
        .agg(pl.col("reference_id").sort_by("rank"))
    )
    lists = dict(zip(ranked["query_id"].to_list(), ranked["reference_id"].to_list()))
    hits = {n: sum(labeled[query] in refs[:n] for query, refs in lists.items()) for n in (1, 5)}
    return {"labeled_queries": len(lists), **{f"top_{n}": hits[n] / len(lists) if lists else None for n in hits}}
