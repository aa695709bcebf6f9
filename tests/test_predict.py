"""Probabilities, temperature scaling, flag thresholds and calibration error (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from clipdq.core import predict


def flag_precision(accuracy: float, error_rate: float) -> float:
    """Share of conflict flags that are right, for a model of this accuracy (the docstring's model)."""
    return error_rate * accuracy / (error_rate * accuracy + (1 - error_rate) * (1 - accuracy))


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's distribution."""
    cumulative = probs.cumsum(axis=1)
    return (rng.random((len(probs), 1)) > cumulative).sum(axis=1).clip(max=probs.shape[1] - 1)


def calibrated_probs(rng: np.random.Generator, n: int, *, k: int = 3, overconfidence: float = 0.0):
    """(pred_probs, labels): the top class is right with probability confidence - overconfidence."""
    confidence = rng.uniform(1 / k + 0.05, 1.0, n)
    predicted = rng.integers(0, k, n)
    probs = np.tile(((1 - confidence) / (k - 1))[:, None], (1, k))
    probs[np.arange(n), predicted] = confidence
    right = rng.random(n) < np.clip(confidence - overconfidence, 0, 1)
    other = (predicted + rng.integers(1, k, n)) % k
    return probs, np.where(right, predicted, other)


def test_softmax_rows_are_distributions_even_for_huge_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 50, (200, 7))
    logits[0] = [1000.0, -1000, 0, 0, 0, 0, 0]

    probs = predict.softmax(logits)

    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    assert (probs >= 0).all()
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))


def test_higher_temperature_flattens_the_distribution():
    logits = np.random.default_rng(1).normal(0, 3, (100, 5))

    sharp = predict.softmax(logits, temperature=0.5).max(axis=1)
    plain = predict.softmax(logits).max(axis=1)
    soft = predict.softmax(logits, temperature=4.0).max(axis=1)

    assert (sharp >= plain).all() and (plain >= soft).all()
    np.testing.assert_allclose(predict.softmax(logits, temperature=2.0), predict.softmax(logits / 2.0))


@pytest.mark.parametrize("true_temperature", [0.3, 1.0, 2.5, 8.0])
def test_fit_temperature_recovers_the_temperature_of_a_calibrated_model(true_temperature):
    rng = np.random.default_rng(42)
    logits = rng.normal(0, 4.0, (6000, 5))
    labels = sample_labels(rng, predict.softmax(logits, temperature=true_temperature))

    fitted = predict.fit_temperature(logits, labels)

    assert fitted == pytest.approx(true_temperature, rel=0.15)


def test_required_accuracy_matches_the_formula_and_gives_the_target_precision():
    needed = predict.required_accuracy(0.9, 0.1)

    assert needed == pytest.approx(0.9 * 0.9 / (0.9 * 0.9 + 0.1 * 0.1))
    assert flag_precision(needed, 0.1) == pytest.approx(0.9)
    assert flag_precision(needed - 0.01, 0.1) < 0.9  # and no lower accuracy would do


def test_required_accuracy_rises_with_the_target_and_falls_with_the_error_rate():
    assert predict.required_accuracy(0.95, 0.1) > predict.required_accuracy(0.9, 0.1)
    assert predict.required_accuracy(0.9, 0.3) < predict.required_accuracy(0.9, 0.1)
    assert predict.required_accuracy(0.9, 0.5) == pytest.approx(0.9)  # coin-flip prior: accuracy = precision


def wilson_lower_bound(hits: int, rows: int, z: float = predict.BOUND_Z) -> float:
    """The lower end of the Wilson score interval by bisection: the accuracy ``a`` below the share
    seen, ``p``, at which (p - a)^2 = z^2 a (1 - a) / rows."""
    p, low, high = hits / rows, 0.0, hits / rows
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if (p - mid) ** 2 > z**2 * mid * (1 - mid) / rows else (low, mid)
    return low


