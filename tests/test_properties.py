"""Property-based: random catalog ids, values and image cells through the audit's library steps.

It never crashes: a catalog is either refused as a whole with a reason naming the column, or
every one of its rows comes out in the findings, each image failure with its detail."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipdq.checks.compare import compare
from clipdq.checks.schemas import NOT_APPLICABLE, STATUSES
from clipdq.io import catalog
from clipdq.io.sources import access_for
from clipdq.model import scorer, towers
from clipdq.pipeline import audit, embedding


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=16)
VALUES = st.one_of(st.none(), TEXT, st.sampled_from(["red", " Rood ", "NAVY", "longsleeved", "lid", ""]))
IMAGES = st.one_of(st.none(), st.binary(max_size=64), st.sampled_from([_jpeg(0), _jpeg(1), b"", b"\xff\xd8\xff"]))
ROW = st.fixed_dictionaries(
    {
        "product_id": st.one_of(st.none(), TEXT),
        "image": IMAGES,
        "product_type": st.one_of(st.none(), st.sampled_from(["apparel", "cookware", "furniture"]), TEXT),
        "color": VALUES,
        "sleeve_length": VALUES,
        "has_lid": VALUES,
    }
)


@pytest.fixture(scope="module")
def scoring(trained_model_dir, spec):
    return scorer.of_clip(towers.load_model(str(trained_model_dir), device="cpu"), spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=10))
def test_every_row_is_reported_or_the_catalog_refused_with_a_reason(rows, scoring, spec, tmp_path):
    frame = pl.DataFrame(
        rows,
        schema={
            "product_id": pl.String,
            "image": pl.Binary,
            "product_type": pl.String,
            "color": pl.String,
            "sleeve_length": pl.String,
            "has_lid": pl.String,
        },
    )
    try:
        catalog.validate(frame, spec)
    except catalog.CatalogError as refused:
        ids = frame["product_id"]
        assert "product_id" in str(refused)
        assert ids.null_count() or ids.n_unique() < frame.height  # refused only for ids that cannot tell rows apart
        return

    batch = embedding.prepare_batch(frame, spec=spec, access=access_for(str(tmp_path)), pixels=scoring.pixels)
    predictions = audit.score_batch(batch, scorer=scoring)
    findings = compare(frame, predictions, spec=spec, calibration=scoring.calibration)

    assert sorted(set(findings["product_id"])) == sorted(frame["product_id"])
    assert set(findings["status"]) <= {*STATUSES, NOT_APPLICABLE}
    failed = findings.filter(pl.col("status") == "image_error")
    assert failed["detail"].null_count() == 0
    for row, error in zip(rows, batch.errors):
        if row["image"] in (None, b""):
            assert error == "no image given in the catalog"
