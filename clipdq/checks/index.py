"""Approximate nearest references, for catalogs past what the exact search serves: faiss's
inverted lists.

The references are clustered into ``lists`` cells (k-means on a sample of them) and kept at 8
bits per dimension by default (a quarter of their float32 size); each query compares itself with
the references of its ``probes`` nearest cells only. Scores are cosine similarities as in
``neighbours.top_k``, up to the rounding; a reference holding the query's own bytes is left out
among the candidates searched (``k`` plus ``EXTRA_CANDIDATES``).

Building is most of the work for a large catalog searched by few queries, so ``kept`` stores the
built index beside the embedding cache, named after the references' image digests in order: a
run whose references have not changed reads it instead of building it again.
"""

from __future__ import annotations

import hashlib
import logging

import faiss
import numpy as np

from clipdq.checks.neighbours import Neighbours, Rows, normalised, shared_codes
from clipdq.io import storage

log = logging.getLogger(__name__)

TRAIN_PER_LIST = 64  # k-means sample: faiss asks for 39 to 256 points per list
MAX_LISTS = 2048  # so the k-means sample stays at most 131,072 rows (100 MB at 192 values, and a copy in training)
ADD_BLOCK = 65536  # references normalised and added this many at a time: no second float32 copy
QUERY_BLOCK = 4096
EXTRA_CANDIDATES = 16  # searched beyond k, so that left-out same-byte references still leave k
PROBES = 64  # cells searched per query (recall against exact: docs/benchmarks.md)
QUANTIZERS = {8: faiss.ScalarQuantizer.QT_8bit, 6: faiss.ScalarQuantizer.QT_6bit, 4: faiss.ScalarQuantizer.QT_4bit}
INDEX_VERSION = 1  # bump when ``build`` changes the index it makes


def lists_for(references: int) -> int:
    """About 4 x sqrt(n) cells, with enough references to train each, at most MAX_LISTS."""
    return max(1, min(int(4 * np.sqrt(references)), references // TRAIN_PER_LIST, MAX_LISTS))


def build(references: Rows, *, lists: int | None = None, bits: int = 8, seed: int = 0) -> faiss.Index:
    """An inverted-list index of the (unnormalised) reference embeddings, by cosine similarity, each
    value kept in ``bits`` (4, 6 or 8); they are read ADD_BLOCK rows at a time, and may be computed
    as they are read (``Rows``)."""
    lists = lists or lists_for(len(references))
    index = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(references.shape[1]),
        references.shape[1],
        lists,
        QUANTIZERS[bits],
        faiss.METRIC_INNER_PRODUCT,
    )
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(references), size=min(len(references), lists * TRAIN_PER_LIST), replace=False))
    index.train(normalised(references[sample], in_place=True))  # (a copy already: indexed by rows)
    for start in range(0, len(references), ADD_BLOCK):
        index.add(normalised(references[start : start + ADD_BLOCK]))
    return index


def kept(references: np.ndarray, reference_keys: list[str | None], folder: str) -> tuple[faiss.Index, bool]:
    """(index, whether it was read): the index of ``references`` kept under ``folder`` (local or
    s3://) for their digests ``reference_keys``, else built and kept there in place of the previous one."""
    named = hashlib.sha256(f"index {INDEX_VERSION}\n".encode())
    for key in reference_keys:
        named.update(f"{key}\n".encode())
    name = named.hexdigest()[:32] + ".faiss"
    uri = storage.join(folder, name)
    if storage.exists(uri):
        try:
            read = faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), np.uint8))
        except RuntimeError as error:  # faiss cannot read it: build it again, as the cache re-embeds
            log.warning("kept approximate index %s is unreadable (%s): building it again", uri, error)
        else:
            if read.ntotal == len(references):
                log.info("approximate index of %d references read from %s", len(references), uri)
                return read, True
    log.info("building the approximate index of %d references (about a minute per million on 2 cores)", len(references))
    built = build(references)
    storage.write_bytes(uri, faiss.serialize_index(built).data)  # the array's bytes: no second copy
    for other in storage.list_files(folder):
        if other != name and other.endswith(".faiss"):  # another set of references: it will not be read again
            storage.delete(storage.join(folder, other))
    log.info("approximate index of %d references built and kept at %s", len(references), uri)
    return built, False


def top_k(
    queries: np.ndarray,
    references: Rows,
    *,
    k: int,
    query_keys=None,
    reference_keys=None,
    probes: int = PROBES,
    lists: int | None = None,
    built: faiss.Index | None = None,
) -> Neighbours:
    """The ``k`` nearest references of every query by cosine similarity, approximately; ``built``: the
    references' index (``build``) where it exists already."""
    if k < 1:
        raise ValueError("k must be at least 1")
    m = len(queries)
    indices, scores = np.full((m, k), -1, np.int64), np.full((m, k), -np.inf, np.float32)
    excluded = np.zeros(m, np.int64)
    if not len(references):
        return Neighbours(indices, scores, excluded)
    built = built if built is not None else build(references, lists=lists)
    cells = faiss.extract_index_ivf(built)
    cells.nprobe = min(probes, cells.nlist)
    q_codes, r_codes = shared_codes(query_keys, reference_keys, m, len(references))
    wanted = min(k + (EXTRA_CANDIDATES if q_codes is not None else 0), len(references))
    for start in range(0, m, QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        found_s, found_i = built.search(normalised(queries[rows]), wanted)
        found_s[found_i < 0] = -np.inf  # fewer candidates in the cells searched than asked for
        if q_codes is not None and r_codes is not None:
            same = (found_i >= 0) & (q_codes[rows, None] >= 0) & (r_codes[found_i] == q_codes[rows, None])
            found_s[same], excluded[rows] = -np.inf, same.sum(axis=1)
        order = np.argsort(-found_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(found_s, order, 1)
        best_i = np.where(np.isfinite(best_s), np.take_along_axis(found_i, order, 1), -1)
        indices[rows, : order.shape[1]], scores[rows, : order.shape[1]] = best_i, best_s
    return Neighbours(indices, scores, excluded)