def brute_force_threshold(confidence: np.ndarray, correct: np.ndarray, required: float) -> float | None:
    """The smallest observed confidence whose rows at or above it are accurate enough (lower bound),
    with support."""
    for cut in np.sort(confidence):
        above = confidence >= cut
        if above.sum() >= predict.MIN_SUPPORT and wilson_lower_bound(correct[above].sum(), above.sum()) >= required:
            return float(cut)
    return None


def test_accuracy_lower_bound_is_the_wilson_bound():
    for hits, rows in ((10, 10), (15, 16), (90, 100), (0, 12), (134, 134)):
        bound = predict.accuracy_lower_bound(np.array([float(hits)]), np.array([float(rows)]))[0]
        assert bound == pytest.approx(wilson_lower_bound(hits, rows), abs=1e-9)
        assert bound < max(hits / rows, 1e-9)  # always below the share seen


def test_threshold_for_accuracy_picks_the_lowest_cut_that_stays_accurate():
    # 40 rows, most confident first: 25 right, 1 wrong, 4 right, then 10 wrong.
    confidence = np.linspace(0.99, 0.61, 40)
    correct = np.array([1] * 25 + [0] + [1] * 4 + [0] * 10, dtype=bool)
    shuffle = np.random.default_rng(3).permutation(40)  # the function must not rely on input order

    cut, rows = predict.threshold_for_accuracy(confidence[shuffle], correct[shuffle], 0.85)

    assert cut == confidence[30] and rows == 31  # 29 of 31 right: bound 0.854
    assert correct[confidence >= confidence[31]].mean() >= 0.85  # 29 of 32 = 0.91 seen ...
    assert wilson_lower_bound(29, 32) < 0.85  # ... but its bound is 0.82: too few rows to show it
    assert cut == brute_force_threshold(confidence, correct, 0.85)


def test_a_few_clean_validation_rows_do_not_set_a_high_bar():
    confidence = np.linspace(0.99, 0.5, 40)
    correct = np.arange(40) < predict.MIN_SUPPORT  # the 10 most confident right, the rest wrong

    assert predict.threshold_for_accuracy(confidence, correct, 0.9) is None  # 10 of 10: bound 0.86
    assert predict.threshold_for_accuracy(confidence, correct, 0.85) == (confidence[predict.MIN_SUPPORT - 1], 10)


def test_the_default_conflict_bar_needs_134_clean_validation_rows():
    required = predict.required_accuracy(0.9, 0.1)  # 0.988, as the README says

    def cut(clean: int) -> tuple | None:  # the `clean` most confident rows right, 20 more wrong
        return predict.threshold_for_accuracy(
            np.linspace(0.99, 0.5, clean + 20), np.arange(clean + 20) < clean, required
        )

    assert cut(133) is None
    assert cut(134) is not None


def test_threshold_for_accuracy_agrees_with_brute_force_on_random_data():
    rng = np.random.default_rng(7)
    for _ in range(20):
        confidence = rng.uniform(0.3, 1.0, 60)
        correct = rng.random(60) < confidence
        for required in (0.7, 0.85, 0.95):
            found = predict.threshold_for_accuracy(confidence, correct, required)
            assert (found and found[0]) == brute_force_threshold(confidence, correct, required)


def test_threshold_for_accuracy_is_none_when_no_cut_qualifies():
    confidence = np.linspace(0.99, 0.5, 30)
    mostly_wrong = np.arange(30) % 3 == 0
    assert predict.threshold_for_accuracy(confidence, mostly_wrong, 0.9) is None

    too_few = np.linspace(0.99, 0.9, predict.MIN_SUPPORT - 1)
    assert predict.threshold_for_accuracy(too_few, np.ones_like(too_few, dtype=bool), 0.5) is None


def test_expected_calibration_error_is_small_for_a_calibrated_model():
    probs, labels = calibrated_probs(np.random.default_rng(0), 50_000)

    assert predict.expected_calibration_error(probs, labels) < 0.01


