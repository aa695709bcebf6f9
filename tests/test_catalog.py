"""Reading a catalog (local and s3://) and checking it before an audit."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from clipdq.core.spec import parse_spec
from clipdq.io import catalog, storage
from clipdq.io.catalog import CatalogError

SPEC = parse_spec("""\
id_column: sku
image_column: picture
attributes:
  color:
    values: [red, blue]
  has_lid:
    values: [lid, no lid]
    applies_to: {product_type: [cookware]}
""")


def good_catalog(**overrides) -> pl.DataFrame:
    columns = {
        "sku": ["a1", "a2", "a3"],
        "picture": ["images/a1.jpg", "images/a2.jpg", "images/a3.jpg"],
        "product_type": ["cookware", "apparel", "cookware"],
        "color": ["red", None, "Blue"],
        "has_lid": ["lid", None, "no lid"],
    }
    return pl.DataFrame({**columns, **overrides})


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.write_parquet(out)
    return out.getvalue()


def test_read_catalog_from_a_local_file(tmp_path):
    path = tmp_path / "catalog.parquet"
    good_catalog().write_parquet(path)

    assert_frame_equal(catalog.read_catalog(str(path)), good_catalog())


def test_read_catalog_from_s3(s3_bucket):
    uri = f"{s3_bucket}/catalogs/catalog.parquet"
    storage.write_bytes(uri, parquet_bytes(good_catalog()))

    assert_frame_equal(catalog.read_catalog(uri), good_catalog())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_batches_cover_every_row_once_in_order_across_row_groups(where, tmp_path, request):
    frame = pl.DataFrame(
        {"sku": [f"p{i}" for i in range(50)], "picture": [f"{i}.jpg" for i in range(50)], "notes": ["x" * 100] * 50}
    )
    out = io.BytesIO()
    frame.write_parquet(out, row_group_size=7)
    uri = str(tmp_path / "catalog.parquet")
    if where == "s3":
        uri = request.getfixturevalue("s3_bucket") + "/catalog.parquet"
    storage.write_bytes(uri, out.getvalue())

    source = catalog.CatalogFile(uri)
    parts = list(source.batches(8))
    keys = source.read(["sku", "picture"])

    assert source.row_count == 50 and source.schema == frame.schema
    assert max(part.height for part in parts) <= 8
    assert_frame_equal(pl.concat(parts), frame)
    assert_frame_equal(keys, frame.drop("notes"))


def test_an_s3_object_reads_part_by_part_at_any_offset(s3_bucket):
    data = bytes(range(256)) * 40
    storage.write_bytes(f"{s3_bucket}/blob", data)

    stream, _ = storage.open_read(f"{s3_bucket}/blob")
    with stream:
        stream.seek(-100, io.SEEK_END)
        tail = stream.read()
        stream.seek(1000)
        middle = stream.read(24)

    assert tail == data[-100:] and middle == data[1000:1024]


def test_missing_local_file_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="catalog not found"):
        catalog.read_catalog(str(tmp_path / "nope.parquet"))


def test_missing_s3_object_is_a_catalog_error(s3_bucket):
    with pytest.raises(CatalogError, match="catalog not found"):
        catalog.read_catalog(f"{s3_bucket}/nope.parquet")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_file_that_is_not_parquet_is_a_catalog_error(where, tmp_path, request):
    content = b"product_id,image\na1,a1.jpg\n"
    if where == "local":
        uri = str(tmp_path / "catalog.parquet")
        Path(uri).write_bytes(content)
    else:
        uri = request.getfixturevalue("s3_bucket") + "/catalog.parquet"
        storage.write_bytes(uri, content)

    with pytest.raises(CatalogError, match="not readable Parquet"):
        catalog.read_catalog(uri)


def test_a_good_catalog_validates_with_expectation_results():
    result = catalog.validate(good_catalog(), SPEC)

    assert result["rows"] == 3
    assert result["warnings"] == []
    checks = {(c["expectation"], c["column"]): c for c in result["expectations"]}
    assert set(checks) == {
        ("expect_column_values_to_not_be_null", "sku"),
        ("expect_column_values_to_be_unique", "sku"),
        ("expect_column_values_to_not_be_null", "picture"),
    }
    assert all(c["success"] and c["error"] is None and c["unexpected_count"] == 0 for c in checks.values())


def test_missing_images_are_reported_by_expectations_but_do_not_stop_the_audit():
    frame = good_catalog(picture=["images/a1.jpg", None, None])

    result = catalog.validate(frame, SPEC)

    image_check = next(c for c in result["expectations"] if c["column"] == "picture")
    assert image_check["success"] is False
    assert image_check["unexpected_count"] == 2


def test_missing_attribute_column_is_a_warning():
    result = catalog.validate(good_catalog().drop("color"), SPEC)

    assert len(result["warnings"]) == 1
    assert "'color'" in result["warnings"][0] and "missing" in result["warnings"][0]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        pytest.param(good_catalog().drop("sku"), "lacks required columns ['sku']", id="no-id-column"),
        pytest.param(good_catalog().drop("picture"), "lacks required columns ['picture']", id="no-image-column"),
        pytest.param(
            good_catalog().drop("product_type"), "lacks required columns ['product_type']", id="no-applies-to-column"
        ),
        pytest.param(good_catalog(color=[1, 2, 3]), "attribute column 'color' must hold strings", id="int-attribute"),
        pytest.param(
            good_catalog(sku=["a1", "a2", "a1"]),
            "expect_column_values_to_be_unique failed for 'sku'",
            id="duplicate-ids",
        ),
        pytest.param(
            good_catalog(sku=["a1", None, "a3"]), "expect_column_values_to_not_be_null failed for 'sku'", id="null-ids"
        ),
        pytest.param(
            good_catalog(sku=[b"a1", b"a2", b"a3"]), "id column 'sku' must hold strings or integers", id="binary-ids"
        ),
        pytest.param(
            good_catalog(picture=[1.0, 2.0, 3.0]),
            "image column 'picture' must hold paths, URIs or image",
            id="float-images",
        ),
        pytest.param(
            good_catalog(product_type=[1, 2, 1]),
            "applies_to column 'product_type' must hold strings",
            id="int-applies-to",
        ),
    ],
)
def test_unusable_catalogs_raise_catalog_error(frame, message):
    with pytest.raises(CatalogError) as raised:
        catalog.validate(frame, SPEC)
    assert message in str(raised.value)


def test_duplicate_id_error_names_the_duplicates():
    with pytest.raises(CatalogError, match="a1"):
        catalog.validate(good_catalog(sku=["a1", "a2", "a1"]), SPEC)


def test_an_attribute_column_without_any_value_counts_as_missing(tmp_path):
    path = tmp_path / "catalog.parquet"
    good_catalog(color=[None, None, None]).write_parquet(path)

    result = catalog.validate(catalog.read_catalog(str(path)), SPEC)

    assert result["rows"] == 3


def test_integer_ids_are_accepted():
    assert catalog.validate(good_catalog(sku=[1, 2, 3]), SPEC)["rows"] == 3


def test_schema_problems_stop_the_audit_before_the_model_loads(prefect_harness, tmp_path):
    from flows.audit import audit_catalog

    (tmp_path / "spec.yaml").write_text("""\
