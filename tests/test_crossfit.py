"""Cross-fitting: a catalog that is also the training data, audited out of fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from clipdq import sample_data
from clipdq.core import splits
from clipdq.core.options import AuditOptions
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import parse_spec
from clipdq.io import catalog
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.model.files import read_model_files
from clipdq.pipeline import audit, crossfit
from clipdq.training import train
from flows.audit import audit_catalog

COLOR_SPEC = yaml.safe_dump({"target_precision": 0.9, "attributes": {"color": sample_data.SPEC["attributes"]["color"]}})


def test_folds_cover_every_row_once_and_spread_each_value_evenly():
    rng = np.random.default_rng(0)
    labels = {"color": rng.integers(-1, 4, 203), "lid": rng.integers(0, 2, 203)}

    folds = splits.fold_of(labels, k=4, seed=0)

    assert folds.shape == (203,) and set(folds) == {0, 1, 2, 3}
    assert np.ptp(np.bincount(folds)) <= 1
    for name, values in labels.items():
        for value in np.unique(values):
            counts = np.bincount(folds[values == value], minlength=4)
            assert np.ptp(counts) <= 2, (name, value, counts)
    assert not np.array_equal(folds, splits.fold_of(labels, k=4, seed=1))


@pytest.fixture(scope="module")
def noisy_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 generated products whose catalog colours are 10% wrong, with a colour-only spec."""
    folder = sample_data.generate(tmp_path_factory.mktemp("noisy"), n_labeled=0, n_catalog=400, image_size=64)
    (folder / "color.yaml").write_text(COLOR_SPEC)
    return folder


def test_cross_fitting_scores_every_row_once_with_one_calibration_per_fold(noisy_catalog, tmp_path):
    """The library call alone, without Prefect: each fold judged by its own model."""
    spec = parse_spec((noisy_catalog / "color.yaml").read_text())
    towers.save_model(towers.init_model(spec, seed=0), str(tmp_path / "init"))
    subset = noisy_catalog / "first-120.parquet"  # beside the images, which resolve against its folder
    pl.read_parquet(noisy_catalog / "catalog.parquet").head(120).write_parquet(subset)
    source = catalog.CatalogFile(str(subset))
    findings_file = str(tmp_path / "findings.parquet")
    model_uri, spec_text = str(tmp_path / "init"), (noisy_catalog / "color.yaml").read_text()
    inputs = audit.AuditInputs(
        source.uri,
        model_uri,
        str(tmp_path / "out"),
        spec_text,
        spec,
        source,
        read_model_files(model_uri),
        access_for(str(noisy_catalog)),
        AuditOptions(cross_fit=2, fold_minutes=0.1),
    )

    scored = crossfit.score(inputs, findings_file)

    findings = pl.read_parquet(findings_file)
    assert sorted(findings["product_id"]) == sorted(pl.read_parquet(subset)["product_id"])
    assert len(scored.calibrations) == 2 and all(set(c) == {"color"} for c in scored.calibrations)
    assert len(scored.texts_judged["folds"]) == 2
    assert scored.images["scored"] == source.row_count
    usable = findings.filter(pl.col("status") != "image_error")["product_id"].unique()
    assert sorted(scored.usable["product_id"]) == sorted(usable) and scored.signatures().shape[0] == len(usable)


def test_folds_keep_a_group_together(noisy_catalog):
    spec = parse_spec((noisy_catalog / "color.yaml").read_text())
    frame = pl.read_parquet(noisy_catalog / "catalog.parquet").with_columns(family=pl.int_range(pl.len()) // 10)

    folds = crossfit.folds_of(frame, spec, k=3, group_column="family")

    assert set(folds) == {0, 1, 2}
    assert frame.with_columns(fold=folds).group_by("family").agg(pl.col("fold").n_unique())["fold"].max() == 1


def planted_conflicts(folder: Path, run: str) -> pl.DataFrame:
    truth = pl.read_parquet(folder / "ground_truth.parquet").filter(pl.col("attribute") == "color")
    findings = pl.read_parquet(Path(run) / "findings.parquet")
    return truth.filter(pl.col("planted") == "conflict").join(findings, on=["product_id", "attribute"])


def test_cross_fitting_finds_planted_errors_that_an_in_sample_audit_misses(noisy_catalog, prefect_harness, tmp_path):
    catalog, spec_path = noisy_catalog / "catalog.parquet", noisy_catalog / "color.yaml"
    spec = parse_spec(spec_path.read_text())
    # In sample: a model fitted closely to the very rows it audits (fixed schedule, last weights),
    # as a large pretrained CLIP is after a few epochs.
    fitted = towers.init_model(spec, seed=0)
    closely = TrainConfig(epochs=60, patience=60, augment=False, keep_best=False)
    train.finetune(fitted, read_catalog(str(catalog)), spec, access=access_for(str(noisy_catalog)), config=closely)
    towers.save_model(fitted, str(tmp_path / "in-sample"))
    towers.save_model(towers.init_model(spec, seed=0), str(tmp_path / "init"))

    in_sample = audit_catalog(str(catalog), str(spec_path), str(tmp_path / "in-sample"), str(tmp_path / "a"))
    cross_fit = audit_catalog(
        str(catalog), str(spec_path), str(tmp_path / "init"), str(tmp_path / "b"), AuditOptions(cross_fit=2)
    )

    missed, found = planted_conflicts(noisy_catalog, in_sample), planted_conflicts(noisy_catalog, cross_fit)
    assert found.height == missed.height > 20
    sees_truth = pl.col("predicted_value") == pl.col("true_value")
    assert missed.select(sees_truth.mean()).item() < 0.5  # agrees with errors it learned
    assert found.select(sees_truth.mean()).item() > 0.8  # each row judged by a model that never saw it
    assert found.filter(pl.col("status") == "conflict").height > missed.filter(pl.col("status") == "conflict").height

    findings = pl.read_parquet(Path(cross_fit) / "findings.parquet")
    assert sorted(findings["product_id"]) == sorted(pl.read_parquet(catalog)["product_id"])  # every row, once
    flagged = findings.filter(pl.col("status") == "conflict")["product_id"]
    false_flags = set(flagged) - set(found["product_id"])
    assert len(false_flags) <= (1 - spec.target_precision) * len(flagged)  # the promise: 9 in 10 flags are errors
    summary = json.loads((Path(cross_fit) / "summary.json").read_text())
    assert summary["cross_fit"] == 2 and len(summary["calibration"]) == 2


def test_cross_fit_needs_two_folds():
    with pytest.raises(ValueError, match="at least 2 folds"):
        AuditOptions(cross_fit=1)  # refused before any flow runs