def test_expected_calibration_error_measures_overconfidence():
    probs, labels = calibrated_probs(np.random.default_rng(0), 50_000, overconfidence=0.25)

    # in every bin accuracy is 0.25 below confidence, so the weighted mean gap is 0.25
    assert predict.expected_calibration_error(probs, labels) == pytest.approx(0.25, abs=0.02)


def test_calibrate_keeps_thresholds_at_least_at_the_theoretical_bars():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 8.0, (1500, 4))  # confident enough, and rows enough, to clear the conflict bar
    labels = sample_labels(rng, predict.softmax(logits, temperature=2.0))

    calibration = predict.calibrate(logits, labels, target_precision=0.9, error_rate=0.1)

    assert calibration.temperature == pytest.approx(2.0, rel=0.3)
    assert 0.9 <= calibration.gap_threshold <= 1.0
    assert predict.required_accuracy(0.9, 0.1) <= calibration.conflict_threshold <= 1.0
    confidence = predict.softmax(logits, temperature=calibration.temperature).max(1)
    assert calibration.conflict_rows == (confidence >= calibration.conflict_threshold).sum() >= 134
    assert calibration.to_dict() == {
        "temperature": calibration.temperature,
        "gap_threshold": calibration.gap_threshold,
        "conflict_threshold": calibration.conflict_threshold,
        "gap_rows": calibration.gap_rows,
        "conflict_rows": calibration.conflict_rows,
    }


def test_a_model_without_a_validation_error_gets_probabilities_short_of_certainty():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 200)
    logits = np.eye(3)[labels] * 30.0  # every row right, by a wide margin

    temperature = predict.fit_temperature(logits, labels)

    confidence = predict.softmax(logits, temperature=temperature).max(1)
    assert 0.98 < confidence.min() and confidence.max() < 0.999  # near 1 - 1/rows, not 1.0


def corrupt(rng: np.random.Generator, labels: np.ndarray, *, share: float, k: int) -> np.ndarray:
    """Labels with a ``share`` of them replaced by another value at random."""
    wrong = rng.random(len(labels)) < share
    return np.where(wrong, (labels + rng.integers(1, k, len(labels))) % k, labels)


def test_true_accuracy_undoes_the_agreement_lost_to_wrong_labels():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, 200_000)
    predicted = np.where(rng.random(len(truth)) < 0.97, truth, (truth + 1) % 5)
    observed = (predicted == corrupt(rng, truth, share=0.1, k=5)).mean()

    assert observed < 0.9
    assert predict.true_accuracy(np.array(observed), label_noise=0.1, k=5) == pytest.approx(0.97, abs=0.005)
    assert predict.true_accuracy(np.array(observed), label_noise=0.0, k=5) == pytest.approx(observed)


def test_calibrating_on_noisy_labels_with_their_noise_rate_matches_clean_labels():
    rng = np.random.default_rng(11)
    k = 6
    logits = rng.normal(0, 6.0, (5000, k))
    clean = sample_labels(rng, predict.softmax(logits, temperature=1.5))
    noisy = corrupt(rng, clean, share=0.1, k=k)

    naive = predict.calibrate(logits, noisy, target_precision=0.9, error_rate=0.1)
    aware = predict.calibrate(logits, noisy, target_precision=0.9, error_rate=0.1, label_noise=0.1)
    reference = predict.calibrate(logits, clean, target_precision=0.9, error_rate=0.1)

    assert naive.temperature > 1.3 * reference.temperature  # wrong labels pass for an unsure model
    assert naive.conflict_threshold is None  # 90% agreement can never show 98.8% accuracy
    assert aware.temperature == pytest.approx(reference.temperature, rel=0.1)
    assert aware.conflict_threshold == pytest.approx(reference.conflict_threshold, abs=0.01)
    assert aware.gap_threshold == pytest.approx(reference.gap_threshold, abs=0.02)
