"""The audit's steps as plain functions: prepare batches of products (fetch, cache, decode) ahead
of the model, score them, then compare and summarise.

The Prefect flow in ``flows/audit.py`` calls these in order; tests can call them directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from clipdq import images, predict, sources, text, tree
from clipdq.cache import EmbeddingCache, digest
from clipdq.compare import FINDINGS_SCHEMA, PREDICTIONS_SCHEMA, TEXTS_SCHEMA, compare, text_findings, texts_of
from clipdq.images import PixelSpec
from clipdq.scorer import Scorer, value_embeddings_for
from clipdq.sources import ImageAccess, fetch_all
from clipdq.spec import Spec
from clipdq.text import TextCalibration

if TYPE_CHECKING:
    from clipdq.model import Clip

log = logging.getLogger(__name__)


class ImageOutage(RuntimeError):
    """Too many images were lost to storage or network errors for the run's findings to stand."""


def check_outage(lost: int, rows: int, max_share: float) -> None:
    """Raise ImageOutage once ``lost`` of ``rows`` images exceed ``max_share``: findings made
    during an outage would report the store's trouble as the catalog's."""
    if lost and lost > max_share * rows:
        raise ImageOutage(f"{lost} of {rows} images could not be fetched for transient reasons (storage or "
                          f"network errors), more than max_transient_image_errors={max_share:g}: nothing published")


MIN_AGREEMENT = 0.99  # share of images a faster backend must predict exactly as fp32 does


def choose_backend(
    clip: Clip, backend: str, rows: pl.DataFrame, *, spec: Spec, access: ImageAccess,
    min_agreement: float = MIN_AGREEMENT
) -> tuple[Clip, dict]:
    """``clip`` on ``backend`` where, on the images of ``rows``, its predicted values agree with
    fp32's for at least ``min_agreement`` of the images; else ``clip`` as it is. Also returns what
    was measured."""
    if backend == "fp32":
        return clip, {"requested": backend, "used": backend}
    from clipdq import model

    fast = model.on_backend(clip, backend)
    loaded = images.load_images(rows[spec.image_column].to_list(), access, clip.pixels)
    share = predict.agreement(model.embed_images(clip, loaded.pixels), model.embed_images(fast, loaded.pixels),
                              value_embeddings_for(clip, spec))
    agreed = share >= min_agreement  # False when no image could be checked (nan)
    return (fast if agreed else clip), {"requested": backend, "used": backend if agreed else "fp32",
                                        "agreement": None if np.isnan(share) else round(share, 4),
                                        "images_checked": int(loaded.ok.sum())}


def batches(frame: pl.DataFrame, size: int) -> Iterator[pl.DataFrame]:
    for offset in range(0, frame.height, size):
        yield frame.slice(offset, size)


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


IMAGES_SCHEMA = {"product_id": pl.String, "sha256": pl.String, "signature": pl.Binary}


def usable_images(batch: Batch, spec: Spec) -> pl.DataFrame:
    """(IMAGES_SCHEMA) the id, digest and pixel signature of each row whose image is usable."""
    ok = batch.ok
    return pl.DataFrame({"product_id": batch.rows[spec.id_column].cast(pl.String).filter(ok),
                         "sha256": [sha for sha, good in zip(batch.sha256, ok) if good],
                         "signature": [sig for sig, good in zip(batch.signatures, ok) if good]}, schema=IMAGES_SCHEMA)


def signature_rows(usable: pl.DataFrame) -> np.ndarray:
    """(n, SIGNATURE_BYTES) uint8: the signatures of ``usable`` (IMAGES_SCHEMA), a row each."""
    return np.frombuffer(b"".join(usable["signature"].to_list()), np.uint8).reshape(-1, images.SIGNATURE_BYTES)


DUPLICATES_SCHEMA = {"group": pl.Int64, "product_id": pl.String, "group_size": pl.Int32, "other_id": pl.String,
                     "similarity": pl.Float32, "kind": pl.String,
                     "crop_area": pl.Float32}  # duplicate listings (clipdq.duplicates)


def images_key(images: pl.DataFrame, threshold: float) -> str:
    """A digest of which image each usable product has, the threshold and the listings' columns:
    equal keys, equal duplicate listings (a rerun of an unchanged catalog reuses the previous run's)."""
    rows = images.select("product_id", "sha256").sort("product_id")
    payload = json.dumps([threshold, list(DUPLICATES_SCHEMA), rows["product_id"].to_list(),
                          rows["sha256"].to_list()])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


COUNT_KEYS = ("scored", "from_cache", "unread", "embedded", "lost_to_outages")


def counts(batch: Batch) -> dict[str, int]:
    """What became of a batch's images: scored in all, embeddings from the cache (of which unread:
    not even read, being unchanged), embedded now, lost to outages."""
    return {"scored": batch.rows.height, "from_cache": len(batch.cached), "unread": batch.unread,
            "embedded": len(batch.to_embed), "lost_to_outages": batch.transient}


