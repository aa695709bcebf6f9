"""Validation and test figures per attribute from logits and labels (numpy only).

``logits`` maps attribute -> (n, k) scaled similarities, ``labels`` attribute -> (n,) value
indices with -1 where unknown.
"""

from __future__ import annotations

import numpy as np

from clipdq import predict
from clipdq.spec import Spec


def macro_f1(labels: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """Unweighted mean F1 over the values that occur in labels or predictions."""
    scores = []
    for value in range(k):
        tp = np.sum((predicted == value) & (labels == value))
        support = np.sum(labels == value) + np.sum(predicted == value)
        if support:
            scores.append(2 * tp / support)
    return float(np.mean(scores))


def calibrate(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: Spec, *, label_noise: float = 0.0
) -> tuple[dict, dict]:
    """(calibration, validation metrics) per attribute with at least two known labels.

    ``label_noise``: the share of wrong labels (see ``predict.calibrate``)."""
    calibration, metrics = {}, {}
    for name, attr_logits in logits.items():
        known = labels[name] >= 0
        if known.sum() < 2:
            continue
        x, y = attr_logits[known], labels[name][known]
        fitted = predict.calibrate(x, y, target_precision=spec.target_precision, error_rate=spec.expected_error_rate,
                                   label_noise=label_noise)
        probs = predict.softmax(x, temperature=fitted.temperature)
        calibration[name] = fitted.to_dict()
        metrics[name] = {
            "val_rows": int(known.sum()),
            "val_accuracy": float((probs.argmax(1) == y).mean()),
            "ece_before": predict.expected_calibration_error(predict.softmax(x), y),
            "ece_after": predict.expected_calibration_error(probs, y),
        }
    return calibration, metrics


def held_out_metrics(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: Spec) -> dict:
    """Per attribute: accuracy, macro-F1 and the confusion matrix (rows: true value)."""
    out = {}
    for attribute in spec.attributes:
        known = labels[attribute.name] >= 0
        if not known.any():
            continue
        predicted = logits[attribute.name][known].argmax(1)
        truth, k = labels[attribute.name][known], len(attribute.values)
        confusion = np.zeros((k, k), dtype=int)
        np.add.at(confusion, (truth, predicted), 1)
        out[attribute.name] = {"test_rows": int(known.sum()), "test_accuracy": float((predicted == truth).mean()),
                               "test_macro_f1": macro_f1(truth, predicted, k), "confusion": confusion.tolist()}
    return out
