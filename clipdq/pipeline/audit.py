"""The audit's steps as plain functions: batches of products embedded (``embedding``), scored,
compared with the catalog, and their texts judged.

The shards (``shards``) and cross-fitting (``crossfit``) call these; tests can call them directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from clipdq.checks.compare import compare, text_findings
from clipdq.checks.schemas import DUPLICATES_SCHEMA, FINDINGS_SCHEMA, PREDICTIONS_SCHEMA, TEXTS_SCHEMA
from clipdq.core import predict, text, tree, values
from clipdq.core.options import AuditOptions, Backend
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec
from clipdq.core.text import TextCalibration, texts_of
from clipdq.io import images
from clipdq.io.cache import EmbeddingCache, digest
from clipdq.io.catalog import CatalogFile
from clipdq.io.images import Signatures
from clipdq.io.sources import ImageAccess
from clipdq.model.files import ModelFiles
from clipdq.model.scorer import Scorer, load_model, value_embeddings_for
from clipdq.pipeline.embedding import Batch, Tally, embed_batch, embedded_batches, grouped

if TYPE_CHECKING:
    from clipdq.model.towers import Clip

log = logging.getLogger(__name__)


MIN_AGREEMENT = 0.99  # share of images a faster backend must predict exactly as fp32 does


@dataclass(frozen=True)
class AuditInputs:
    """One audit's inputs, read and opened once: what its steps share."""

    catalog_uri: str
    model_uri: str
    output_uri: str
    spec_text: str  # as read: a shard parses it again in its own process
    spec: Spec
    source: CatalogFile
    files: ModelFiles  # the model's files: its weights load only where an image must be embedded
    access: ImageAccess  # where the catalog's images may be read from
    options: AuditOptions


@dataclass
class Scored:
    """A catalog scored and not yet published: its findings in a local Parquet file, and what the
    summary says of how they were made."""

    findings_file: str
    usable: pl.DataFrame  # product_id and sha256 of each row whose image is usable
    signatures: Callable[[], Signatures]  # (usable rows, SIGNATURE_BYTES) uint8, a row each: duplicate search's
    # input, read only where the search runs
    images: dict[str, int]  # what became of the images (embedding.COUNT_KEYS)
    calibrations: list[dict[str, Calibration]]  # per model that scored: one, or one per fold (cross-fitting)
    text_calibration: TextCalibration | None  # how image and text agreement is judged (the model's)
    texts_judged: dict  # how the texts were judged (judge_texts; per fold under cross-fitting)
    reported: int | None = None  # products in the findings, where counted along the way
    shards: dict | None = None  # count, rows_per_shard and reused, for an audit in shards


def run_record(scored: Scored, inputs: AuditInputs, *, run_id: str, started: datetime, backend: dict) -> dict:
    """What summary.json says of the run before its findings are counted: its inputs and options,
    the backend used, what became of the images, the shards, and the calibration in force, one per
    model that scored (one; one per fold under cross-fitting)."""
    calibrations = [{name: c.to_dict() for name, c in calibration.items()} for calibration in scored.calibrations]
    return {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "catalog": inputs.catalog_uri,
        "model": inputs.model_uri,
        "model_fingerprint": inputs.files.fingerprint(),
        "target_precision": inputs.spec.target_precision,
        "cross_fit": inputs.options.cross_fit,
        "backend": backend,
        "options": inputs.options.model_dump(),
        "images": scored.images,
        **({"shards": scored.shards} if scored.shards else {}),
        "calibration": calibrations,
    }


