"""The model card's figures beyond calibration: the split sizes, and each attribute's accuracy,
macro-F1 and confusion matrix on the test split (``core.evaluation.held_out_metrics``), at the
temperatures calibration fitted.

Vocabulary as in ``labeled``; ``embed(rows)`` gives the image embeddings of labeled rows,
``value_emb`` attribute -> (k, d) value embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipdq.core import evaluation
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits
from clipdq.model import towers
from clipdq.training.calibration import logits_from
from clipdq.training.labeled import LabeledSet, labels_of


def split_sizes(data: LabeledSet, splits: Splits) -> dict[str, int]:
    train_idx, val_idx, test_idx = splits
    return {
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "test_rows": len(test_idx),
        "train_only_rows": 0 if data.train_only is None else int(data.train_only.sum()),
    }


def add_test_metrics(
    metrics: dict[str, dict],
    clip: towers.Clip,
    data: LabeledSet,
    spec: Spec,
    test_idx: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray],
    value_emb: dict[str, np.ndarray],
    calibration: dict[str, Calibration],
) -> None:
    """Adds each attribute's test figures to its validation figures in ``metrics``."""
    temperatures = {name: fitted.temperature for name, fitted in calibration.items()}
    for name, figures in evaluation.held_out_metrics(
        logits_from(embed(test_idx), value_emb, clip), labels_of(data, test_idx), spec, temperatures=temperatures
    ).items():
        metrics.setdefault(name, {}).update(figures)
