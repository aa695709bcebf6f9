"""Embeddings in, per-attribute probabilities and flag thresholds out (numpy only).

Vocabulary of argument names: ``image_emb`` (n, d) and ``value_emb`` (k, d) are L2-normalised
embeddings, ``logits`` and ``pred_probs`` are (n, k), ``labels`` are (n,) value indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 161))
MIN_SUPPORT = 10  # fewest validation rows a threshold may be estimated from
BOUND_Z = 1.2816  # thresholds rest on a one-sided 90% lower confidence bound of accuracy (z of the normal)


@dataclass(frozen=True)
class Calibration:
    """How one attribute's scores become trusted flags."""

    temperature: float = 1.0  # divides the logits; > 1 softens over-confident models
    gap_threshold: float | None = 0.9  # least confidence for a suggested value to fill a gap; None: never
    conflict_threshold: float | None = 0.99  # least confidence to flag a catalog value as wrong; None: never
    gap_rows: int = 0  # validation rows at or above gap_threshold: the evidence behind it
    conflict_rows: int = 0  # validation rows at or above conflict_threshold

    def to_dict(self) -> dict:
        return asdict(self)


def logits_for(image_emb: np.ndarray, value_emb: np.ndarray, *, scale: float) -> np.ndarray:
    """Scaled cosine similarities, (n, k)."""
    return scale * image_emb @ value_emb.T