def duplicate_listings(
    scored: Scored, spec: Spec, *, kept: pl.DataFrame | None = None, search: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """(duplicate listings among the usable images (DUPLICATES_SCHEMA), the search that found them
    (DUPLICATE_SEARCH_SCHEMA)): ``kept`` (the previous run's, where it saw the same images at the
    same threshold: ``images_key``) with its ``search``; else searched again, keeping the links of
    the previous ``search`` between images that did not change; none where the spec asks for none."""
    if spec.duplicate_similarity is None:
        return pl.DataFrame(schema=DUPLICATES_SCHEMA), None
    if kept is not None and search is not None:
        return kept, search
    from clipdq.checks import duplicates  # imports torch: not needed for a rerun of an unchanged catalog

    found, searched = duplicates.find(
        scored.usable["product_id"],
        scored.usable["sha256"],
        scored.signatures(),
        threshold=spec.duplicate_similarity,
        searched=search,
    )
    log.info(
        "duplicate listings: %d products in %d groups among %d images (%s)",
        found.height,
        found["group"].n_unique(),
        scored.usable.height,
        "the earlier search's links kept" if search is not None else "searched afresh",
    )
    return found, searched


def choose_backend(
    clip: Clip,
    backend: Backend,
    rows: pl.DataFrame,
    *,
    spec: Spec,
    access: ImageAccess,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[Clip, dict]:
    """``clip`` on ``backend`` where, on the images of ``rows``, its predicted values agree with
    fp32's for at least ``min_agreement`` of the images; else ``clip`` as it is. Also returns what
    was measured."""
    if backend == "fp32":
        return clip, {"requested": backend, "used": backend}
    from clipdq.model import towers

    fast = towers.on_backend(clip, backend)
    loaded = images.load_images(rows[spec.image_column].to_list(), access, clip.pixels)
    share = predict.agreement(
        towers.embed_images(clip, loaded.pixels),
        towers.embed_images(fast, loaded.pixels),
        value_embeddings_for(clip, spec),
    )
    agreed = share >= min_agreement  # False when no image could be checked (nan)
    return (fast if agreed else clip), {
        "requested": backend,
        "used": backend if agreed else "fp32",
        "agreement": None if np.isnan(share) else round(share, 4),
        "images_checked": int(loaded.ok.sum()),
    }


def backend_check(inputs: AuditInputs) -> dict:
    """What summary.json says of the backend: the one requested, the one used (the requested one
    where its predictions on the catalog's first batch agree with fp32's: ``choose_backend``) and
    the agreement."""
    backend, source = inputs.options.backend, inputs.source
    if backend == "fp32" or not source.row_count:
        return {"requested": backend, "used": backend}
    rows = next(source.batches(inputs.options.batch_size))
    _, checked = choose_backend(load_model(inputs.model_uri), backend, rows, spec=inputs.spec, access=inputs.access)
    log.info(
        "backend %s: predictions agree with fp32 for %s of %d images checked; using %s",
        backend,
        checked["agreement"],
        checked["images_checked"],
        checked["used"],
    )
    return checked


def batches(frame: pl.DataFrame, size: int) -> Iterator[pl.DataFrame]:
    for offset in range(0, frame.height, size):
        yield frame.slice(offset, size)


def images_key(images: pl.DataFrame, threshold: float | None) -> str | None:
    """A digest of which image each usable product has, the threshold and the listings' columns:
    equal keys, equal duplicate listings (a rerun of an unchanged catalog reuses the previous
    run's); None where the spec asks for no duplicate listings (``threshold`` None)."""
    if threshold is None:
        return None
    rows = images.select("product_id", "sha256").sort("product_id")
    digest = hashlib.sha256(json.dumps([pl.__version__, threshold, list(DUPLICATES_SCHEMA), rows.height]).encode())
    for offset in range(0, rows.height, 1 << 20):  # in the columns' hash: no Python object per row
        digest.update(values.row_hashes(rows.slice(offset, 1 << 20)).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def score_batch(
    batch: Batch, *, scorer: Scorer, cache: EmbeddingCache | None = None, image_emb: np.ndarray | None = None
) -> pl.DataFrame:
    """Predictions (PREDICTIONS_SCHEMA) for every row and attribute; failed images keep their error.
    ``image_emb``: the batch's ``embed_batch`` where the caller has it."""
    image_emb = embed_batch(batch, scorer, cache) if image_emb is None else image_emb
    spec = scorer.spec
    probs = {
        a.name: predict.softmax(
            predict.logits_for(image_emb, scorer.value_emb[a.name], scale=scorer.scale),
            temperature=scorer.calibration[a.name].temperature,
        )
        for a in spec.attributes
    }
    return predictions_of(
        batch.rows[spec.id_column].cast(pl.String).to_list(),
        tree.choose(probs, spec),
        spec,
        ok=batch.ok,
        errors=batch.errors,
    )


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


def text_scores(
    batch: Batch, image_emb: np.ndarray, scorer: Scorer, cache: EmbeddingCache | None = None
) -> pl.DataFrame:
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
    frame = pl.DataFrame(
        {
            "product_id": batch.rows[spec.id_column].cast(pl.String),
            "text": texts.tolist(),
            "category": categories.tolist(),
            "score": score,
            "image_error": batch.errors,
        },
        schema=TEXTS_SCHEMA,
        strict=False,
    )
    return frame.with_columns(pl.col("score").fill_nan(None)).filter(pl.col("text") != "")


def judge_texts(texts: pl.DataFrame, calibration: TextCalibration | None, spec: Spec) -> tuple[pl.DataFrame, dict]:
    """(findings of image and text agreement for ``texts``, what the summary says of how they were
    judged): every audited row with a text (TEXTS_SCHEMA), judged by ``text_judge``."""
    judge, judged = text_judge(texts["score"].drop_nulls().to_numpy(), calibration, spec)
    return judge(texts), judged


def text_judge(
    scores: np.ndarray, calibration: TextCalibration | None, spec: Spec
) -> tuple[Callable[[pl.DataFrame], pl.DataFrame], dict]:
    """(what makes the findings of a frame of texts, what the summary says of how they are judged),
    for an audit whose texts scored ``scores``: each score judged against the audited catalog's
    own typical score (``text.catalog_shift``), so texts can be judged a part at a time."""
    if spec.text_column is None:
        return lambda texts: pl.DataFrame(schema=FINDINGS_SCHEMA), {}
    shift = text.catalog_shift(scores)
    judged = {
        "catalog_rows": len(scores),
        "catalog_shift": round(shift or 0.0, 3),
        "against": "validation" if shift is None else "this catalog",
    }
    judge = functools.partial(text_findings, column=spec.text_column, calibration=calibration, shift=shift or 0.0)
    return judge, judged


def predictions_of(
    ids: list[str],
    choices: dict[str, tuple[np.ndarray, np.ndarray]],
    spec: Spec,
    *,
    ok: np.ndarray | None = None,
    errors: list[str | None] | None = None,
) -> pl.DataFrame:
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
        frames.append(
            pl.DataFrame(
                {
                    "product_id": ids,
                    "attribute": attribute.name,
                    "predicted_value": pl.Series(values.tolist(), dtype=pl.String),
                    "confidence": pl.Series(confidence).fill_nan(None),
                    "image_error": errors or [None] * len(ids),
                },
                schema=PREDICTIONS_SCHEMA,
            )
        )
    return pl.concat(frames)


def judge_batch(
    batch: Batch, image_emb: np.ndarray, scorer: Scorer, cache: EmbeddingCache | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(findings (FINDINGS_SCHEMA), texts (TEXTS_SCHEMA)) of one batch with its ``embed_batch``."""
    predictions = score_batch(batch, scorer=scorer, image_emb=image_emb)
    findings = compare(batch.rows, predictions, spec=scorer.spec, calibration=scorer.calibration)
    return findings, text_scores(batch, image_emb, scorer, cache)


def findings_of(
    row_batches: Iterable[pl.DataFrame],
    *,
    scorer: Scorer,
    access: ImageAccess,
    cache: EmbeddingCache | None = None,
    tally: Tally | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(findings (FINDINGS_SCHEMA), texts (TEXTS_SCHEMA)) of the catalog rows in ``row_batches``,
    scored by ``scorer``; the texts are judged once all are scored (``judge_texts``).

    Each batch is compared as it is scored, so only findings, not catalog rows, pile up; ``tally``
    counts each batch once it is scored.
    """
    spec = scorer.spec
    parts, texts = [pl.DataFrame(schema=FINDINGS_SCHEMA)], [pl.DataFrame(schema=TEXTS_SCHEMA)]
    for batch, image_emb in grouped(embedded_batches(row_batches, scorer=scorer, access=access, cache=cache)):
        findings, scored_texts = judge_batch(batch, image_emb, scorer, cache)
        parts.append(findings)
        texts.append(scored_texts)
        if tally is not None:
            tally.add(batch, spec)
    return pl.concat(parts), pl.concat(texts)