def _unchanged(refs: list, access: ImageAccess, cache: EmbeddingCache) -> tuple[list, dict[int, str]]:
    """(per row: (location, version) or None; row -> sha256 of the rows whose location has the
    version recorded when their image was read)."""
    located = sources.versions(refs, access)
    known = cache.known_digests(dict(entry for entry in located if entry))
    return located, {i: known[entry[0]] for i, entry in enumerate(located) if entry and entry[0] in known}


def prepare_batch(
    rows: pl.DataFrame, *, spec: Spec, access: ImageAccess, pixels: PixelSpec, cache: EmbeddingCache | None = None
) -> Batch:
    """Take embeddings from the cache for images unchanged since they were read, fetch the rest,
    take embeddings from the cache by the bytes' digest where it has them, decode what is left."""
    refs = rows[spec.image_column].to_list()
    sha256: list[str | None] = [None] * len(refs)
    cached: dict[int, np.ndarray] = {}
    located, unchanged = [None] * len(refs), {}
    if cache is not None:
        located, unchanged = _unchanged(refs, access, cache)
        hits = cache.get_many(unchanged.values())
        cached = {i: hits[sha] for i, sha in unchanged.items() if sha in hits}  # row -> cache Entry
        for i in cached:
            sha256[i] = unchanged[i]
    unread = len(cached)
    to_fetch = [i for i in range(len(refs)) if i not in cached]
    fetched = dict(zip(to_fetch, fetch_all([refs[i] for i in to_fetch], access)))
    for i, item in fetched.items():
        sha256[i] = None if item.data is None else digest(item.data)
    if cache is not None:
        hits = cache.get_many(sha256[i] for i in to_fetch if sha256[i])
        cached |= {i: hits[sha256[i]] for i in to_fetch if sha256[i] in hits}
        cache.add_locations((*located[i], sha256[i]) for i in to_fetch if located[i] and sha256[i] and i not in unchanged)
    pending = [i for i, item in fetched.items() if item.data is not None and i not in cached]
    decoded = images.decode_images([fetched[i] for i in pending], pixels)
    errors = [fetched[i].error if i in fetched else None for i in range(len(refs))]
    for i, error in zip(pending, decoded.errors):
        errors[i] = error
    to_embed = np.array(pending, dtype=int)[decoded.ok]
    signatures = {i: entry.signature for i, entry in cached.items()} | dict(zip(to_embed.tolist(), decoded.signatures))
    return Batch(rows, errors, sha256, {i: entry.embedding for i, entry in cached.items()}, to_embed, decoded.pixels,
                 [signatures.get(i) for i in range(len(refs))],
                 transient=sum(item.transient for item in fetched.values()), unread=unread)


def embed_batch(batch: Batch, scorer: Scorer, cache: EmbeddingCache | None = None) -> np.ndarray:
    """(n_usable, d) embeddings of the rows whose image is usable, in row order; new ones are cached."""
    fresh = scorer.embed(batch.pixels)
    if cache is not None and len(fresh):
        cache.add([batch.sha256[i] for i in batch.to_embed], fresh, [batch.signatures[i] for i in batch.to_embed])
    by_row = dict(batch.cached) | dict(zip(batch.to_embed.tolist(), fresh))
    usable = np.flatnonzero(batch.ok)
    return np.stack([by_row[i] for i in usable]) if len(usable) else fresh[:0]


def prepared_batches(row_batches: Iterable[pl.DataFrame], prepare, *, ahead: int = 2) -> Iterator[Batch]:
    """``prepare`` applied to each batch of rows in a background thread, up to ``ahead`` batches in
    advance, so fetching and decoding overlap with the model working on the current batch."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for rows in row_batches:
            pending.append(pool.submit(prepare, rows))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def score_batch(batch: Batch, *, scorer: Scorer, cache: EmbeddingCache | None = None,
                image_emb: np.ndarray | None = None) -> pl.DataFrame:
    """Predictions (PREDICTIONS_SCHEMA) for every row and attribute; failed images keep their error.
    ``image_emb``: the batch's ``embed_batch`` where the caller has it."""
    image_emb = embed_batch(batch, scorer, cache) if image_emb is None else image_emb
    spec = scorer.spec
    probs = {a.name: predict.softmax(predict.logits_for(image_emb, scorer.value_emb[a.name], scale=scorer.scale),
                                     temperature=scorer.calibration[a.name].temperature) for a in spec.attributes}
    return predictions_of(batch.rows[spec.id_column].cast(pl.String).to_list(), tree.choose(probs, spec), spec,
                          ok=batch.ok, errors=batch.errors)


TEXT_KEY = b"text\0"  # prefixes a text's bytes for its key in the embedding cache (images are keyed by theirs)


