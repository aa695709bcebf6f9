"""Real product photos: the Grocery Store dataset through decoding, training and the audit.

Skipped where the dataset is absent (set CLIPDQ_GROCERY_DIR, or keep it beside the project).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import yaml
from grocery import DEFAULT_DATA, load_catalog

from clipdq.core.options import AuditOptions
from clipdq.core.spec import parse_spec
from clipdq.io import images
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.training import train
from flows.audit import audit_catalog

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DATA / "train.txt").exists(), reason=f"Grocery Store dataset not found at {DEFAULT_DATA}"
)


@pytest.fixture(scope="module")
def grocery() -> pl.DataFrame:
    return load_catalog(DEFAULT_DATA)


def test_the_catalog_has_every_photo_with_a_consistent_three_level_hierarchy(grocery):
    assert grocery.height == 2640 + 296
    assert grocery.group_by("split").len().sort("split").rows() == [("holdout", 296), ("train", 2640)]
    assert set(grocery["top"]) == {"Fruit", "Vegetables", "Packages"}
    assert grocery.select(pl.col("coarse").n_unique().over("fine").max()).item() == 1  # a fine class has one parent
    assert grocery.select(pl.col("top").n_unique().over("coarse").max()).item() == 1
    assert grocery["product_id"].n_unique() == grocery.height


def test_real_photos_decode_to_the_models_pixels(grocery):
    sample = grocery.sample(40, seed=0)
    spec = images.PixelSpec(224, 224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))

    loaded = images.load_images(sample["image"].to_list(), access_for(str(DEFAULT_DATA)), spec)

    assert loaded.ok.all(), loaded.errors
    assert loaded.pixels.shape == (40, 3, 224, 224)
    assert np.isfinite(loaded.pixels).all() and loaded.pixels.std() > 0.3


def test_the_pretrained_tower_flags_planted_errors_in_photos_from_other_sessions(grocery, prefect_harness, tmp_path):
    """Locked fine-tuning on train photos; audit of held-out photos (other sessions) whose top-level
    labels are 10% wrong: the flags are the planted errors, as the calibration promised."""
    spec_text = yaml.safe_dump(
        {"target_precision": 0.9, "attributes": {"top": {"values": sorted(set(grocery["top"]))}}}
    )
    spec = parse_spec(spec_text)
    (tmp_path / "spec.yaml").write_text(spec_text)
    labeled = pl.concat([g.sample(300, seed=0) for _, g in grocery.filter(pl.col("split") == "train").group_by("top")])
    held_out = grocery.filter(pl.col("split") == "holdout").select("product_id", "image", "top")
    rng = np.random.default_rng(0)
    wrong = rng.random(held_out.height) < 0.1
    values = sorted(set(grocery["top"]))
    replaced = [values[(values.index(v) + int(rng.integers(1, 3))) % 3] for v in held_out["top"]]
    catalog = held_out.with_columns(pl.Series("top", np.where(wrong, replaced, held_out["top"].to_numpy())))
    catalog.write_parquet(tmp_path / "catalog.parquet")

    clip = towers.init_model(spec, "efficientnet-lite0")
    config = train.config_for(
        clip, mode="locked", views=1, val_fraction=0.3, test_fraction=0
    )  # 270 rows: enough for the conflict bar
    train.finetune(clip, labeled, spec, access=access_for(str(DEFAULT_DATA)), config=config)
    towers.save_model(clip, str(tmp_path / "model"))
    run = audit_catalog(
        str(tmp_path / "catalog.parquet"),
        str(tmp_path / "spec.yaml"),
        str(tmp_path / "model"),
        str(tmp_path / "reports"),
        AuditOptions(image_roots=[str(DEFAULT_DATA)]),
    )  # photos live beside the dataset

    findings = pl.read_parquet(f"{run}/findings.parquet").join(
        held_out.select("product_id", pl.col("top").alias("true_value")), on="product_id"
    )
    assert findings.height == held_out.height and findings["status"].is_in(["image_error"]).sum() == 0
    assert (findings["predicted_value"] == findings["true_value"]).mean() >= 0.9  # it sees the products
    flagged = findings.filter(pl.col("status") == "conflict")
    planted = findings.filter(pl.col("existing_value") != pl.col("true_value"))
    assert planted.height >= 20 and flagged.height >= 10
    assert (flagged["existing_value"] != flagged["true_value"]).mean() >= 0.9
