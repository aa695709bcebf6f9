"""Learning curves: labels hidden per value, one fresh model per size, table and plot."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from PIL import Image

from clipdq.core.presets import TrainConfig
from clipdq.model import towers
from clipdq.training import curves
from clipdq.training.labeled import default_splits, label_arrays


def test_keep_per_value_keeps_n_training_labels_per_value_and_every_held_out_one():
    rng = np.random.default_rng(0)
    labels = {"color": rng.integers(-1, 3, 300), "lid": rng.integers(0, 2, 300)}
    train_rows, held_out = np.arange(200), np.arange(200, 300)

    kept = curves.keep_per_value(labels, train_rows, n=7, seed=0)

    for name, values in labels.items():
        for value in range(values.max() + 1):
            assert (kept[name][train_rows] == value).sum() == 7
        assert set(np.flatnonzero(kept[name][train_rows] >= 0)) <= set(np.flatnonzero(values[train_rows] >= 0))
        np.testing.assert_array_equal(
            kept[name][train_rows][kept[name][train_rows] >= 0], values[train_rows][kept[name][train_rows] >= 0]
        )  # labels kept, not changed
        np.testing.assert_array_equal(kept[name][held_out], values[held_out])


def test_learning_curve_trains_one_model_per_size_and_stops_once_all_labels_are_used(labeled, spec):
    config = TrainConfig(mode="prototype")
    splits = default_splits(labeled, config)
    made = []

    def make_model():
        made.append(towers.init_model(spec, seed=0))
        return made[-1]

    table = curves.learning_curve(make_model, labeled, spec, config=config, splits=splits, sizes=(1, 3, 1000, 5000))

    assert len(made) == 3  # 5000 is past the point where 1000 already used every label
    assert table["per_value"].unique().sort().to_list() == [1, 3, 1000]
    assert set(table["attribute"]) == set(spec.names)
    ones = table.filter(pl.col("per_value") == 1)
    for row in ones.iter_rows(named=True):
        assert row["train_labels"] <= len(spec.attribute(row["attribute"]).values)
    everything = table.filter(pl.col("per_value") == 1000)
    labels = label_arrays(labeled)
    for row in everything.iter_rows(named=True):
        assert row["train_labels"] == (labels[row["attribute"]][splits[0]] >= 0).sum()
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["test_macro_f1"] <= 1


def test_curve_table_and_plot_render():
    table = pl.DataFrame(
        {
            "per_value": [10, 10, 30, 30],
            "attribute": ["a", "b", "a", "b"],
            "train_labels": [20, 30, 60, 90],
            "test_accuracy": [0.5, 0.6, 0.8, 0.9],
            "test_macro_f1": [0.4, 0.5, 0.7, 0.85],
            "minutes": [0.1] * 4,
        }
    )

    text = curves.markdown(table)
    png = Image.open(io.BytesIO(curves.plot_png(table, title="t")))

    assert text.splitlines()[0] == "| labeled per value | a acc / F1 | b acc / F1 |"
    assert "| 30 | 0.800 / 0.700 | 0.900 / 0.850 |" in text
    assert png.format == "PNG" and png.size[0] > 500