def text_embeddings(texts: list[str], scorer: Scorer, cache: EmbeddingCache | None = None) -> np.ndarray:
    """(n, d) embeddings of ``texts``, from the cache where it holds them, so that a rerun of an
    unchanged catalog loads no model; the others are embedded once each and cached."""
    keys = [digest(TEXT_KEY + t.encode()) for t in texts]
    found = {key: entry.embedding for key, entry in (cache.get_many(keys) if cache is not None else {}).items()}
    missing = {key: text for key, text in zip(keys, texts) if key not in found}  # each distinct text once
    if missing:
        fresh = scorer.embed_texts(list(missing.values()))
        found |= dict(zip(missing, fresh))
        if cache is not None:
            cache.add(list(missing), fresh, [b""] * len(missing))
    return np.stack([found[key] for key in keys])


def text_scores(batch: Batch, image_emb: np.ndarray, scorer: Scorer,
                cache: EmbeddingCache | None = None) -> pl.DataFrame:
    """(TEXTS_SCHEMA) the batch's rows with a text, each scored against its image where both are
    there and the model is calibrated on texts; empty where the spec names no text column."""
    spec = scorer.spec
    if spec.text_column is None:
        return pl.DataFrame(schema=TEXTS_SCHEMA)
    texts, categories = texts_of(batch.rows, spec)
    ok, calibration = batch.ok, scorer.text_calibration
    score = np.full(len(texts), np.nan)
    if calibration is not None and ok.any():
        agreement = text.row_agreement(image_emb, text_embeddings(texts[ok].tolist(), scorer, cache))
        score[ok] = calibration.scores(agreement, categories[ok])
    frame = pl.DataFrame({"product_id": batch.rows[spec.id_column].cast(pl.String), "text": texts.tolist(),
                          "category": categories.tolist(), "score": score, "image_error": batch.errors},
                         schema=TEXTS_SCHEMA, strict=False)
    return frame.with_columns(pl.col("score").fill_nan(None)).filter(pl.col("text") != "")


def judge_texts(texts: pl.DataFrame, calibration: TextCalibration | None, spec: Spec) -> tuple[pl.DataFrame, dict]:
    """(findings of image and text agreement for ``texts``, what the summary says of how they were
    judged): every audited row with a text (TEXTS_SCHEMA), its score judged against the audited
    catalog's own typical score (``text.catalog_shift``)."""
    if spec.text_column is None:
        return pl.DataFrame(schema=FINDINGS_SCHEMA), {}
    scores = texts["score"].drop_nulls().to_numpy()
    shift = text.catalog_shift(scores)
    judged = {"catalog_rows": len(scores), "catalog_shift": round(shift or 0.0, 3),
              "against": "validation" if shift is None else "this catalog"}
    return text_findings(texts, column=spec.text_column, calibration=calibration, shift=shift or 0.0), judged


def predictions_of(ids: list[str], choices: dict[str, tuple[np.ndarray, np.ndarray]], spec: Spec, *,
                   ok: np.ndarray | None = None, errors: list[str | None] | None = None) -> pl.DataFrame:
    """Predictions (PREDICTIONS_SCHEMA) from each attribute's choices (``tree.choose``) for the rows
    ``ok`` (all by default); the other rows keep their image ``errors``."""
    ok = np.ones(len(ids), dtype=bool) if ok is None else ok
    frames = []
    for attribute in spec.attributes:
        chosen, probability = choices[attribute.name]
        values = np.full(len(ids), None, dtype=object)
        values[ok] = np.array(attribute.values, dtype=object)[chosen]
        confidence = np.full(len(ids), np.nan)
        confidence[ok] = probability
        frames.append(pl.DataFrame(
            {"product_id": ids, "attribute": attribute.name, "predicted_value": pl.Series(values.tolist(), dtype=pl.String),
             "confidence": pl.Series(confidence).fill_nan(None), "image_error": errors or [None] * len(ids)},
            schema=PREDICTIONS_SCHEMA,
        ))
    return pl.concat(frames)


def findings_of(
    row_batches: Iterable[pl.DataFrame],
    *,
    scorer: Scorer,
    access: ImageAccess,
    cache: EmbeddingCache | None = None,
    on_batch: Callable[[Batch], None] = lambda batch: None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(findings (FINDINGS_SCHEMA), texts (TEXTS_SCHEMA)) of the catalog rows in ``row_batches``,
    scored by ``scorer``; the texts are judged once all are scored (``judge_texts``).

    Images are fetched and decoded in a background thread a few batches ahead of the model; each
    batch is compared as it is scored, so only findings, not catalog rows, pile up. ``on_batch``
    sees each batch once it is scored.
    """
    spec = scorer.spec
    prepare = functools.partial(prepare_batch, spec=spec, access=access, pixels=scorer.pixels, cache=cache)
    parts, texts = [pl.DataFrame(schema=FINDINGS_SCHEMA)], [pl.DataFrame(schema=TEXTS_SCHEMA)]
    for batch in prepared_batches(row_batches, prepare):
        image_emb = embed_batch(batch, scorer, cache)
        predictions = score_batch(batch, scorer=scorer, image_emb=image_emb)
        parts.append(compare(batch.rows, predictions, spec=spec, calibration=scorer.calibration))
        texts.append(text_scores(batch, image_emb, scorer, cache))
        on_batch(batch)
    return pl.concat(parts), pl.concat(texts)
