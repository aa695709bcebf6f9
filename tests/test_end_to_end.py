"""Whole runs of the ``clipdq`` console script on generated catalogs with planted problems: a
category tree fine-tuned and audited, shards on a local Dask cluster, the bf16 backend kept where it
agrees with fp32, and an image store outage just below and just above what the spec tolerates.

Each test plants what it expects to find and reads only what the commands write (findings,
suggested fixes, summary, manifest, the model's clipdq.json), so the library's internals may move.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from s3_faults import FaultyS3
from test_cli import cli_env, reason_lines  # noqa: F401 - the CLI's environment fixture (no Prefect API)
from test_flow import read_run

from clipdq.core.options import AuditOptions
from clipdq.core.spec import parse_spec
from clipdq.io import storage
from flows.audit import audit_catalog

pytestmark = pytest.mark.subprocess

COLUMNS = ["product_id", "attribute", "existing_value", "predicted_value", "status", "detail"]


def clipdq(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipdq.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def printed_folder(result: subprocess.CompletedProcess) -> Path:
    """The folder a command printed as its last line, once it succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def broken_products(sample: Path) -> set[str]:
    """The sample's products whose image the generator broke (missing, garbage or truncated)."""
    truth = pl.read_parquet(sample / "ground_truth.parquet")
    return set(truth.filter(pl.col("planted") == "image_error")["product_id"])


# --------------------------------------------------------------------------- a category tree

TREE_PATHS = ["apparel/sleeveless", "apparel/shortsleeved", "apparel/longsleeved", "cookware/lid", "cookware/no lid"]
TREE_SPEC = f"""\
id_column: product_id
image_column: image
target_precision: 0.9
expected_error_rate: 0.3   # a catalog where wrong paths are common: 150 validation rows can show each level's bar
attributes:
  category:
    levels: [kind, part]
    paths: [{", ".join(TREE_PATHS)}]
    path_column: category
"""
TREE_LABELED = 300  # half of them validate


def true_path(product_type: str, sleeve_length: str | None, has_lid: str | None) -> str:
    """A sample product's path: its type, then its sleeves (apparel) or its lid (cookware)."""
    return f"{product_type}/{sleeve_length if product_type == 'apparel' else has_lid}"


