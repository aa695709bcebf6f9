"""Calibration on the validation split: each attribute's temperature and flag thresholds
(``core.evaluation.calibrate``), what they rest on, and the image and text agreement's threshold.

Vocabulary as in ``labeled``; ``val_emb`` the (n, d) image embeddings of the validation rows
``val_idx``, ``value_emb`` attribute -> (k, d) value embeddings.
"""

from __future__ import annotations

import logging

import numpy as np

from clipdq.core import evaluation, predict, text
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec
from clipdq.model import towers
from clipdq.training.labeled import LabeledSet, labels_of

log = logging.getLogger(__name__)

BOUND = "one-sided 90% Wilson lower bound of accuracy"  # what a threshold's precision is judged by (predict.BOUND_Z)


def logits_from(image_emb: np.ndarray, value_emb: dict[str, np.ndarray], clip: towers.Clip) -> dict[str, np.ndarray]:
    """Per attribute, (n, k) scaled similarities of image embeddings to the value embeddings."""
    scale = towers.logit_scale(clip)
    return {name: predict.logits_for(image_emb, emb, scale=scale) for name, emb in value_emb.items()}


def calibrate_attributes(
    clip: towers.Clip,
    data: LabeledSet,
    spec: Spec,
    val_idx: np.ndarray,
    val_emb: np.ndarray,
    value_emb: dict[str, np.ndarray],
    *,
    label_noise: float,
) -> tuple[dict[str, Calibration], dict[str, dict]]:
    """(calibration, validation figures) per attribute with at least two known validation labels."""
    return evaluation.calibrate(
        logits_from(val_emb, value_emb, clip), labels_of(data, val_idx), spec, label_noise=label_noise
    )


def calibration_basis(spec: Spec, val_idx: np.ndarray, *, label_noise: float) -> dict:
    """What the thresholds rest on, for the model card (the grouping is added by ``train.finetune``)."""
    return {
        "split": "validation",
        "rows": len(val_idx),
        "bound": BOUND,
        "target_precision": spec.target_precision,
        "expected_error_rate": spec.expected_error_rate,
        "label_noise": label_noise,
    }


def calibrate_texts(
    clip: towers.Clip, data: LabeledSet, spec: Spec, rows: np.ndarray, image_emb: np.ndarray, *, seed: int
) -> text.TextCalibration:
    """Image and text agreement calibrated on the given (validation) rows that have a text."""
    # the rows have texts and categories only where the spec has a text column
    assert data.texts is not None and data.text_categories is not None and spec.text_column is not None
    known = data.texts[rows] != ""
    texts = data.texts[rows][known]
    calibration = text.calibrate(
        image_emb[known],
        towers.embed_texts(clip, texts.tolist()),
        texts,
        data.text_categories[rows][known],
        column=spec.text_column,
        target_precision=spec.target_precision,
        error_rate=spec.expected_error_rate,
        seed=seed,
    )
    log.info(
        "image and text agreement: threshold %s from %d validation rows and %d planted mismatches",
        calibration.threshold,
        calibration.rows,
        calibration.planted_rows,
    )
    return calibration