id_column: sku
image_column: picture
attributes:
  has_lid:
    values: [lid, no lid]
    applies_to: {product_type: [cookware]}
""")
    good_catalog(product_type=[1, 2, 1]).write_parquet(tmp_path / "catalog.parquet")

    with pytest.raises(CatalogError, match="applies_to column 'product_type' must hold strings"):  # not a model error
        audit_catalog(
            str(tmp_path / "catalog.parquet"),
            str(tmp_path / "spec.yaml"),
            str(tmp_path / "no-model"),
            str(tmp_path / "out"),
        )

    assert not (tmp_path / "out").exists()


def test_a_catalog_overwritten_while_it_is_read_fails_instead_of_mixing_versions(s3_bucket):
    import numpy as np

    rng = np.random.default_rng(0)
    frame = pl.DataFrame(
        {"sku": [f"p{i}" for i in range(20_000)], "picture": [rng.bytes(300) for _ in range(20_000)]}
    )  # incompressible: 6 MB
    out = io.BytesIO()
    frame.write_parquet(out, row_group_size=2_000)
    uri = f"{s3_bucket}/catalog.parquet"
    storage.write_bytes(uri, out.getvalue())
    source = catalog.CatalogFile(uri)
    batches = source.batches(2_000)
    first = next(batches)

    storage.write_bytes(uri, parquet_bytes(frame.head(10)))  # a new version lands mid-run

    with pytest.raises(CatalogError, match="changed while being read"):
        list(batches)
    assert first.height == 2_000


def test_unchanged_keys_reuse_their_validation_and_changed_ones_are_checked_again(tmp_path, monkeypatch):
    good_catalog().write_parquet(tmp_path / "catalog.parquet")
    cache = str(tmp_path / "validation")
    first = catalog.validate_file(catalog.CatalogFile(str(tmp_path / "catalog.parquet")), SPEC, cache=cache)

    def no_checks(*args, **kwargs):
        raise AssertionError("great_expectations ran again on an unchanged catalog")

    monkeypatch.setattr(catalog, "run_expectations", no_checks)
    again = catalog.validate_file(catalog.CatalogFile(str(tmp_path / "catalog.parquet")), SPEC, cache=cache)
    good_catalog(sku=["a1", "a2", "a1"]).write_parquet(tmp_path / "catalog.parquet")  # same size, new ids
    monkeypatch.undo()

    assert "reused" not in first and again == first | {"reused": True}
    with pytest.raises(CatalogError, match="expect_column_values_to_be_unique failed"):
        catalog.validate_file(catalog.CatalogFile(str(tmp_path / "catalog.parquet")), SPEC, cache=cache)


def test_keys_are_checked_batch_by_batch_and_repeats_across_batches_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "KEY_BATCH", 3)  # ten rows in four batches
    skus = [f"s{i}" for i in range(10)]
    frame = pl.DataFrame({"sku": skus, "picture": [f"images/{s}.jpg" for s in skus]}).with_columns(
        pl.lit("red").alias("color"), pl.lit("cookware").alias("product_type")
    )
    frame.write_parquet(tmp_path / "good.parquet", row_group_size=4)
    frame.with_columns(pl.Series("sku", skus[:9] + ["s1"])).write_parquet(tmp_path / "bad.parquet", row_group_size=4)

    validation = catalog.validate_file(catalog.CatalogFile(str(tmp_path / "good.parquet")), SPEC)

    assert validation["rows"] == 10 and all(c["success"] for c in validation["expectations"])
    with pytest.raises(CatalogError, match=r"be_unique failed for 'sku': 2 rows, e.g. \['s1', 's1'\]"):
        catalog.validate_file(catalog.CatalogFile(str(tmp_path / "bad.parquet")), SPEC)


def test_a_shared_id_hash_alone_is_not_a_duplicate(monkeypatch):
    # every id hashes alike, as two would in a 64-bit collision
    monkeypatch.setattr(pl.Expr, "hash", lambda self, seed=0: pl.lit(7, pl.UInt64))

    result = catalog.validate(good_catalog(), SPEC)

    unique = next(c for c in result["expectations"] if c["expectation"] == "expect_column_values_to_be_unique")
    assert unique["success"] and unique["unexpected_count"] == 0
