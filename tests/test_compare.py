"""Catalog values against predictions: every status, on a hand-made catalog with known answers."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from clipdq.checks.compare import compare
from clipdq.checks.schemas import FINDINGS_SCHEMA, PREDICTIONS_SCHEMA, STATUSES
from clipdq.core.predict import Calibration
from clipdq.core.spec import parse_spec

SPEC = parse_spec("""\
attributes:
  color:
    values: [red, blue, green]
    synonyms: {red: [rood, crimson]}
  sleeve_length:
    values: [short, long]
    applies_to: {product_type: [apparel]}
  pattern:            # no catalog column: every value is missing
    values: [plain, striped]
""")
CALIBRATION = {name: Calibration(temperature=1.0, gap_threshold=0.8, conflict_threshold=0.95) for name in SPEC.names}
IMAGE_ERROR = "unreadable image: OSError: image file is truncated"

# One product per situation: its catalog values, what the model predicts per attribute as
# (value, confidence), an optional image error, and the status expected per attribute.
# A product whose attribute does not apply has no expected entry for it.
PRODUCTS = [
    # id, type, color, sleeve, predictions, error, expected
    (
        "match",
        "apparel",
        "red",
        "short",
        {"color": ("red", 0.40), "sleeve_length": ("short", 0.9)},
        None,
        {"color": "match", "sleeve_length": "match"},
    ),
    (
        "synonym-odd-case",
        "apparel",
        " ROOD ",
        "Long ",
        {"color": ("red", 0.55), "sleeve_length": ("long", 0.6)},
        None,
        {"color": "match", "sleeve_length": "match"},
    ),
    (
        "conflict",
        "apparel",
        "blue",
        "short",
        {"color": ("green", 0.97), "sleeve_length": ("long", 0.99)},
        None,
        {"color": "conflict", "sleeve_length": "conflict"},
    ),
    ("conflict-at-bar", "cookware", "blue", None, {"color": ("red", 0.95)}, None, {"color": "conflict"}),
    (
        "disagree-unsure",
        "apparel",
        "green",
        "long",
        {"color": ("red", 0.94), "sleeve_length": ("short", 0.5)},
        None,
        {"color": "uncertain", "sleeve_length": "uncertain"},
    ),
    (
        "gap",
        "apparel",
        None,
        None,
        {"color": ("blue", 0.85), "sleeve_length": ("long", 0.80)},
        None,
        {"color": "gap", "sleeve_length": "gap"},
    ),
    ("gap-unsure", "cookware", None, None, {"color": ("green", 0.79)}, None, {"color": "uncertain"}),
    (
        "blank",
        "apparel",
        "   ",
        "",
        {"color": ("red", 0.99), "sleeve_length": ("short", 0.3)},
        None,
        {"color": "gap", "sleeve_length": "uncertain"},
    ),
    (
        "invalid",
        "apparel",
        "purple",
        "3/4",
        {"color": ("red", 0.99), "sleeve_length": ("long", 0.99)},
        None,
        {"color": "invalid_value", "sleeve_length": "invalid_value"},
    ),
    ("broken-image", "apparel", "red", None, {}, IMAGE_ERROR, {"color": "image_error", "sleeve_length": "image_error"}),
    (
        "not-apparel",
        "cookware",
        "green",
        "short",
        {"color": ("green", 0.99)},
        None,
        {"color": "match"},
    ),  # sleeve_length does not apply to cookware, whatever the catalog says
    (
        "untyped",
        None,
        "blue",
        "long",
        {"color": ("blue", 0.7), "sleeve_length": ("long", 0.7)},
        None,
        {"color": "match", "sleeve_length": "match"},
    ),  # a null applies_to column does not exclude
]
# pattern is in no catalog column: missing for every product, so gap or uncertain by confidence
PATTERN = {pid: ("striped", 0.9 if i % 2 else 0.5) for i, (pid, *_rest) in enumerate(PRODUCTS)}
UNSCORED = "no-prediction"  # in the catalog, absent from the predictions
NOT_APPLICABLE = {"sleeve_length": ("short", 0.99)}  # the model scores cookware sleeves too; compare drops them


def catalog_frame() -> pl.DataFrame:
    rows = [(pid, ptype, f"images/{pid}.jpg", color, sleeve) for pid, ptype, color, sleeve, *_ in PRODUCTS]
    rows.append((UNSCORED, "cookware", "images/x.jpg", "red", None))
    schema = {
        "product_id": pl.String,
        "product_type": pl.String,
        "image": pl.String,
        "color": pl.String,
        "sleeve_length": pl.String,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def predictions_frame() -> pl.DataFrame:
    rows = []
    for pid, _type, _color, _sleeve, predicted, error, _expected in PRODUCTS:
        for attribute in SPEC.names:
            if error:
                rows.append((pid, attribute, None, None, error))
                continue
            value, confidence = {**NOT_APPLICABLE, "pattern": PATTERN[pid], **predicted}[attribute]
            rows.append((pid, attribute, value, confidence, None))
    return pl.DataFrame(rows, schema=PREDICTIONS_SCHEMA, orient="row")


def expected_statuses() -> dict[tuple[str, str], str]:
    expected = {}
    for pid, _type, _color, _sleeve, _predicted, error, statuses in PRODUCTS:
        for attribute, status in statuses.items():
            expected[(pid, attribute)] = status
        if error:
            expected[(pid, "pattern")] = "image_error"
        else:
            expected[(pid, "pattern")] = (
                "gap" if PATTERN[pid][1] >= CALIBRATION["pattern"].gap_threshold else "uncertain"
            )
    expected[(UNSCORED, "color")] = "image_error"
    expected[(UNSCORED, "pattern")] = "uncertain"  # missing value and nothing to suggest
    return expected


@pytest.fixture(scope="module")
def findings() -> pl.DataFrame:
    return compare(catalog_frame(), predictions_frame(), spec=SPEC, calibration=CALIBRATION)


def finding(findings: pl.DataFrame, product_id: str, attribute: str) -> dict:
    rows = findings.filter((pl.col("product_id") == product_id) & (pl.col("attribute") == attribute)).to_dicts()
    assert len(rows) == 1, (product_id, attribute, rows)
    return rows[0]


def test_the_test_table_covers_every_status():
    assert set(expected_statuses().values()) == set(STATUSES) - {"parent_conflict"}  # trees: tests/test_tree.py


def test_every_product_and_attribute_gets_its_expected_status(findings):
    actual = {(r["product_id"], r["attribute"]): r["status"] for r in findings.iter_rows(named=True)}
    expected = expected_statuses()

    mismatched = {key: (actual.get(key), status) for key, status in expected.items() if actual.get(key) != status}
    assert mismatched == {}, "(product, attribute): (actual, expected)"
    assert set(actual) == set(expected)
    assert findings.height == len(expected)


def test_findings_have_the_contract_schema(findings):
    assert dict(findings.schema) == FINDINGS_SCHEMA
    assert findings.columns == list(FINDINGS_SCHEMA)


def test_attribute_that_does_not_apply_produces_no_row(findings):
    assert findings.filter(pl.col("product_id") == "not-apparel")["attribute"].sort().to_list() == ["color", "pattern"]
    untyped = findings.filter(pl.col("product_id") == "untyped")["attribute"].sort().to_list()
    assert untyped == sorted(SPEC.names)


def test_missing_attribute_column_means_every_value_is_missing(findings):
    pattern = findings.filter(pl.col("attribute") == "pattern")

    assert pattern.height == catalog_frame().height
    assert pattern["existing_value"].null_count() == pattern.height
    assert set(pattern["status"]) <= {"gap", "uncertain", "image_error"}


def test_existing_values_are_reported_as_given(findings):
    assert finding(findings, "synonym-odd-case", "color")["existing_value"] == " ROOD "
    assert finding(findings, "blank", "color")["existing_value"] == "   "


def test_details_explain_the_status(findings):
    synonym = finding(findings, "synonym-odd-case", "color")
    assert "read as 'red'" in synonym["detail"]
    assert finding(findings, "match", "color")["detail"] is None

    conflict = finding(findings, "conflict", "color")
    assert conflict["predicted_value"] == "green"
    assert conflict["confidence"] == pytest.approx(0.97)
    assert "'blue'" in conflict["detail"] and "'green'" in conflict["detail"]

    gap = finding(findings, "gap", "color")
    assert gap["existing_value"] is None and gap["predicted_value"] == "blue"
    assert "'blue'" in gap["detail"]

    assert "'purple' is not a known color value" == finding(findings, "invalid", "color")["detail"]

    broken = finding(findings, "broken-image", "color")
    assert broken["detail"] == IMAGE_ERROR
    assert broken["predicted_value"] is None and broken["confidence"] is None

    assert "no prediction" in finding(findings, UNSCORED, "color")["detail"]


def test_findings_round_trip_through_parquet_exactly(findings, tmp_path):
    path = tmp_path / "findings.parquet"
    findings.write_parquet(path)

    assert_frame_equal(pl.read_parquet(path), findings)


@pytest.mark.parametrize("spelling", ["red\t", "\nred", "red\u00a0"])
def test_any_whitespace_around_a_value_is_ignored(spelling):
    catalog = pl.DataFrame({"product_id": ["p"], "image": ["p.jpg"], "color": [spelling]})
    predictions = pl.DataFrame([("p", "color", "red", 0.5, None)], schema=PREDICTIONS_SCHEMA, orient="row")
    spec = parse_spec("attributes:\n  color:\n    values: [red, blue]\n")

    result = compare(catalog, predictions, spec=spec, calibration={"color": CALIBRATION["color"]})

    assert result["status"].to_list() == ["match"]


def test_a_missing_threshold_never_flags_even_a_certain_prediction():
    catalog = pl.DataFrame({"product_id": ["conflict", "gap"], "image": ["a", "b"], "color": ["blue", None]})
    predictions = pl.DataFrame(
        [("conflict", "color", "red", 1.0, None), ("gap", "color", "red", 1.0, None)],
        schema=PREDICTIONS_SCHEMA,
        orient="row",
    )
    spec = parse_spec("attributes:\n  color:\n    values: [red, blue]\n")
    never = Calibration(temperature=1.0, gap_threshold=None, conflict_threshold=None)

    result = compare(catalog, predictions, spec=spec, calibration={"color": never})

    assert result["status"].to_list() == ["uncertain", "uncertain"]
    assert all("never" in detail for detail in result["detail"].to_list())


def test_a_threshold_of_one_flags_predictions_that_round_to_certainty():
    catalog = pl.DataFrame({"product_id": ["conflict"], "image": ["a"], "color": ["blue"]})
    predictions = pl.DataFrame([("conflict", "color", "red", 1.0, None)], schema=PREDICTIONS_SCHEMA, orient="row")
    spec = parse_spec("attributes:\n  color:\n    values: [red, blue]\n")
    certain_only = Calibration(temperature=1.0, gap_threshold=1.0, conflict_threshold=1.0)

    result = compare(catalog, predictions, spec=spec, calibration={"color": certain_only})

    assert result["status"].to_list() == ["conflict"]
