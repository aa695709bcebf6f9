"""Learning curves: test accuracy and macro-F1 against the number of labeled examples per value.

Each point trains a fresh model on at most ``n`` training rows per value of each attribute
(other training labels hidden), with the same validation and test rows for every point, so the
curve shows how much labeled data a feature needs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import polars as pl
import torch

from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits
from clipdq.model import towers
from clipdq.training import train
from clipdq.training.labeled import LabeledSet, label_arrays

log = logging.getLogger(__name__)

SIZES = (10, 30, 100, 300)


def keep_per_value(labels: dict[str, np.ndarray], rows: np.ndarray, *, n: int, seed: int) -> dict[str, np.ndarray]:
    """Labels where, among ``rows``, only ``n`` random rows per value of each attribute keep theirs.

    Rows outside ``rows`` (validation, test) keep every label.
    """
    rng = np.random.default_rng(seed)
    kept = {}
    for name, values in labels.items():
        hidden = values.copy()
        hidden[rows] = -1
        for value in np.unique(values[rows][values[rows] >= 0]):
            pool = rows[values[rows] == value]
            hidden[rng.choice(pool, size=min(n, len(pool)), replace=False)] = value
        kept[name] = hidden
    return kept


def learning_curve(
    make_model: Callable[[], towers.Clip],
    data: LabeledSet,
    spec: Spec,
    *,
    config: TrainConfig,
    splits: Splits,
    sizes: tuple[int, ...] = SIZES,
) -> pl.DataFrame:
    """One row per size and attribute: labels used, test accuracy and macro-F1, minutes.

    Sizes past the point where every training label is used are skipped.
    """
    labels, (train_idx, val_idx, test_idx) = label_arrays(data), splits
    available = sum(int((labels[name][train_idx] >= 0).sum()) for name in labels)
    rows = []
    for n in sorted(sizes):
        kept = keep_per_value(labels, train_idx, n=n, seed=config.seed)
        used = {name: int((kept[name][train_idx] >= 0).sum()) for name in kept}
        subset = LabeledSet(data.pixels, {k: torch.from_numpy(v) for k, v in kept.items()}, data.dropped)
        rows_used = train_idx[np.any([kept[name][train_idx] >= 0 for name in kept], axis=0)]
        log.info("learning curve: %d per value (%d labeled training rows)", n, len(rows_used))
        outcome = train.train_on(make_model(), subset, spec, config=config, splits=(rows_used, val_idx, test_idx))
        for name in spec.names:
            metrics = outcome["metrics"].get(name, {})
            rows.append(
                {
                    "per_value": n,
                    "attribute": name,
                    "train_labels": used[name],
                    "test_accuracy": metrics.get("test_accuracy"),
                    "test_macro_f1": metrics.get("test_macro_f1"),
                    "minutes": outcome["training"]["minutes"],
                }
            )
        if sum(used.values()) == available:
            break
    return pl.DataFrame(rows)


def markdown(table: pl.DataFrame) -> str:
    """The curve as a Markdown table: one row per size, accuracy / macro-F1 per attribute."""
    names = table["attribute"].unique(maintain_order=True).to_list()
    lines = [
        "| labeled per value | " + " | ".join(f"{n} acc / F1" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for (n,), group in table.group_by("per_value", maintain_order=True):
        cells = {
            r["attribute"]: f"{r['test_accuracy']:.3f} / {r['test_macro_f1']:.3f}" for r in group.iter_rows(named=True)
        }
        lines.append(f"| {n} | " + " | ".join(cells.get(name, "-") for name in names) + " |")
    return "\n".join(lines) + "\n"


def plot_png(table: pl.DataFrame, *, title: str) -> bytes:
    """Accuracy and macro-F1 against labeled examples per value (log scale), a line per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for (name,), group in table.group_by("attribute", maintain_order=True):
        for axis, column in zip(axes, ("test_accuracy", "test_macro_f1")):
            axis.plot(group["per_value"], group[column], marker="o", label=name)
    sizes = table["per_value"].unique().sort().to_list()
    for axis, label in zip(axes, ("test accuracy", "test macro-F1")):
        axis.set_xscale("log")
        axis.set_xticks(sizes, labels=[str(n) for n in sizes])
        axis.minorticks_off()
        axis.set_xlabel("labeled examples per value")
        axis.set_ylabel(label)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
