"""A shard's state from one night to the next: unchanged rows reuse their findings without reading
their image, changed cells are compared again from the kept embedding, changed images are read and
embedded again, and the state grows by deltas folded into a new base."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from polars.testing import assert_frame_equal

from clipdq.core.options import AuditOptions
from clipdq.core.spec import parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.model.files import read_model_files
from clipdq.pipeline import audit, shards, state


def audit_inputs(data: Path, model: Path, output: Path, catalog_name: str, **options) -> audit.AuditInputs:
    """What the audit flow opens before its shards run, opened the same way."""
    spec_text = (data / "spec.yaml").read_text()
    spec, uri = parse_spec(spec_text), str(data / catalog_name)
    return audit.AuditInputs(
        uri,
        str(model),
        str(output),
        spec_text,
        spec,
        catalog.CatalogFile(uri),
        read_model_files(str(model)),
        sources.catalog_access(uri, spec),
        AuditOptions(**options),
    )


def score(
    data: Path, model: Path, output: Path, catalog_name: str = "catalog.parquet", **options
) -> tuple[pl.DataFrame, dict[str, int], shards.Job]:
    """(findings, image counts, job) of one audit of every shard, as a new process would run it."""
    shards.scorer_for.cache_clear()
    inputs = audit_inputs(data, model, output, catalog_name, **options)
    job = shards.job_for(inputs, backend="fp32")
    plan = shards.plan(inputs.source.group_rows, rows_per_shard=inputs.options.rows_per_shard)
    results = [shards.run_shard(job, shard) for shard in plan]
    findings = pl.concat(pl.read_parquet(result.part) for result in results)
    shutil.rmtree(job.work)  # as a published run does: the next run starts from the state alone
    return findings, shards.totals(results), job


def assert_same_findings(one: pl.DataFrame, other: pl.DataFrame) -> None:
    """Row for row; confidences to float precision (a row scored in a smaller batch may differ in the last bits)."""
    assert one.drop("confidence").equals(other.drop("confidence"))
    assert_frame_equal(one, other, check_exact=False, rel_tol=1e-5)


def image_errors(findings: pl.DataFrame) -> int:
    return findings.filter(pl.col("status") == "image_error")["product_id"].n_unique()


@pytest.fixture
def data(sample_dir, tmp_path) -> Path:
    shutil.copytree(sample_dir, tmp_path / "data", ignore=shutil.ignore_patterns("model"))
    return tmp_path / "data"


def test_an_unchanged_rerun_reuses_every_finding_without_reading_an_image(data, init_model_dir, tmp_path):
    first, counts, job = score(data, init_model_dir, tmp_path / "out")
    assert job.state and counts["reused"] == 0 and counts["embedded"] > 0
    parts = sorted(Path(job.state).rglob("*.parquet"))

    again, counts_again, _ = score(data, init_model_dir, tmp_path / "out")

    failed = image_errors(first)  # read again every night: a failure may pass
    assert counts_again["reused"] == counts["scored"] - failed > 0 and counts_again["embedded"] == 0
    assert again.equals(first)
    assert sorted(Path(job.state).rglob("*.parquet")) == parts  # nothing changed: nothing written

    (data / "catalog.parquet").rename(data / "export-2.parquet")  # tonight's export, under a new name
    _, renamed, _ = score(data, init_model_dir, tmp_path / "out", "export-2.parquet")
    assert renamed["reused"] == counts_again["reused"]


def test_a_changed_value_is_compared_again_from_its_kept_embedding(data, init_model_dir, tmp_path):
    score(data, init_model_dir, tmp_path / "out")
    frame = pl.read_parquet(data / "catalog.parquet")
    product = frame["product_id"][3]
    frame.with_columns(
        color=pl.when(pl.col("product_id") == product).then(pl.lit("purple")).otherwise(pl.col("color"))
    ).write_parquet(data / "catalog.parquet")

    again, counts, _ = score(data, init_model_dir, tmp_path / "out")
    fresh, _, _ = score(data, init_model_dir, tmp_path / "fresh", embedding_cache=False)

    assert counts["embedded"] == 0 and counts["reused"] == counts["from_cache"] - 1  # one row rescored, none read
    assert_same_findings(again, fresh)  # as a run with nothing kept judges it
    row = again.filter((pl.col("product_id") == product) & (pl.col("attribute") == "color"))
    assert row["existing_value"].to_list() == ["purple"] and row["status"].to_list() == ["invalid_value"]


def test_a_changed_image_is_embedded_again_and_kept_in_a_delta(data, init_model_dir, tmp_path):
    first, _, job = score(data, init_model_dir, tmp_path / "out")
    frame = pl.read_parquet(data / "catalog.parquet")
    path = data / frame["image"][0]
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)

    again, counts, _ = score(data, init_model_dir, tmp_path / "out")
    fresh, _, _ = score(data, init_model_dir, tmp_path / "fresh", embedding_cache=False)

    assert counts["embedded"] == 1 and counts["reused"] == counts["from_cache"]
    assert_same_findings(again, fresh)
    folder = state.shard_folder(job.state, 0)
    kept = state.Parts.of(folder)
    assert len(kept.names) == 2 and kept.delta_rows == 1  # the base and a delta of one row
    assert kept.read(["product_id", "sha256"]).height == frame.height - image_errors(first)


def test_deltas_past_their_share_are_folded_into_a_new_base(tmp_path):
    folder = str(tmp_path / "shard")
    rows = pl.concat(
        [
            pl.DataFrame(schema=state.STATE_SCHEMA),
            pl.DataFrame({"product_id": [f"p{i}" for i in range(8)], "sha256": ["a"] * 8, "location": ["x"] * 8}),
        ],
        how="diagonal",
    )
    state.Parts.of(folder).write(rows, base=True)
    state.Parts.of(folder).write(rows.head(2).with_columns(sha256=pl.lit("b")), base=False)
    (tmp_path / "shard" / "00000009-unreadable.parquet").write_bytes(b"not parquet")

    kept = state.Parts.of(folder)
    latest = kept.read(["product_id", "sha256"]).sort("product_id")
    assert latest["sha256"].to_list() == ["b", "b"] + ["a"] * 6  # a product's last row wins
    assert kept.delta_rows == 2

    kept.write(latest.join(rows.drop("sha256"), on="product_id"), base=True)
    assert [p.name[:8] for p in (tmp_path / "shard").glob("0*.parquet")] == ["00000002"]
    assert state.Parts.of(folder).read(["product_id", "sha256"]).sort("product_id").equals(latest)


def test_a_missing_image_is_read_again_every_night(data, init_model_dir, tmp_path):
    frame = pl.read_parquet(data / "catalog.parquet")
    missing = frame["product_id"][5]
    (data / frame["image"][5]).unlink()
    score(data, init_model_dir, tmp_path / "out")
    (data / frame["image"][5]).write_bytes((data / frame["image"][6]).read_bytes())  # restored

    again, _, _ = score(data, init_model_dir, tmp_path / "out")

    restored = again.filter(pl.col("product_id") == missing)
    assert not (restored["status"] == "image_error").any()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_versions_in_bulk_equal_one_by_one(where, tmp_path, request, monkeypatch):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        base = f"{bucket}/catalog"
        for i in range(30):
            storage.write_bytes(f"{base}/images/{i:03d}.png", bytes([i]) * (i + 1))
    else:
        base = str(tmp_path)
        (tmp_path / "images").mkdir()
        for i in range(30):
            (tmp_path / "images" / f"{i:03d}.png").write_bytes(bytes([i]) * (i + 1))
        (tmp_path / "images" / "link.png").symlink_to(tmp_path / "images" / "001.png")
    access = sources.access_for(base)
    refs = [f"images/{i:03d}.png" for i in range(0, 30, 3)] + ["images/none.png", "../outside.png", None]
    refs += ["images/link.png"] if where == "local" else []

    heads = []
    with monkeypatch.context() as patched:
        real = storage.version
        patched.setattr(storage, "version", lambda uri: heads.append(uri) or real(uri))
        found = sources.versions(refs, access)

    # a listing told every version; locally an lstat each, a symlink resolved on its own
    assert heads == ([str(tmp_path / "images" / "001.png")] if where == "local" else [])
    assert found == [sources._version(ref, access) for ref in refs]
    assert all(found[:10]) and found[10:13] == [None, None, None]  # missing, outside, no reference
    if where == "local":  # a symlink is judged by where it leads
        assert found[-1] is not None and found[-1][0] == str(tmp_path / "images" / "001.png")
