"""The Prefect flows, run for real under a temporary Prefect server, on the generated sample."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from polars.testing import assert_frame_equal
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from clipdq.checks.schemas import FINDINGS_SCHEMA, NOT_APPLICABLE, STATUSES
from clipdq.core.options import AuditOptions, FinetuneOptions
from clipdq.core.spec import parse_spec
from clipdq.io import storage
from clipdq.model import towers
from flows.audit import audit_catalog
from flows.finetune import finetune_model

RUN_FOLDER = re.compile(r"/run_date=(?P<date>\d{4}-\d{2}-\d{2})/run_id=(?P<run_id>[^/]+)$")
RUN_FILES = [
    "duplicate_search.parquet",
    "duplicates.parquet",
    "findings.parquet",
    "manifest.json",
    "report.html",
    "suggested_fixes.csv",
    "suggested_fixes.parquet",
    "summary.json",
    "validation.json",
]


def read_run(folder: str) -> tuple[pl.DataFrame, dict, str, dict]:
    """(findings, summary, report html, manifest) of a run folder, local or s3://."""
    findings = pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(folder, "findings.parquet"))))
    summary = json.loads(storage.read_bytes(storage.join(folder, "summary.json")))
    html = storage.read_bytes(storage.join(folder, "report.html")).decode()
    manifest = json.loads(storage.read_bytes(storage.join(folder, "manifest.json")))
    return findings, summary, html, manifest


def cells(frame: pl.DataFrame, planted: str | None = None) -> set[tuple[str, str]]:
    """(product_id, attribute) pairs, optionally of ground-truth rows with this planted error."""
    if planted is not None:
        frame = frame.filter(pl.col("planted") == planted)
    return set(frame.select("product_id", "attribute").iter_rows())


def assert_findings_match_ground_truth(findings: pl.DataFrame, truth: pl.DataFrame) -> None:
    """Every product x applicable attribute reported once; planted errors the model cannot miss are found."""
    assert dict(findings.schema) == FINDINGS_SCHEMA
    assert findings.height == truth.height
    assert cells(findings) == cells(truth)
    status = {(r["product_id"], r["attribute"]): r["status"] for r in findings.iter_rows(named=True)}
    assert cells(truth, "image_error"), "the sample plants broken images"
    assert {status[c] for c in cells(truth, "image_error")} == {"image_error"}
    assert cells(truth, "invalid_value"), "the sample plants invalid values"
    assert {status[c] for c in cells(truth, "invalid_value")} == {"invalid_value"}
    # a missing value is a gap or uncertain; a correct value, however spelled, is never invalid
    assert {status[c] for c in cells(truth, "gap")} <= {"gap", "uncertain"}
    assert "invalid_value" not in {status[c] for c in cells(truth, "none")}
    assert set(status.values()) <= set(STATUSES)


def assert_precision_consistent_with(right: int, flags: int, target: float) -> None:
    """``right`` of ``flags`` flags is no evidence against precision ``target``: a one-sided
    binomial test at the 10% level does not reject it (a handful of flags may hold one false one)."""
    p_value = sum(math.comb(flags, k) * target**k * (1 - target) ** (flags - k) for k in range(right + 1))
    assert flags and p_value >= 0.1, f"{right} of {flags} flags right: below precision {target} (p = {p_value:.3f})"


def assert_planted_flags_found(findings: pl.DataFrame, truth: pl.DataFrame, *, target_precision: float = 0.9) -> None:
    """A model that sees the attributes finds the planted conflicts, fills the planted gaps and
    finds the titles of other products, and its flags keep the precision its calibration promised."""
    joined = findings.join(truth, on=["product_id", "attribute"])
    titles = joined.filter(pl.col("attribute") == "title")
    flagged, mismatched = titles.filter(pl.col("status") == "conflict"), titles.filter(pl.col("planted") == "mismatch")
    assert_precision_consistent_with((flagged["planted"] == "mismatch").sum(), flagged.height, target_precision)
    assert mismatched.height and (mismatched["status"] == "conflict").mean() >= 0.5
    joined = joined.filter(pl.col("attribute") != "title")
    flagged = joined.filter(pl.col("status") == "conflict")
    planted = joined.filter((pl.col("planted") == "conflict") & (pl.col("attribute") == "color"))
    assert flagged.height and (flagged["planted"] == "conflict").mean() >= target_precision
    assert planted.height and (planted["status"] == "conflict").mean() >= 0.5  # colour has a conflict bar
    suggested = joined.filter(pl.col("status") == "gap")
    gaps = joined.filter(pl.col("planted") == "gap")
    assert (suggested["planted"] == "gap").all()  # only missing values are suggested
    assert (gaps["status"] == "gap").mean() >= 0.5
    assert (suggested["predicted_value"] == suggested["true_value"]).mean() >= target_precision


