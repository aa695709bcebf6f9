"""The one embedding loop: catalog rows in batches, their images fetched, decoded and embedded once,
the cache consulted first, with the bookkeeping every caller shares (``Tally``).

Vocabulary: ``row_batches`` are catalog rows (polars frames); a ``Batch`` is those rows with
their images ready for the model (cached embeddings, or decoded pixels); a row's ``sha256`` is
the digest of its image's bytes and its ``signature`` the 32 x 32 pixel signature that duplicate
search compares. The audit (``audit.findings_of``), its shards and cross-fitting, and matching
(``matching.embed_catalog``) all embed through ``embedded_batches``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from clipdq import progress_log
from clipdq.core.spec import Spec
from clipdq.io import images, sources, storage
from clipdq.io.cache import EmbeddingCache, Entry, cache_key, digest
from clipdq.io.images import PixelSpec
from clipdq.io.sources import ImageAccess, fetch_all
from clipdq.model.files import ModelFiles
from clipdq.model.scorer import Scorer


class ImageOutage(RuntimeError):
    """Too many images were lost to storage or network errors for the run's findings to stand."""


def check_outage(lost: int, row_count: int, max_share: float) -> None:
    """Raise ImageOutage once ``lost`` of ``row_count`` images exceed ``max_share``: findings made
    during an outage would report the store's trouble as the catalog's."""
    if lost and lost > max_share * row_count:
        raise ImageOutage(
            f"{lost} of {row_count} images could not be fetched for transient reasons (storage or "
            f"network errors), more than max_transient_image_errors={max_share:g}: nothing published"
        )


@dataclass
class Batch:
    """Catalog rows with their images ready for the model: cached embeddings or decoded pixels."""

    rows: pl.DataFrame
    errors: list[str | None]  # per row: why its image failed, None where it is usable
    sha256: list[str | None]  # per row: digest of the image bytes, None where they could not be fetched
    cached: dict[int, np.ndarray]  # row position -> embedding found in the cache
    to_embed: np.ndarray  # row positions of ``pixels``
    pixels: np.ndarray  # (len(to_embed), 3, h, w) float32
    signatures: list[bytes | None]  # per row: the image's pixel signature, None where it failed
    transient: int = 0  # images lost to an outage (storage or network), not to the data
    unread: int = 0  # images not read at all: unchanged since their embedding was cached

    @property
    def ok(self) -> np.ndarray:
        """(n,) bool: the rows whose image is usable."""
        return np.array([error is None for error in self.errors], dtype=bool)


IMAGES_SCHEMA = pl.Schema({"product_id": pl.String, "sha256": pl.String, "signature": pl.Binary})


def usable_images(batch: Batch, spec: Spec) -> pl.DataFrame:
    """(IMAGES_SCHEMA) the id, digest and pixel signature of each row whose image is usable."""
    ok = batch.ok
    return pl.DataFrame(
        {
            "product_id": batch.rows[spec.id_column].cast(pl.String).filter(ok),
            "sha256": [sha for sha, good in zip(batch.sha256, ok) if good],
            "signature": [sig for sig, good in zip(batch.signatures, ok) if good],
        },
        schema=IMAGES_SCHEMA,
    )


def signature_rows(usable: pl.DataFrame) -> np.ndarray:
    """(n, SIGNATURE_BYTES) uint8: the signatures of ``usable`` (IMAGES_SCHEMA), a row each."""
    return np.frombuffer(b"".join(usable["signature"].to_list()), np.uint8).reshape(-1, images.SIGNATURE_BYTES)


COUNT_KEYS = ("scored", "reused", "from_cache", "unread", "embedded", "lost_to_outages")


def counts(batch: Batch) -> dict[str, int]:
    """What became of a batch's images: scored in all, embeddings from the cache (of which unread:
    not even read, being unchanged), embedded now, lost to outages. (``reused``: rows whose findings
    a shard's state kept, ``Tally.add_reused``.)"""
    return {
        "scored": batch.rows.height,
        "reused": 0,
        "from_cache": len(batch.cached),
        "unread": batch.unread,
        "embedded": len(batch.to_embed),
        "lost_to_outages": batch.transient,
    }


Location = tuple[str, str]  # (location, version) of an image file or object (``sources.versions``)