def softmax(logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def agreement(reference: np.ndarray, candidate: np.ndarray, value_emb: dict[str, np.ndarray]) -> float:
    """Share of images whose predicted value is the same under both embeddings, for every attribute."""
    same = np.ones(len(reference), dtype=bool)
    for values in value_emb.values():
        same &= (reference @ values.T).argmax(axis=1) == (candidate @ values.T).argmax(axis=1)
    return float(same.mean()) if len(same) else float("nan")


def observed_probability(p_true: np.ndarray, *, label_noise: float, k: int) -> np.ndarray:
    """Chance that a label reads y when the model gives y probability ``p_true`` and a share
    ``label_noise`` of labels were replaced by another of the ``k`` values at random."""
    return (1 - label_noise) * p_true + label_noise / (k - 1) * (1 - p_true)


def true_accuracy(observed: np.ndarray, *, label_noise: float, k: int) -> np.ndarray:
    """Accuracy against the true values, from agreement with labels that are ``label_noise`` wrong."""
    chance = label_noise / (k - 1)
    return np.clip((observed - chance) / (1 - label_noise - chance), 0.0, 1.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, label_noise: float = 0.0) -> float:
    """The temperature minimising validation negative log-likelihood (grid search, robust).

    With ``label_noise`` the likelihood is that of the noisy labels, so the fitted probabilities
    describe the true values (forward loss correction). Like the thresholds, the fit is add-one
    smoothed: besides the validation rows it sees one error, a row labeled with each row's
    runner-up value on average, so a model without a validation error gets probabilities near
    1 - 1/rows instead of exactly 1.
    """
    rows, k = np.arange(len(labels)), logits.shape[1]
    runner_up = np.argsort(logits, axis=1)[:, -2] if k > 1 else labels

    def nll(t: float) -> float:
        probs = softmax(logits, temperature=t)
        observed = [observed_probability(probs[rows, y], label_noise=label_noise, k=k) for y in (labels, runner_up)]
        return -(np.log(observed[0] + 1e-12).sum() + np.log(observed[1] + 1e-12).mean()) / (len(labels) + 1)

    return float(min(TEMPERATURES, key=nll))


def required_accuracy(target_precision: float, error_rate: float) -> float:
    """Model accuracy needed so that conflict flags are right ``target_precision`` of the time.

    With a share ``error_rate`` of wrong catalog values, a flag raised at model accuracy ``a`` is
    right with probability e*a / (e*a + (1-e)*(1-a)); solving for ``a`` gives this bound.
    """
    p, e = target_precision, error_rate
    return p * (1 - e) / (p * (1 - e) + e * (1 - p))


def accuracy_lower_bound(hits: np.ndarray, rows: np.ndarray, *, z: float = BOUND_Z) -> np.ndarray:
    """One-sided Wilson lower confidence bound of accuracy from ``hits`` right out of ``rows``."""
    p, centre = hits / rows, z**2 / (2 * rows)
    spread = z * np.sqrt(p * (1 - p) / rows + z**2 / (4 * rows**2))
    return (p + centre - spread) / (1 + z**2 / rows)


def threshold_for_accuracy(
    confidence: np.ndarray, correct: np.ndarray, required: float, *, label_noise: float = 0.0, k: int = 2
) -> tuple[float, int] | None:
    """(smallest confidence above which validation accuracy reaches ``required``, rows above it).

    Accuracy above a candidate threshold is its lower confidence bound (``accuracy_lower_bound``),
    not the share seen: the lowest threshold that a few clean rows happen to clear would overstate
    it on new data, so a high bar needs many rows to show it (0.988 needs 135 rows without an
    error). ``correct`` is agreement with labels of which a share ``label_noise`` is wrong (among
    ``k`` values); the bound is turned into accuracy against the true values. Only thresholds with
    at least MIN_SUPPORT rows above them count; returns None (never flag) when none qualifies.
    """
    order = np.argsort(-confidence)
    conf, hits = confidence[order], correct[order].astype(float)
    rows = np.arange(1, len(hits) + 1)
    bound = accuracy_lower_bound(np.cumsum(hits), rows)
    accuracy = true_accuracy(bound, label_noise=label_noise, k=k)
    ok = (accuracy >= required) & (rows >= MIN_SUPPORT)
    if not ok.any():
        return None
    last = np.flatnonzero(ok).max()
    return float(conf[last]), int(np.sum(confidence >= conf[last]))


def calibrate(
    logits: np.ndarray, labels: np.ndarray, *, target_precision: float, error_rate: float, label_noise: float = 0.0
) -> Calibration:
    """Fit a temperature, then thresholds meeting the target (``thresholds_for``).

    ``label_noise`` is the share of wrong validation labels (0 for curated labels; the catalog's
    error rate when the labels come from the catalog being audited).
    """
    temperature = fit_temperature(logits, labels, label_noise=label_noise)
    probs = softmax(logits, temperature=temperature)
    return thresholds_for(
        probs.max(axis=1),
        probs.argmax(axis=1) == labels,
        temperature=temperature,
        k=logits.shape[1],
        target_precision=target_precision,
        error_rate=error_rate,
        label_noise=label_noise,
    )


def thresholds_for(
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    temperature: float,
    k: int,
    target_precision: float,
    error_rate: float,
    label_noise: float = 0.0,
) -> Calibration:
    """Thresholds meeting the target on validation and in theory, from each validation row's
    confidence and whether its prediction was right (among ``k`` values).

    Each threshold is the larger of the empirical one (validation accuracy) and the one a
    perfectly calibrated model would need, so a small validation set cannot set it too low.
    """

    def threshold(required: float) -> tuple[float | None, int]:
        empirical = threshold_for_accuracy(confidence, correct, required, label_noise=label_noise, k=k)
        if empirical is None:
            return None, 0
        cut = max(empirical[0], required)
        return cut, int(np.sum(confidence >= cut))

    gap, gap_rows = threshold(target_precision)
    conflict, conflict_rows = threshold(required_accuracy(target_precision, error_rate))
    return Calibration(temperature, gap, conflict, gap_rows, conflict_rows)


def default_calibration(target_precision: float, error_rate: float) -> Calibration:
    """Thresholds for a model without validation data: trust its probabilities as they are."""
    return Calibration(1.0, target_precision, required_accuracy(target_precision, error_rate))


def expected_calibration_error(pred_probs: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    confidence = pred_probs.max(axis=1)
    correct = pred_probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gaps = [
        abs(confidence[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    ]
    return float(sum(gaps))