def assert_run_folder(folder: str, output: str) -> re.Match:
    assert folder.startswith(output.rstrip("/") + "/")
    match = RUN_FOLDER.search(folder)
    assert match, folder
    today = datetime.now(UTC).date()
    assert match["date"] in {str(today), str(today - timedelta(days=1))}
    assert storage.list_files(folder) == RUN_FILES
    return match


def read_artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.fixture(scope="module")
def local_run(prefect_harness, sample_dir: Path, flagging_model_dir: Path, tmp_path_factory) -> tuple[str, str]:
    """(output folder, run folder) of one audit of the sample catalog with the session's flagging towers."""
    output = str(tmp_path_factory.mktemp("reports"))
    folder = audit_catalog(
        str(sample_dir / "catalog.parquet"),
        str(sample_dir / "spec.yaml"),
        str(flagging_model_dir),
        output,
        AuditOptions(batch_size=16),
    )
    return output, folder


def test_audit_writes_a_complete_run_folder(local_run):
    output, folder = local_run

    match = assert_run_folder(folder, output)
    _, summary, _, manifest = read_run(folder)
    assert summary["run_id"] == manifest["run_id"] == match["run_id"]
    for name, entry in manifest["files"].items():
        data = (Path(folder) / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(manifest["files"]) == sorted(set(RUN_FILES) - {"manifest.json"})


def test_audit_reports_every_product_and_finds_the_planted_errors(local_run, sample_dir):
    findings, *_ = read_run(local_run[1])

    truth = pl.read_parquet(sample_dir / "ground_truth.parquet")
    assert_findings_match_ground_truth(findings, truth)
    assert_planted_flags_found(findings, truth)


def test_summary_report_and_fixes_show_the_images_that_may_not_show_their_title(local_run):
    findings, summary, html, _ = read_run(local_run[1])
    flagged = findings.filter((pl.col("attribute") == "title") & (pl.col("status") == "conflict"))

    text = summary["text_agreement"]
    assert text["checked"] and text["column"] == "title" and text["category_column"] == "product_type"
    assert text["threshold"] is not None and text["validation_rows"] > 100
    # every scored title judged against this catalog's own median score, not validation's
    assert (
        text["against"] == "this catalog"
        and text["catalog_rows"]
        == findings.filter((pl.col("attribute") == "title") & (pl.col("status") != "image_error")).height
    )
    assert f"the median of its {text['catalog_rows']} scored rows" in html
    assert text["flagged"] == flagged.height > 0
    assert 'id="text-agreement"' in html and flagged["product_id"][0] in html.split('id="text-agreement"')[1]
    fixes = pl.read_csv(Path(local_run[1]) / "suggested_fixes.csv")
    assert set(flagged["product_id"]) <= set(fixes.filter(pl.col("attribute") == "title")["product_id"])


def test_summary_totals_equal_the_findings(local_run, sample_dir):
    findings, summary, _, manifest = read_run(local_run[1])
    catalog_rows = pl.read_parquet(sample_dir / "catalog.parquet").height

    counted = {s: findings.filter(pl.col("status") == s).height for s in (*STATUSES, NOT_APPLICABLE)}
    assert summary["totals"] == counted == manifest["totals"]
    assert summary["findings"] == findings.height == sum(counted.values()) == manifest["rows"]
    assert summary["products"] == summary["products_reported"] == catalog_rows
    for row in summary["by_attribute"]:
        of_attribute = findings.filter(pl.col("attribute") == row["attribute"])
        assert {s: row[s] for s in STATUSES} == {s: of_attribute.filter(pl.col("status") == s).height for s in STATUSES}
    assert {e["column"] for e in summary["expectations"]} == {"product_id", "image"}


def test_report_shows_the_counts(local_run):
    _, summary, html, _ = read_run(local_run[1])
    text = " ".join(re.sub(r"<[^>]+>", " ", html).split())

    assert f"{summary['products']} products checked" in text
    totals = summary["totals"]
    for phrase in (
        f"{totals['conflict']} conflicts",
        f"{totals['gap']} gaps",
        f"{totals['invalid_value']} invalid",
        f"{totals['image_error']} image errors",
        f"{totals['uncertain']} uncertain",
    ):
        assert phrase in text
    assert summary["run_id"] in html


def test_audit_publishes_prefect_artifacts(local_run):
    _, summary, _, _ = read_run(local_run[1])

    reports = [a for a in read_artifacts("clipdq-audit-report") if summary["run_id"] in (a.data or "")]
    assert len(reports) == 1
    assert reports[0].type == "markdown"
    assert storage.join(local_run[1], "report.html") in reports[0].data
    counts = [a for a in read_artifacts("clipdq-audit-counts") if summary["run_id"] in (a.description or "")]
    assert len(counts) == 1
    assert counts[0].type == "table"
    table = json.loads(counts[0].data) if isinstance(counts[0].data, str) else counts[0].data
    assert table == summary["by_attribute"]


def test_an_empty_catalog_gives_a_complete_run_with_no_findings(
    prefect_harness, sample_dir, trained_model_dir, tmp_path
):
    empty = tmp_path / "empty.parquet"
    pl.read_parquet(sample_dir / "catalog.parquet").head(0).write_parquet(empty)

    folder = audit_catalog(str(empty), str(sample_dir / "spec.yaml"), str(trained_model_dir), str(tmp_path / "out"))

    findings, summary, _, _ = read_run(folder)
    assert dict(findings.schema) == FINDINGS_SCHEMA and findings.height == 0
    assert summary["products"] == 0 and set(summary["totals"].values()) == {0}


def test_an_int8_audit_checks_agreement_first_and_caches_apart_from_fp32(
    prefect_harness, local_run, sample_dir, flagging_model_dir, tmp_path
):
    output = str(tmp_path / "out")

    folder = audit_catalog(
        str(sample_dir / "catalog.parquet"),
        str(sample_dir / "spec.yaml"),
        str(flagging_model_dir),
        output,
        AuditOptions(batch_size=16, backend="int8"),
    )

    findings, summary, _, _ = read_run(folder)
    check = summary["backend"]
    assert check["requested"] == "int8" and check["images_checked"] > 10
    assert check["used"] == ("int8" if check["agreement"] >= 0.99 else "fp32")
    fp32 = read_run(local_run[1])[0]
    assert findings.select("product_id", "attribute").equals(fp32.select("product_id", "attribute"))
    same = (findings["predicted_value"] == fp32["predicted_value"]).mean()
    assert same >= 0.95
    caches = {name.split("/")[0] for name in storage.list_files(f"{output}/_embedding_cache")}
    assert [name.endswith("-int8") for name in caches] == [check["used"] == "int8"]


def test_audit_reads_the_catalog_from_s3_and_writes_the_run_to_s3(
    prefect_harness, sample_dir, flagging_model_dir, s3_bucket, isolated_home
):
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    storage.upload_folder(flagging_model_dir, f"{s3_bucket}/models/lite0")
    output = f"{s3_bucket}/reports"

    args = (f"{s3_bucket}/sample/catalog.parquet", f"{s3_bucket}/sample/spec.yaml", f"{s3_bucket}/models/lite0")
    folder = audit_catalog(*args, output)

    assert_run_folder(folder, output)
    findings, summary, _, _ = read_run(folder)
    truth = pl.read_parquet(sample_dir / "ground_truth.parquet")
    assert_findings_match_ground_truth(findings, truth)
    assert_planted_flags_found(findings, truth)
    assert summary["catalog"] == f"{s3_bucket}/sample/catalog.parquet"

    # the next night: versions from a listing of the images' prefix, every usable row's findings reused
    changed, other = truth.filter(pl.col("planted") != "image_error")["product_id"].unique(maintain_order=True)[:2]
    image = f"{s3_bucket}/sample/images/{changed}.jpg"
    storage.write_bytes(image, storage.read_bytes(f"{s3_bucket}/sample/images/{other}.jpg"))
    again = read_run(audit_catalog(*args, output))
    readable = summary["images"]["embedded"]
    assert again[1]["images"] == {
        "scored": summary["images"]["scored"],
        "reused": readable - 1,
        "from_cache": readable - 1,
        "unread": readable - 1,
        "embedded": 1,  # the image rewritten
        "lost_to_outages": 0,
    }
    same = pl.col("product_id") != changed
    assert again[0].filter(same).equals(findings.filter(same))


def test_finetune_flow_writes_a_loadable_model_with_metrics(prefect_harness, sample_dir, spec, tmp_path):
    output = str(tmp_path / "model")

    result = finetune_model(
        str(sample_dir / "labeled.parquet"), str(sample_dir / "spec.yaml"), output, FinetuneOptions(epochs=2)
    )

    assert result == output
    clip = towers.load_model(output, device="cpu")
    assert clip.meta.trained is True
    assert clip.meta.spec_fingerprint == spec.fingerprint()
    assert 1 <= clip.meta.training["epochs_run"] <= 2
    assert set(clip.meta.metrics) == set(clip.meta.calibration) == set(spec.names)
    metrics = [a for a in read_artifacts("clipdq-finetune-metrics") if output in (a.description or "")]
    assert len(metrics) == 1


def test_repeated_audits_embed_only_new_or_changed_images(prefect_harness, sample_dir, trained_model_dir, tmp_path):
    shutil.copytree(sample_dir, tmp_path / "sample")
    catalog = tmp_path / "sample" / "catalog.parquet"
    args = (str(catalog), str(tmp_path / "sample" / "spec.yaml"), str(trained_model_dir), str(tmp_path / "out"))

    first = audit_catalog(*args, AuditOptions(batch_size=16))
    unchanged = audit_catalog(*args, AuditOptions(batch_size=16))
    truth = pl.read_parquet(tmp_path / "sample" / "ground_truth.parquet")
    changed_id = truth.filter(pl.col("planted") != "image_error")["product_id"][0]
    image = tmp_path / "sample" / "images" / f"{changed_id}.jpg"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)  # new bytes, same product
    after_change = audit_catalog(*args, AuditOptions(batch_size=16))
    uncached = audit_catalog(*args, AuditOptions(batch_size=16, embedding_cache=False))

    counts = [read_run(run)[1]["images"] for run in (first, unchanged, after_change, uncached)]
    readable, rows = counts[0]["embedded"], len(pl.read_parquet(catalog))
    broken = truth.filter(pl.col("planted") == "image_error")["product_id"].n_unique()
    assert broken and readable == rows - broken  # all but the sample's broken images
    lost = {"lost_to_outages": 0}
    assert counts[0] == {"scored": rows, "reused": 0, "from_cache": 0, "unread": 0, "embedded": readable} | lost
    kept = {"from_cache": readable, "unread": readable, "embedded": 0}
    assert counts[1] == {"scored": rows, "reused": readable} | kept | lost
    kept = {"from_cache": readable - 1, "unread": readable - 1, "embedded": 1}
    assert counts[2] == {"scored": rows, "reused": readable - 1} | kept | lost
    assert counts[3] == {"scored": rows, "reused": 0, "from_cache": 0, "unread": 0, "embedded": readable} | lost
    columns = ["product_id", "attribute", "predicted_value", "status"]
    assert_frame_equal(read_run(first)[0], read_run(unchanged)[0], check_exact=False, rel_tol=1e-6)
    assert read_run(after_change)[0].select(columns).equals(read_run(uncached)[0].select(columns))
    cached = [name.split("/")[1] for name in storage.list_files(str(tmp_path / "out" / "_embedding_cache"))]
    assert sorted(cached) == [
        "embeddings",  # the texts': the images' embeddings are kept once, in the shards' states
        f"text-{parse_spec((tmp_path / 'sample' / 'spec.yaml').read_text()).fingerprint()}.safetensors",
    ]
    states = [name.split("/")[1:] for name in storage.list_files(str(tmp_path / "out" / "_state"))]
    assert [(shard, part[:8]) for shard, part in states] == [("shard-00000", "00000000"), ("shard-00000", "00000001")]
    reused = [read_run(run)[1]["expectations_reused"] for run in (first, unchanged, after_change)]
    assert reused == [False, True, True]  # the catalog's keys did not change, only an image
    assert read_run(first)[1]["expectations"] == read_run(unchanged)[1]["expectations"]