def _from_cache(
    cache: EmbeddingCache | None, located: list[Location | None]
) -> tuple[dict[int, str], dict[int, Entry]]:
    """(row -> sha256 of the rows whose location has the version recorded when their image was
    read; row -> cache entry of those the cache holds)."""
    if cache is None:
        return {}, {}
    known = cache.known_digests(dict(entry for entry in located if entry))
    unchanged = {i: known[entry[0]] for i, entry in enumerate(located) if entry and entry[0] in known}
    hits = cache.get_many(unchanged.values())
    return unchanged, {i: hits[sha] for i, sha in unchanged.items() if sha in hits}


def prepare_batch(
    rows: pl.DataFrame,
    *,
    spec: Spec,
    access: ImageAccess,
    pixels: PixelSpec,
    cache: EmbeddingCache | None = None,
    located: list[Location | None] | None = None,
) -> Batch:
    """Take embeddings from the cache for images unchanged since they were read, fetch the rest,
    take embeddings from the cache by the bytes' digest where it has them, decode what is left.
    ``located``: each row's ``sources.versions``, where the caller has them."""
    refs = rows[spec.image_column].to_list()
    if located is None:
        located = sources.versions(refs, access) if cache is not None else [None] * len(refs)
    unchanged, cached = _from_cache(cache, located)
    sha256: list[str | None] = [unchanged[i] if i in cached else None for i in range(len(refs))]
    unread = len(cached)
    to_fetch = [i for i in range(len(refs)) if i not in cached]
    locations = [where[0] if (where := located[i]) else None for i in to_fetch]
    fetched = dict(zip(to_fetch, fetch_all([refs[i] for i in to_fetch], access, locations=locations)))
    for i, item in fetched.items():
        sha256[i] = None if item.data is None else digest(item.data)
    if cache is not None:
        read = {i: sha for i in to_fetch if (sha := sha256[i]) is not None}
        hits = cache.get_many(read.values())
        cached |= {i: hits[sha] for i, sha in read.items() if sha in hits}
        cache.add_locations((*where, read[i]) for i in read if (where := located[i]) and i not in unchanged)
    pending = [i for i, item in fetched.items() if item.data is not None and i not in cached]
    decoded = images.decode_images([fetched[i] for i in pending], pixels)
    errors = [fetched[i].error if i in fetched else None for i in range(len(refs))]
    for i, error in zip(pending, decoded.errors):
        errors[i] = error
    to_embed = np.array(pending, dtype=int)[decoded.ok]
    signatures = {i: entry.signature for i, entry in cached.items()} | dict(zip(to_embed.tolist(), decoded.signatures))
    return Batch(
        rows,
        errors,
        sha256,
        {i: entry.embedding for i, entry in cached.items()},
        to_embed,
        decoded.pixels,
        [signatures.get(i) for i in range(len(refs))],
        transient=sum(item.transient for item in fetched.values()),
        unread=unread,
    )


def embed_batch(batch: Batch, scorer: Scorer, cache: EmbeddingCache | None = None) -> np.ndarray:
    """(n_usable, d) embeddings of the rows whose image is usable, in row order; new ones are cached."""
    fresh = scorer.embed(batch.pixels)
    if cache is not None and len(fresh):
        cache.add([batch.sha256[i] for i in batch.to_embed], fresh, [batch.signatures[i] for i in batch.to_embed])
    by_row = dict(batch.cached) | dict(zip(batch.to_embed.tolist(), fresh))
    usable = np.flatnonzero(batch.ok).tolist()
    return np.stack([by_row[i] for i in usable]) if usable else fresh[:0]


def prepared_batches(row_batches: Iterable, prepare, *, ahead: int = 2) -> Iterator[Batch]:
    """``prepare`` applied to each batch of rows (or arguments) in a background thread, up to
    ``ahead`` batches in advance, so fetching and decoding overlap with the model working on the
    current batch."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for rows in row_batches:
            pending.append(pool.submit(prepare, rows))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embedded_batches(
    row_batches: Iterable[pl.DataFrame],
    *,
    scorer: Scorer,
    access: ImageAccess,
    cache: EmbeddingCache | None = None,
    located: Iterable[list[Location | None]] | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Each batch of rows with the (usable rows, d) embeddings of its usable images, in row order:
    images fetched and decoded in a background thread a few batches ahead of the model, embeddings
    taken from ``cache`` where it holds them and added to it where not. ``located``: each batch's
    ``sources.versions``, where the caller has them (else they are asked for)."""
    prepare = functools.partial(prepare_batch, spec=scorer.spec, access=access, pixels=scorer.pixels, cache=cache)
    pairs = zip(row_batches, located) if located is not None else ((rows, None) for rows in row_batches)
    for batch in prepared_batches(pairs, lambda pair: prepare(pair[0], located=pair[1])):
        yield batch, embed_batch(batch, scorer, cache)