@pytest.fixture(scope="module")
def tree_model(cli_env, flagging_labeled_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """``clipdq finetune`` of the pretrained EfficientNet-Lite0 tower (locked mode) on generated
    labeled products whose one path column holds the tree: (result, model folder, spec)."""
    folder = tmp_path_factory.mktemp("tree")
    shutil.copytree(flagging_labeled_dir / "images", folder / "images")
    labeled = pl.read_parquet(flagging_labeled_dir / "labeled.parquet").head(TREE_LABELED)
    labeled.select("product_id", "image", pl.struct("product_type", "sleeve_length", "has_lid").map_elements(
        lambda row: true_path(**row), return_dtype=pl.String).alias("category")).write_parquet(folder / "labeled.parquet")
    (folder / "spec.yaml").write_text(TREE_SPEC)
    result = clipdq(cli_env, "finetune", "--catalog", str(folder / "labeled.parquet"), "--spec", str(folder / "spec.yaml"),
                    "--arch", "efficientnet-lite0", "--mode", "locked", "--views", "1", "--epochs", "10",
                    "--val-fraction", "0.5", "--test-fraction", "0", "--output", str(folder / "model"), cwd=folder)
    return result, folder / "model", folder / "spec.yaml"


def planted_tree_catalog(sample: Path, folder: Path) -> pl.DataFrame:
    """The sample's catalog with a path column: true paths, except wrong kinds (the top level),
    wrong parts under the right kind, paths that stop at the kind, and no path at all, planted on
    products with a readable image. Writes it beside a copy of the images; returns every product
    with its true path and what was planted."""
    truth = pl.read_parquet(sample / "ground_truth.parquet").filter(pl.col("attribute") != "title")
    values = truth.pivot(on="attribute", index="product_id", values="true_value")
    catalog = pl.read_parquet(sample / "catalog.parquet").select("product_id", "image", "product_type")
    rows = catalog.join(values, on="product_id", how="left").to_dicts()
    readable = [row["product_id"] for row in rows if row["product_id"] not in broken_products(sample)]
    random.Random(0).shuffle(readable)
    planted = ({pid: "wrong kind" for pid in readable[:12]} | {pid: "wrong part" for pid in readable[12:24]}
               | {pid: "kind only" for pid in readable[24:30]} | {pid: "no path" for pid in readable[30:34]})
    rng, out = random.Random(1), []
    for row in rows:
        path = true_path(row["product_type"], row.get("sleeve_length"), row.get("has_lid"))
        kind = path.split("/")[0]
        what = planted.get(row["product_id"], "none")
        written = {"wrong kind": lambda: rng.choice([p for p in TREE_PATHS if not p.startswith(kind + "/")]),
                   "wrong part": lambda: rng.choice([p for p in TREE_PATHS if p.startswith(kind + "/") and p != path]),
                   "kind only": lambda: kind, "no path": lambda: None, "none": lambda: path}[what]()
        out.append({"product_id": row["product_id"], "image": row["image"], "category": written, "true_path": path,
                    "planted": what})
    frame = pl.DataFrame(out)
    shutil.copytree(sample / "images", folder / "images")
    frame.select("product_id", "image", "category").write_parquet(folder / "catalog.parquet")
    return frame


def test_a_category_tree_is_finetuned_and_audited_with_conflicts_at_the_highest_wrong_level(
        tree_model, cli_env, sample_dir, tmp_path):
    result, model, spec = tree_model
    assert printed_folder(result) == model
    calibration = json.loads((model / "clipdq.json").read_text())["calibration"]
    assert set(calibration) == {"kind", "part"}  # one calibration per level
    for level in ("kind", "part"):  # each level can flag: otherwise this test would prove nothing
        assert calibration[level]["conflict_threshold"] is not None, calibration
        assert calibration[level]["gap_threshold"] is not None, calibration
    assert calibration["kind"] != calibration["part"]
    planted = planted_tree_catalog(sample_dir, tmp_path / "catalog")

    run = printed_folder(clipdq(cli_env, "audit", "--catalog", str(tmp_path / "catalog" / "catalog.parquet"),
                                "--spec", str(spec), "--model", str(model), "--output", str(tmp_path / "reports"),
                                cwd=tmp_path))

    findings = pl.read_parquet(run / "findings.parquet")
    assert (run / "manifest.json").is_file()
    assert findings.height == 2 * planted.height  # every product, at both levels
    status = {(r["product_id"], r["attribute"]): r["status"] for r in findings.iter_rows(named=True)}
    detail = {(r["product_id"], r["attribute"]): r["detail"] for r in findings.iter_rows(named=True)}
    of = {what: planted.filter(pl.col("planted") == what).rows(named=True) for what in planted["planted"].unique()}

    # a wrong kind is reported once, at the kind, naming both paths; the part below follows from it
    found = [row for row in of["wrong kind"] if status[(row["product_id"], "kind")] == "conflict"]
    assert len(found) >= 0.9 * len(of["wrong kind"]), f"{len(found)} of {len(of['wrong kind'])} wrong kinds found"
    for row in found:
        assert status[(row["product_id"], "part")] == "parent_conflict"
        assert row["category"] in detail[(row["product_id"], "kind")]
        assert row["true_path"] in detail[(row["product_id"], "kind")]
    # a wrong part under the right kind is a conflict at the part only
    assert {status[(row["product_id"], "kind")] for row in of["wrong part"]} == {"match"}
    parts = [status[(row["product_id"], "part")] for row in of["wrong part"]]
    assert parts.count("conflict") >= 0.75 * len(parts) and "parent_conflict" not in parts
    # a parent_conflict only ever sits below a conflict, and no right path is flagged
    below = {pid for (pid, level), s in status.items() if s == "parent_conflict"}
    assert below and below == {pid for (pid, level), s in status.items() if level == "kind" and s == "conflict"}
    right = {row["product_id"] for row in of["none"]}
    assert not {pid for (pid, _), s in status.items() if pid in right and s in ("conflict", "parent_conflict")}
    # a path that stops at the kind, or no path at all, gets the image's values as gaps
    assert [status[(row["product_id"], "part")] for row in of["kind only"]].count("gap") >= 0.75 * len(of["kind only"])
    assert {status[(row["product_id"], "kind")] for row in of["kind only"]} == {"match"}

    # the suggested fixes set the whole path: a row per level, together the true path
    fixes = pl.read_parquet(run / "suggested_fixes.parquet")
    by_product = {pid: dict(group.select("attribute", "suggested_value").rows())
                  for (pid,), group in fixes.group_by("product_id")}
    for row in found:
        assert "/".join(by_product[row["product_id"]][level] for level in ("kind", "part")) == row["true_path"]
    for row in of["no path"]:
        if row["product_id"] in by_product and len(by_product[row["product_id"]]) == 2:
            assert "/".join(by_product[row["product_id"]][level] for level in ("kind", "part")) == row["true_path"]
    statuses = dict(fixes.group_by("status").len().rows())
    assert statuses.get("conflict", 0) >= len(found) and statuses.get("parent_conflict", 0) == len(found)
    assert statuses.get("gap", 0) >= 1


# --------------------------------------------------------------------------- shards on a local Dask cluster


def test_two_dask_workers_started_by_the_cli_give_the_findings_of_one_process_row_for_row(
        cli_env, prefect_harness, sample_dir, trained_model_dir, tmp_path):
    """The tiny model keeps this quick (each worker loads its own; the EfficientNet tower took a
    minute more): its findings hold no flags, which tests/test_shards.py compares across workers."""
    inputs = [str(sample_dir / "catalog.parquet"), str(sample_dir / "spec.yaml"), str(trained_model_dir)]

    result = clipdq(cli_env, "audit", "--catalog", inputs[0], "--spec", inputs[1], "--model", inputs[2],
                    "--output", str(tmp_path / "dask"), "--workers", "2", "--rows-per-shard", "25", cwd=tmp_path)
    single = audit_catalog(*inputs, str(tmp_path / "single"), AuditOptions(rows_per_shard=25))

    run = printed_folder(result)
    dask, dask_summary, _, _ = read_run(str(run))
    one, one_summary, _, _ = read_run(single)
    assert dask_summary["options"]["workers"] == 2
    assert "LocalCluster" in result.stderr  # the shards went to a Dask cluster of its own
    assert dask_summary["shards"]["count"] >= 3 and dask_summary["shards"] == one_summary["shards"]
    assert {"image_error", "invalid_value", "match"} <= set(one["status"])  # the planted problems among them
    assert dask.select(COLUMNS).equals(one.select(COLUMNS))  # identical findings, row for row
    np.testing.assert_allclose(dask["confidence"].fill_null(-1).to_numpy(), one["confidence"].fill_null(-1).to_numpy(),
                               rtol=1e-5)
    assert dask_summary["totals"] == one_summary["totals"] and dask_summary["images"] == one_summary["images"]


# --------------------------------------------------------------------------- the bf16 backend

MARGIN = 0.01  # cosine lead of each predicted value over the next; bf16 moved the tiny model's cosines by < 0.002


def clearly_read_products(sample: Path, model: Path) -> list[str]:
    """The sample's products whose every attribute the model reads with a lead of MARGIN or more
    over the next value (fp32): bf16's rounding cannot change any of their predictions."""
    from clipdq.io import images
    from clipdq.io.sources import access_for
    from clipdq.model import scorer, towers

    spec = parse_spec((sample / "spec.yaml").read_text())
    clip = towers.load_model(str(model), device="cpu")
    catalog = pl.read_parquet(sample / "catalog.parquet")
    loaded = images.load_images(catalog["image"].to_list(), access_for(str(sample)), clip.pixels)
    embeddings = towers.embed_images(clip, loaded.pixels)
    lead = np.full(len(embeddings), np.inf)
    for values in scorer.value_embeddings_for(clip, spec).values():
        top = np.sort(embeddings @ values.T, axis=1)
        lead = np.minimum(lead, top[:, -1] - top[:, -2])
    return list(np.array(catalog["product_id"].to_list())[loaded.ok][lead >= MARGIN])


def test_a_bf16_audit_that_agrees_with_fp32_keeps_bf16_and_caches_its_embeddings_apart(
        cli_env, prefect_harness, sample_dir, trained_model_dir, tmp_path):
    data, output = tmp_path / "sample", tmp_path / "reports"
    shutil.copytree(sample_dir, data)
    kept = clearly_read_products(sample_dir, trained_model_dir)
    assert len(kept) >= 16, f"setup: only {len(kept)} products read clearly enough to force agreement"
    catalog = pl.read_parquet(sample_dir / "catalog.parquet").filter(pl.col("product_id").is_in(kept))
    catalog.write_parquet(data / "catalog.parquet")
    inputs = [str(data / "catalog.parquet"), str(data / "spec.yaml"), str(trained_model_dir)]

    fp32 = audit_catalog(*inputs, str(output))
    fp32_caches = set(storage.list_files(str(output / "_embedding_cache")))
    run = printed_folder(clipdq(cli_env, "audit", "--catalog", inputs[0], "--spec", inputs[1], "--model", inputs[2],
                                "--output", str(output), "--backend", "bf16", "--batch-size", "16", cwd=tmp_path))

    findings, summary, _, _ = read_run(str(run))
    assert summary["backend"]["requested"] == "bf16" and summary["backend"]["used"] == "bf16"
    assert summary["backend"]["agreement"] >= 0.99 and summary["backend"]["images_checked"] == 16  # the first batch
    # bf16 embeddings are kept under another key: none of fp32's is reused, every image is embedded again
    keys = {name.split("/")[0] for name in storage.list_files(str(output / "_embedding_cache"))
            if "/embeddings/" in name}
    fp32_keys = {name.split("/")[0] for name in fp32_caches if "/embeddings/" in name}
    assert len(fp32_keys) == 1 and len(keys - fp32_keys) == 1
    assert summary["images"]["from_cache"] == 0 and summary["images"]["embedded"] == catalog.height
    # the same predictions, from other arithmetic (the details quote each confidence)
    findings, reference = (frame.sort("product_id", "attribute") for frame in (findings, read_run(fp32)[0]))
    assert findings.select(COLUMNS[:-1]).equals(reference.select(COLUMNS[:-1]))
    difference = np.abs(findings["confidence"].drop_nulls().to_numpy() - reference["confidence"].drop_nulls().to_numpy())
    assert 0 < difference.max() < 0.05


# --------------------------------------------------------------------------- an image store outage

MAX_LOST = 0.045  # of the sample's 100 images: 4 may be lost to an outage, 5 may not


def outage_spec(sample: Path, folder: Path) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text((sample / "spec.yaml").read_text() + f"max_transient_image_errors: {MAX_LOST}\n")
    assert parse_spec(spec.read_text()).max_transient_image_errors == MAX_LOST
    return spec


def throttled(images: set[str]):
    """A proxy rule: every request for one of ``images`` (object keys) answered 503 SlowDown, as an
    overloaded store answers; the rest forwarded."""
    def rule(method: str, path: str, n: int) -> str | None:
        return "slowdown" if path.split("?")[0].split("/", 2)[-1] in images else None
    return rule


def audit_through(proxy: FaultyS3, cli_env, s3_bucket: str, spec: Path, model: Path, output: Path, cwd: Path):
    env = cli_env | {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}
    return clipdq(env, "audit", "--catalog", f"{s3_bucket}/sample/catalog.parquet", "--spec", str(spec),
                  "--model", str(model), "--output", str(output), cwd=cwd)


def test_an_outage_within_the_tolerated_share_is_reported_as_image_errors_and_one_past_it_fails_the_run(
        cli_env, sample_dir, trained_model_dir, s3_bucket, moto_endpoint, tmp_path):
    storage.upload_folder(sample_dir, f"{s3_bucket}/sample")
    spec = outage_spec(sample_dir, tmp_path)
    catalog = pl.read_parquet(sample_dir / "catalog.parquet")
    assert catalog.height == 100 and int(MAX_LOST * catalog.height) == 4
    readable = catalog.filter(~pl.col("product_id").is_in(broken_products(sample_dir)))
    lost = readable.head(5)
    key = {row["product_id"]: f"sample/{row['image']}" for row in lost.iter_rows(named=True)}
    tolerated, too_many = list(key)[:4], list(key)

    with FaultyS3(moto_endpoint, throttled({key[pid] for pid in tolerated})) as proxy:
        below = audit_through(proxy, cli_env, s3_bucket, spec, trained_model_dir, tmp_path / "below", tmp_path)
    with FaultyS3(moto_endpoint, throttled({key[pid] for pid in too_many})) as failing:
        above = audit_through(failing, cli_env, s3_bucket, spec, trained_model_dir, tmp_path / "above", tmp_path)

    # 4 of 100 lost: the run completes, and those products are image errors saying why
    run = printed_folder(below)
    findings, summary, _, manifest = read_run(str(run))
    assert proxy.faults["slowdown"] > 0
    assert summary["images"]["lost_to_outages"] == len(tolerated) and manifest["run_id"] == summary["run_id"]
    errors = findings.filter(pl.col("status") == "image_error")
    assert set(errors["product_id"]) == broken_products(sample_dir) | set(tolerated)
    throttled_rows = errors.filter(pl.col("product_id").is_in(tolerated))
    assert throttled_rows["product_id"].n_unique() == len(tolerated)
    assert throttled_rows["detail"].str.contains("SlowDown").all()
    assert findings["product_id"].n_unique() == catalog.height  # every product accounted for

    # 5 of 100: the run stops with one line saying why, and publishes nothing
    assert above.returncode == 1 and failing.faults["slowdown"] > 0
    reasons = reason_lines(above, "audit")
    assert len(reasons) == 1 and above.stderr.strip().splitlines()[-1] == reasons[0], above.stderr[-3000:]
    assert "ImageOutage" in reasons[0] and f"{len(too_many)} of {catalog.height} images" in reasons[0]
    assert f"max_transient_image_errors={MAX_LOST:g}" in reasons[0]
    assert "run_id=" not in above.stdout
    assert not list((tmp_path / "above").rglob("manifest.json"))
    assert not list((tmp_path / "above").rglob("findings.parquet"))
