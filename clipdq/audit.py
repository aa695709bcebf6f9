"""The audit's steps as plain functions: score products in batches, then compare and summarise.

The Prefect flow in ``flows/audit.py`` calls these in order; tests can call them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import polars as pl

from clipdq import images, model, predict
from clipdq.compare import PREDICTIONS_SCHEMA
from clipdq.predict import Calibration
from clipdq.spec import Spec

log = logging.getLogger(__name__)


def calibration_for(clip: model.Clip, spec: Spec) -> dict[str, Calibration]:
    """The model's fitted calibration where it was trained on this spec, else defaults from the spec."""
    fitted = clip.meta.get("calibration", {})
    if fitted and clip.meta.get("spec_fingerprint") != spec.fingerprint():
        log.warning("model %s was trained on another spec: its calibration is ignored", clip.source)
        fitted = {}
    default = predict.default_calibration(spec.target_precision, spec.expected_error_rate)
    return {name: Calibration(**fitted[name]) if name in fitted else default for name in spec.names}


def value_embeddings_for(clip: model.Clip, spec: Spec) -> dict[str, np.ndarray]:
    """The model's learned value embeddings where it was trained on this spec, else its captions'."""
    if clip.value_emb is not None and clip.meta.get("spec_fingerprint") == spec.fingerprint():
        return clip.value_emb
    return model.embed_captions(clip, spec)


def batches(frame: pl.DataFrame, size: int) -> Iterator[pl.DataFrame]:
    for offset in range(0, frame.height, size):
        yield frame.slice(offset, size)


def score_batch(
    rows: pl.DataFrame,
    *,
    clip: model.Clip,
    spec: Spec,
    value_emb: dict[str, np.ndarray],
    calibration: dict[str, Calibration],
    base: str,
) -> pl.DataFrame:
    """Predictions (PREDICTIONS_SCHEMA) for every row and attribute; failed images keep their error."""
    loaded = images.load_images(rows[spec.image_column].to_list(), base, clip.pixels)
    image_emb = model.embed_images(clip, loaded.pixels)
    scale = model.logit_scale(clip)
    ids = rows[spec.id_column].cast(pl.String).to_list()
    frames = []
    for attribute in spec.attributes:
        probs = predict.softmax(
            predict.logits_for(image_emb, value_emb[attribute.name], scale=scale),
            temperature=calibration[attribute.name].temperature,
        )
        values = np.full(len(ids), None, dtype=object)
        values[loaded.ok] = np.array(attribute.values, dtype=object)[probs.argmax(axis=1)]
        confidence = np.full(len(ids), np.nan)
        confidence[loaded.ok] = probs.max(axis=1)
        frames.append(pl.DataFrame(
            {"product_id": ids, "attribute": attribute.name, "predicted_value": pl.Series(values, dtype=pl.String),
             "confidence": pl.Series(confidence).fill_nan(None), "image_error": loaded.errors},
            schema=PREDICTIONS_SCHEMA,
        ))
    return pl.concat(frames)
