"""Validation and test figures per attribute from logits and labels (numpy only).

``logits`` maps attribute -> (n, k) scaled similarities, ``labels`` attribute -> (n,) value
indices with -1 where unknown.
"""

from __future__ import annotations

import numpy as np

from clipdq.core import predict, tree
from clipdq.core.spec import Spec


def macro_f1(labels: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """Unweighted mean F1 over the values that occur in labels or predictions."""
    scores = []
    for value in range(k):
        tp = np.sum((predicted == value) & (labels == value))
        support = np.sum(labels == value) + np.sum(predicted == value)
        if support:
            scores.append(2 * tp / support)
    return float(np.mean(scores))


def choices(
    logits: dict[str, np.ndarray], spec: Spec, temperatures: dict[str, float] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per attribute, (value index, its probability) as the audit chooses them: at each
    attribute's temperature (1 where not given), consistent with the spec's trees."""
    temperatures = temperatures or {}
    probs = {name: predict.softmax(x, temperature=temperatures.get(name, 1.0)) for name, x in logits.items()}
    return tree.choose(probs, spec)


def calibrate(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: Spec, *, label_noise: float = 0.0
) -> tuple[dict[str, predict.Calibration], dict]:
    """(calibration, validation metrics) per attribute with at least two known labels.

    Temperatures are fitted per attribute; thresholds on the values the audit would choose (a
    tree's levels from its most probable path). ``label_noise``: the share of wrong labels (see
    ``predict.calibrate``)."""
    known = {name: labels[name] >= 0 for name in logits}
    fitted = [name for name in logits if known[name].sum() >= 2]
    temperatures = {
        name: predict.fit_temperature(logits[name][known[name]], labels[name][known[name]], label_noise=label_noise)
        for name in fitted
    }
    chosen = choices(logits, spec, temperatures)
    error_rates = tree.conflict_error_rates(spec)
    calibration, metrics = {}, {}
    for name in fitted:
        rows, y, x = known[name], labels[name][known[name]], logits[name][known[name]]
        values, confidence = (part[rows] for part in chosen[name])
        calibration[name] = predict.thresholds_for(
            confidence,
            values == y,
            temperature=temperatures[name],
            k=x.shape[1],
            target_precision=spec.target_precision,
            error_rate=error_rates[name],
            label_noise=label_noise,
        )
        metrics[name] = {
            "val_rows": int(rows.sum()),
            "val_accuracy": float((values == y).mean()),
            "ece_before": predict.expected_calibration_error(predict.softmax(x), y),
            "ece_after": predict.expected_calibration_error(predict.softmax(x, temperature=temperatures[name]), y),
        }
    return calibration, metrics


def held_out_metrics(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    spec: Spec,
    *,
    temperatures: dict[str, float] | None = None,
) -> dict:
    """Per attribute: accuracy, macro-F1 and the confusion matrix (rows: true value) of the values
    the audit would choose (see ``choices``)."""
    chosen = choices(logits, spec, temperatures)
    out = {}
    for attribute in spec.attributes:
        known = labels[attribute.name] >= 0
        if not known.any():
            continue
        predicted = chosen[attribute.name][0][known]
        truth, k = labels[attribute.name][known], len(attribute.values)
        confusion = np.zeros((k, k), dtype=int)
        np.add.at(confusion, (truth, predicted), 1)
        out[attribute.name] = {
            "test_rows": int(known.sum()),
            "test_accuracy": float((predicted == truth).mean()),
            "test_macro_f1": macro_f1(truth, predicted, k),
            "confusion": confusion.tolist(),
        }
    return out