def test_an_output_bucket_that_does_not_exist_fails_the_audit_before_any_work(
    s3_bucket, sample_dir, prefect_harness, tmp_path
):
    from clipdq.io.storage import StorageError

    with pytest.raises(StorageError, match="cannot write to s3://no-such-bucket-here/reports: S3 NoSuchBucket"):
        audit_catalog(
            str(sample_dir / "catalog.parquet"),
            str(sample_dir / "spec.yaml"),
            str(tmp_path / "no-model"),
            "s3://no-such-bucket-here/reports",
        )  # the model would fail to load: it is never reached


def test_a_second_audit_counts_changes_and_an_unreadable_previous_run_does_not_stop_it(
    prefect_harness, sample_dir, flagging_model_dir, tmp_path
):
    args = (
        str(sample_dir / "catalog.parquet"),
        str(sample_dir / "spec.yaml"),
        str(flagging_model_dir),
        str(tmp_path / "out"),
    )
    first = audit_catalog(*args)
    second = audit_catalog(*args)
    changes = read_run(second)[1]["changes"]
    (Path(second) / "findings.parquet").write_bytes(b"not parquet")  # a damaged run folder
    third = audit_catalog(*args)

    problems = read_run(first)[0].filter(pl.col("status").is_in(["conflict", "gap", "invalid_value", "image_error"]))
    assert set(problems["status"]) == {"conflict", "gap", "invalid_value", "image_error"}  # every kind persists
    assert changes["previous_run"] == Path(first).name.removeprefix("run_id=")
    assert changes["totals"] == {"new": 0, "resolved": 0, "persisting": problems.height}  # the same catalog
    assert read_run(third)[1]["changes"] is None
