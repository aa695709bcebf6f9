"""S3 that fails, through a fault-injecting proxy in front of the moto server: throttling and
connection resets are retried and the audit succeeds; refusals fail the run before any scoring,
in one line, without retrying."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
from s3_faults import FaultyS3
from test_cli import reason_lines
from test_flow import read_run

from clipdq.io import storage
from clipdq.pipeline import shards
from clipdq.reporting import report
from flows.audit import audit_catalog

COLUMNS = ["product_id", "attribute", "existing_value", "predicted_value", "status", "detail"]


def point_s3_at(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    storage.s3_client.cache_clear()


def test_throttling_and_connection_resets_are_retried_and_the_audit_succeeds(
    prefect_harness, sample_dir, flagging_model_dir, s3_bucket, moto_endpoint, monkeypatch, isolated_home
):
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    args = (f"{s3_bucket}/sample/catalog.parquet", f"{s3_bucket}/sample/spec.yaml", str(flagging_model_dir))
    clean = audit_catalog(*args, f"{s3_bucket}/clean")

    def faults(method: str, path: str, n: int) -> str | None:
        return "slowdown" if n % 11 == 0 else "reset" if n % 17 == 0 else None

    with FaultyS3(moto_endpoint, faults) as proxy:
        point_s3_at(proxy.url, monkeypatch)
        faulty = audit_catalog(*args, f"{s3_bucket}/faulty")
    point_s3_at(moto_endpoint, monkeypatch)

    assert proxy.faults["slowdown"] >= 5 and proxy.faults["reset"] >= 3
    assert {method for method, _ in proxy.requests} >= {"GET", "HEAD", "PUT"}  # reads and writes both met faults
    findings, summary, _, _ = read_run(faulty)
    assert summary["images"]["lost_to_outages"] == 0
    assert findings.select(COLUMNS).equals(read_run(clean)[0].select(COLUMNS))
    assert pl.read_parquet(sample_dir / "catalog.parquet").height == summary["products_reported"]


def refuse(what: str | None):
    """A rule: AccessDenied for writes (a read-only role), for any request naming ``what``, or for nothing."""

    def rule(method: str, path: str, n: int) -> str | None:
        if what == "writes":
            return "denied" if method in ("PUT", "POST", "DELETE") else None
        return "denied" if what and what in path else None

    return rule


CASES = {  # case -> (what the proxy refuses, where the run writes, the one line it fails with)
    "read-only role": ("writes", "{s3}/reports", "StorageError: cannot write to {s3}/reports: S3 AccessDenied"),
    "catalog refused": (
        "catalog.parquet",
        "{s3}/reports",
        "CatalogError: cannot read {s3}/sample/catalog.parquet: S3 403",
    ),
    "missing output bucket": (
        None,
        "s3://no-such-bucket-for-clipdq/reports",
        "StorageError: cannot write to s3://no-such-bucket-for-clipdq/reports: S3 NoSuchBucket",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_refusal_fails_the_audit_before_any_scoring_without_retries(
    case, prefect_harness, sample_dir, flagging_model_dir, s3_bucket, moto_endpoint, monkeypatch
):
    refused, output, reason = (text.format(s3=s3_bucket) if text else text for text in CASES[case])
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    rule = refuse(refused)
    scored = []
    monkeypatch.setattr(shards, "run_shard", lambda *args: scored.append(args))
    with FaultyS3(moto_endpoint, rule) as proxy:
        point_s3_at(proxy.url, monkeypatch)
        with pytest.raises(Exception) as failure:
            audit_catalog(
                f"{s3_bucket}/sample/catalog.parquet", f"{s3_bucket}/sample/spec.yaml", str(flagging_model_dir), output
            )
    point_s3_at(moto_endpoint, monkeypatch)

    assert f"{type(failure.value).__name__}: {failure.value}" == reason
    assert scored == []  # it failed before any scoring
    assert len([request for request in proxy.requests if rule(*request, 0)]) == (0 if refused is None else 1)
    assert storage.list_files(f"{s3_bucket}/reports") == []


@pytest.mark.subprocess
def test_the_cli_says_why_in_one_line(
    cli_env,
    sample_dir,
    flagging_model_dir,
    s3_bucket,
    moto_endpoint,  # noqa: F811
    tmp_path,
):
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    with FaultyS3(moto_endpoint, refuse("writes")) as proxy:
        env = cli_env | {
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "clipdq.cli",
                "audit",
                "--catalog",
                f"{s3_bucket}/sample/catalog.parquet",
                "--spec",
                f"{s3_bucket}/sample/spec.yaml",
                "--model",
                str(flagging_model_dir),
                "--output",
                f"{s3_bucket}/reports",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    assert result.returncode == 1
    assert reason_lines(result, "audit") == [
        f"clipdq audit: error: StorageError: cannot write to {s3_bucket}/reports: S3 AccessDenied"
    ]


def test_an_unchanged_image_on_s3_is_not_downloaded_again(
    prefect_harness, sample_dir, flagging_model_dir, s3_bucket, moto_endpoint, monkeypatch, isolated_home
):
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    args = (
        f"{s3_bucket}/sample/catalog.parquet",
        f"{s3_bucket}/sample/spec.yaml",
        str(flagging_model_dir),
        f"{s3_bucket}/reports",
    )
    stored = set(storage.list_files(f"{s3_bucket}/sample"))
    referenced = set(pl.read_parquet(sample_dir / "catalog.parquet")["image"].drop_nulls().to_list())
    images = {f"/{s3_bucket.removeprefix('s3://')}/sample/{name}" for name in stored & referenced}  # that exist
    with FaultyS3(moto_endpoint, lambda *request: None) as proxy:  # faultless: it only counts
        point_s3_at(proxy.url, monkeypatch)
        audit_catalog(*args)
        first = len(proxy.requests)
        again = audit_catalog(*args)
    point_s3_at(moto_endpoint, monkeypatch)

    def of_images(requests, method):
        return [path for m, path in requests if m == method and path.split("?")[0] in images]

    assert len(of_images(proxy.requests[:first], "GET")) >= len(images)
    rerun, unread = proxy.requests[first:], read_run(again)[1]["images"]["unread"]
    listings = [path for m, path in rerun if m == "GET" and "list-type=2" in path and "sample%2Fimages" in path]
    # every ETag from one listing of the images' folder (the rows read again use what it told), no HEAD ...
    assert len(listings) == 1 and not of_images(rerun, "HEAD")
    shown = len(report.thumbnail_ids(read_run(again)[0]))
    # ... and only images that never embedded are read again, besides the report's thumbnails
    assert len(of_images(rerun, "GET")) == len(images) - unread + shown
    truth = pl.read_parquet(sample_dir / "ground_truth.parquet")
    broken = truth.filter(pl.col("planted") == "image_error")["product_id"].n_unique()
    assert broken and unread >= len(images) - broken  # all but the sample's broken images