JUDGED_ROWS = 4096  # rows judged at once: comparing and counting cost per call, not per row


def grouped(
    embedded: Iterable[tuple[Batch, np.ndarray]], *, rows: int = JUDGED_ROWS
) -> Iterator[tuple[Batch, np.ndarray]]:
    """The batches of ``embedded`` (``embedded_batches``) joined, in order, into batches of at least
    ``rows`` rows (the last may have fewer), with their embeddings; their pixels, once embedded, dropped."""
    pending: list[tuple[Batch, np.ndarray]] = []
    held = 0  # rows in pending
    for batch, vectors in embedded:  # (a view of no pixels would keep them all)
        pending.append((dataclasses.replace(batch, pixels=np.zeros((0, *batch.pixels.shape[1:]), np.float32)), vectors))
        held += batch.rows.height
        if held >= rows:
            yield _joined(pending)
            pending, held = [], 0
    if pending:
        yield _joined(pending)


def _joined(embedded: list[tuple[Batch, np.ndarray]]) -> tuple[Batch, np.ndarray]:
    if len(embedded) == 1:
        return embedded[0]
    batches = [batch for batch, _ in embedded]
    starts = [0, *itertools.accumulate(batch.rows.height for batch in batches)]  # of each batch's rows
    joined = Batch(
        pl.concat([batch.rows for batch in batches]),
        [error for batch in batches for error in batch.errors],
        [sha for batch in batches for sha in batch.sha256],
        {start + i: vector for start, batch in zip(starts, batches) for i, vector in batch.cached.items()},
        np.concatenate([start + batch.to_embed for start, batch in zip(starts, batches)]),
        batches[0].pixels,  # none: ``grouped`` dropped them
        [sig for batch in batches for sig in batch.signatures],
        transient=sum(batch.transient for batch in batches),
        unread=sum(batch.unread for batch in batches),
    )
    return joined, np.concatenate([vectors for _, vectors in embedded])


class Tally:
    """What became of the images of ``row_count`` catalog rows so far (``COUNT_KEYS``), and the
    usable ones (``IMAGES_SCHEMA``, with ``keep_images``): each batch counted, an outage past
    ``max_transient`` of the ``catalog_rows`` (default ``row_count``: a shard's catalog has more)
    raised at once (``check_outage``), progress logged as ``what``."""

    def __init__(
        self,
        row_count: int,
        *,
        max_transient: float,
        what: str,
        keep_images: bool = True,
        catalog_rows: int | None = None,
    ):
        self.row_count, self.max_transient, self.what = row_count, max_transient, what
        self.catalog_rows = row_count if catalog_rows is None else catalog_rows
        self.counts: Counter = Counter(dict.fromkeys(COUNT_KEYS, 0))
        self.images = [pl.DataFrame(schema=IMAGES_SCHEMA)] if keep_images else None

    def add(self, batch: Batch, spec: Spec) -> None:
        self.counts.update(counts(batch))
        if self.images is not None:
            self.images.append(usable_images(batch, spec))
        check_outage(self.counts["lost_to_outages"], self.catalog_rows, self.max_transient)
        progress_log.info(
            "%s: %d/%d products done",
            self.what,
            self.counts["scored"],
            self.row_count,
            extra={"progress": (self.counts["scored"], self.row_count)},
        )

    def add_reused(self, rows: int) -> None:
        """``rows`` whose findings were reused as a shard's state kept them: their images unread."""
        self.counts.update(dict.fromkeys(("scored", "reused", "from_cache", "unread"), rows))

    def usable(self) -> pl.DataFrame:
        """(IMAGES_SCHEMA) the usable images of every batch so far, in order."""
        return pl.concat(self.images or [pl.DataFrame(schema=IMAGES_SCHEMA)])


def cache_folder(output_uri: str, files: ModelFiles, backend: str) -> str:
    """Where the embeddings of this model's image tower on ``backend``, with its preprocessing and
    views, are kept under ``output_uri``."""
    key = cache_key(files.fingerprint(), files.pixels, backend, files.view())
    return storage.join(output_uri, "_embedding_cache", key)
