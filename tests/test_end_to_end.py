"""Whole runs of the ``clipdq`` console script on generated catalogs with planted problems: a
category tree fine-tuned and audited, shards on a local Dask cluster, the bf16 backend kept where it
agrees with fp32, and images lost to an outage just within and just past what the spec tolerates.

Each test plants what it expects to find and reads only what the commands write (findings,
suggested fixes, summary, manifest, the model's clipdq.json), so the library's internals may move.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_flow import read_run

from clipdq.core.options import AuditOptions
from clipdq.core.spec import parse_spec
from flows.audit import audit_catalog

pytestmark = pytest.mark.subprocess

COLUMNS = ["product_id", "attribute", "existing_value", "predicted_value", "status", "detail"]


@pytest.fixture(scope="module")
def console_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The inherited environment with a private Prefect home and no Prefect API: each command
    starts Prefect's temporary server, as on a machine where none is configured."""
    home = tmp_path_factory.mktemp("console-prefect")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    return env | {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def clipdq(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipdq.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def printed_folder(result: subprocess.CompletedProcess | None) -> Path:
    """The folder a command printed as its last line, once it succeeded."""
    assert result is not None, "the command this one needed failed"
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def reason_lines(result: subprocess.CompletedProcess, command: str) -> list[str]:
    """The lines of stderr that give a failed command's reason."""
    return [line for line in result.stderr.splitlines() if line.startswith(f"clipdq {command}: error: ")]


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
def tree_run(console_env, flagging_labeled_dir, sample_dir, tmp_path_factory) -> dict:
    """``clipdq finetune`` of the pretrained EfficientNet-Lite0 tower (locked mode) on generated
    labeled products whose one path column holds the tree, then ``clipdq audit`` of the sample's
    catalog with wrong paths planted (about 3 minutes on 2 busy cores)."""
    folder = tmp_path_factory.mktemp("tree")
    (folder / "labeled").mkdir()
    shutil.copytree(flagging_labeled_dir / "images", folder / "labeled" / "images")
    labeled = pl.read_parquet(flagging_labeled_dir / "labeled.parquet").head(TREE_LABELED)
    labeled.select(
        "product_id",
        "image",
        pl.struct("product_type", "sleeve_length", "has_lid")
        .map_elements(lambda row: true_path(**row), return_dtype=pl.String)
        .alias("category"),
    ).write_parquet(folder / "labeled" / "labeled.parquet")
    (folder / "spec.yaml").write_text(TREE_SPEC)
    finetune = clipdq(
        console_env,
        "finetune",
        "--catalog",
        str(folder / "labeled" / "labeled.parquet"),
        "--spec",
        str(folder / "spec.yaml"),
        "--arch",
        "efficientnet-lite0",
        "--mode",
        "locked",
        "--views",
        "1",
        "--epochs",
        "10",
        "--val-fraction",
        "0.5",
        "--test-fraction",
        "0",
        "--output",
        str(folder / "model"),
        cwd=folder,
    )
    planted = planted_tree_catalog(sample_dir, folder / "catalog")
    audit = (
        clipdq(
            console_env,
            "audit",
            "--catalog",
            str(folder / "catalog" / "catalog.parquet"),
            "--spec",
            str(folder / "spec.yaml"),
            "--model",
            str(folder / "model"),
            "--output",
            str(folder / "reports"),
            cwd=folder,
        )
        if finetune.returncode == 0
        else None
    )
    return {"finetune": finetune, "model": folder / "model", "audit": audit, "planted": planted}


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
    planted = (
        {pid: "wrong kind" for pid in readable[:12]}
        | {pid: "wrong part" for pid in readable[12:24]}
        | {pid: "kind only" for pid in readable[24:30]}
        | {pid: "no path" for pid in readable[30:34]}
    )
    rng, out = random.Random(1), []
    for row in rows:
        path = true_path(row["product_type"], row.get("sleeve_length"), row.get("has_lid"))
        kind = path.split("/")[0]
        what = planted.get(row["product_id"], "none")
        if what == "wrong kind":
            written = rng.choice([other for other in TREE_PATHS if not other.startswith(kind + "/")])
        elif what == "wrong part":
            written = rng.choice([other for other in TREE_PATHS if other.startswith(kind + "/") and other != path])
        else:
            written = {"kind only": kind, "no path": None, "none": path}[what]
        out.append(
            {
                "product_id": row["product_id"],
                "image": row["image"],
                "category": written,
                "true_path": path,
                "planted": what,
            }
        )
    frame = pl.DataFrame(out)
    shutil.copytree(sample / "images", folder / "images")
    frame.select("product_id", "image", "category").write_parquet(folder / "catalog.parquet")
    return frame


def test_clipdq_finetune_gives_each_level_of_a_tree_thresholds_that_can_flag(tree_run):
    assert printed_folder(tree_run["finetune"]) == tree_run["model"]
    calibration = json.loads((tree_run["model"] / "clipdq.json").read_text())["calibration"]

    assert set(calibration) == {"kind", "part"}  # one calibration per level
    for level in ("kind", "part"):  # each level can flag: else the audit below would prove nothing
        assert calibration[level]["conflict_threshold"] is not None, calibration
        assert calibration[level]["gap_threshold"] is not None, calibration
        assert 0.9 <= calibration[level]["conflict_threshold"] <= 1.0  # at least the spec's target precision
        assert calibration[level]["conflict_rows"] > 0


def test_clipdq_audit_reports_a_wrong_path_once_at_its_highest_wrong_level_and_fixes_the_path(tree_run):
    run, planted = printed_folder(tree_run["audit"]), tree_run["planted"]
    findings = pl.read_parquet(run / "findings.parquet")
    assert (run / "manifest.json").is_file()
    assert findings.height == 2 * planted.height  # every product, at both levels
    status = {(r["product_id"], r["attribute"]): r["status"] for r in findings.iter_rows(named=True)}
    detail = {(r["product_id"], r["attribute"]): r["detail"] for r in findings.iter_rows(named=True)}
    of = {what: planted.filter(pl.col("planted") == what).rows(named=True) for what in planted["planted"].unique()}

    # a wrong kind is a conflict at the kind, naming both paths, and is not reported again below it
    found = [row for row in of["wrong kind"] if status[(row["product_id"], "kind")] == "conflict"]
    assert len(found) >= 0.9 * len(of["wrong kind"]), f"{len(found)} of {len(of['wrong kind'])} wrong kinds found"
    for row in found:
        assert row["category"] in detail[(row["product_id"], "kind")]
        assert row["true_path"] in detail[(row["product_id"], "kind")]
        assert status[(row["product_id"], "part")] not in ("conflict", "match")
    # the part below a conflict: parent_conflict, and only there (see test_tree_fixes.py for the levels that miss it)
    below = {pid for (pid, level), s in status.items() if s == "parent_conflict"}
    assert below and below <= {row["product_id"] for row in found}
    assert {level for (pid, level), s in status.items() if s == "parent_conflict"} == {"part"}
    # a wrong part under the right kind is a conflict at the part only
    assert {status[(row["product_id"], "kind")] for row in of["wrong part"]} == {"match"}
    parts = [status[(row["product_id"], "part")] for row in of["wrong part"]]
    assert parts.count("conflict") >= 0.75 * len(parts) and "parent_conflict" not in parts
    # no right path is flagged
    right = {row["product_id"] for row in of["none"]}
    assert not {pid for (pid, _), s in status.items() if pid in right and s in ("conflict", "parent_conflict")}
    # a path that stops at the kind gets the image's part as a gap
    assert {status[(row["product_id"], "kind")] for row in of["kind only"]} == {"match"}
    assert [status[(row["product_id"], "part")] for row in of["kind only"]].count("gap") >= 0.75 * len(of["kind only"])

    # the suggested fixes of a parent_conflict set the whole path: a row per level, together the true path
    fixes = pl.read_parquet(run / "suggested_fixes.parquet")
    by_product = {
        pid: dict(group.select("attribute", "suggested_value").rows()) for (pid,), group in fixes.group_by("product_id")
    }
    true = dict(planted.select("product_id", "true_path").rows())
    for pid in below:
        assert "/".join(by_product[pid][level] for level in ("kind", "part")) == true[pid]
    assert dict(fixes.group_by("status").len().rows()).get("parent_conflict") == len(below)
    gaps = [row["product_id"] for row in of["kind only"] if status[(row["product_id"], "part")] == "gap"]
    assert gaps and all(true[pid].endswith("/" + by_product[pid]["part"]) for pid in gaps)
    # no path at all: the kind the image plainly shows is suggested
    assert {status[(row["product_id"], "kind")] for row in of["no path"]} == {"gap"}
    assert all(by_product[row["product_id"]]["kind"] == row["true_path"].split("/")[0] for row in of["no path"])


# --------------------------------------------------------------------------- shards on a local Dask cluster


def test_two_dask_workers_started_by_the_cli_give_the_findings_of_one_process_row_for_row(
    console_env, prefect_harness, sample_dir, trained_model_dir, tmp_path
):
    """The tiny model keeps this quick (each worker loads its own; the EfficientNet tower took a
    minute more). A rerun through the cluster reuses every usable row's findings from the shards' states."""
    inputs = [str(sample_dir / "catalog.parquet"), str(sample_dir / "spec.yaml"), str(trained_model_dir)]

    command = ["audit", "--catalog", inputs[0], "--spec", inputs[1], "--model", inputs[2], "--output"]
    command += [str(tmp_path / "dask"), "--workers", "2", "--rows-per-shard", "25"]
    result = clipdq(console_env, *command, cwd=tmp_path)
    single = audit_catalog(*inputs, str(tmp_path / "single"), AuditOptions(rows_per_shard=25))

    run = printed_folder(result)
    dask, dask_summary, _, _ = read_run(str(run))
    one, one_summary, _, _ = read_run(single)
    assert dask_summary["options"]["workers"] == 2
    assert "LocalCluster" in result.stderr  # the shards went to a Dask cluster of its own
    assert dask_summary["shards"]["count"] >= 3 and dask_summary["shards"] == one_summary["shards"]
    assert {"image_error", "invalid_value", "match"} <= set(one["status"])  # the planted problems among them
    assert dask.select(COLUMNS).equals(one.select(COLUMNS))  # identical findings, row for row
    np.testing.assert_allclose(
        dask["confidence"].fill_null(-1).to_numpy(), one["confidence"].fill_null(-1).to_numpy(), rtol=1e-5
    )
    assert dask_summary["totals"] == one_summary["totals"] and dask_summary["images"] == one_summary["images"]

    # the next night on the same cluster size: each worker reads its shards' states, nothing is embedded
    again = clipdq(console_env, *command, cwd=tmp_path)
    rerun, rerun_summary, _, _ = read_run(str(printed_folder(again)))
    assert rerun.equals(dask)
    usable = dask_summary["images"]["embedded"]
    assert rerun_summary["images"]["reused"] == usable and rerun_summary["images"]["embedded"] == 0


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


def embedding_caches(output: Path) -> set[str]:
    """The keys (folder names) under an output's embedding cache that hold embeddings."""
    return {folder.name for folder in (output / "_embedding_cache").iterdir() if (folder / "embeddings").is_dir()}


def test_a_bf16_audit_that_agrees_with_fp32_keeps_bf16_and_caches_its_embeddings_apart(
    console_env, prefect_harness, sample_dir, trained_model_dir, tmp_path
):
    data, output = tmp_path / "sample", tmp_path / "reports"
    shutil.copytree(sample_dir, data)
    kept = clearly_read_products(sample_dir, trained_model_dir)
    assert len(kept) >= 16, f"setup: only {len(kept)} products read clearly enough to force agreement"
    catalog = pl.read_parquet(sample_dir / "catalog.parquet").filter(pl.col("product_id").is_in(kept))
    catalog.write_parquet(data / "catalog.parquet")
    inputs = [str(data / "catalog.parquet"), str(data / "spec.yaml"), str(trained_model_dir)]

    fp32 = audit_catalog(*inputs, str(output))
    fp32_keys = embedding_caches(output)
    run = printed_folder(
        clipdq(
            console_env,
            "audit",
            "--catalog",
            inputs[0],
            "--spec",
            inputs[1],
            "--model",
            inputs[2],
            "--output",
            str(output),
            "--backend",
            "bf16",
            "--batch-size",
            "16",
            cwd=tmp_path,
        )
    )

    findings, summary, _, _ = read_run(str(run))
    assert summary["backend"]["requested"] == "bf16" and summary["backend"]["used"] == "bf16"
    assert summary["backend"]["agreement"] >= 0.99 and summary["backend"]["images_checked"] == 16  # the first batch
    # bf16 embeddings are kept under another key: none of fp32's is reused, every image is embedded again
    assert len(fp32_keys) == 1 and len(embedding_caches(output) - fp32_keys) == 1
    assert summary["images"]["from_cache"] == 0 and summary["images"]["embedded"] == catalog.height
    # the same predictions, from other arithmetic (the details quote each confidence)
    findings, reference = (frame.sort("product_id", "attribute") for frame in (findings, read_run(fp32)[0]))
    assert findings.select(COLUMNS[:-1]).equals(reference.select(COLUMNS[:-1]))
    difference = np.abs(
        findings["confidence"].fill_null(0).to_numpy() - reference["confidence"].fill_null(0).to_numpy()
    )
    assert 0 < difference.max() < 0.05


# --------------------------------------------------------------------------- an outage of the images

MAX_LOST = 0.035  # of the sample's 100 images: 3 may be lost to an outage, 4 may not
UNREACHABLE = "http://images.invalid"  # a host no resolver knows (RFC 2606): a fetch fails at once, as in an outage


def with_lost_images(sample: Path, folder: Path, lost: list[str]) -> tuple[Path, Path]:
    """A copy of the sample whose ``lost`` products' images sit on a host that cannot be reached,
    with a spec that fetches image URLs and tolerates MAX_LOST of the images lost: (catalog, spec)."""
    shutil.copytree(sample, folder)
    catalog = pl.read_parquet(sample / "catalog.parquet")
    moved = pl.when(pl.col("product_id").is_in(lost)).then(pl.format(UNREACHABLE + "/{}.jpg", "product_id"))
    catalog.with_columns(moved.otherwise(pl.col("image")).alias("image")).write_parquet(folder / "catalog.parquet")
    spec = folder / "spec.yaml"
    spec.write_text(spec.read_text() + f"allow_image_urls: true\nmax_transient_image_errors: {MAX_LOST}\n")
    assert parse_spec(spec.read_text()).max_transient_image_errors == MAX_LOST
    return folder / "catalog.parquet", spec


def test_an_outage_within_the_tolerated_share_is_reported_as_image_errors_and_one_past_it_fails_the_run(
    console_env, prefect_harness, sample_dir, trained_model_dir, tmp_path
):
    """Image reads fail for a reason that may pass (the image host does not resolve), not because
    of the data: a few are findings, more than the spec's max_transient_image_errors an outage."""
    products = pl.read_parquet(sample_dir / "catalog.parquet")["product_id"]
    tolerated = int(MAX_LOST * len(products))
    assert (len(products), tolerated) == (100, 3)
    readable = [pid for pid in products if pid not in broken_products(sample_dir)]
    within, past = readable[:tolerated], readable[: tolerated + 1]
    below = with_lost_images(sample_dir, tmp_path / "within", within)
    above = with_lost_images(sample_dir, tmp_path / "past", past)

    completed = audit_catalog(*map(str, below), str(trained_model_dir), str(tmp_path / "within" / "reports"))
    failed = clipdq(
        console_env,
        "audit",
        "--catalog",
        str(above[0]),
        "--spec",
        str(above[1]),
        "--model",
        str(trained_model_dir),
        "--output",
        str(tmp_path / "past" / "reports"),
        cwd=tmp_path,
    )

    # within the share: the run completes, and the products whose image was lost are image errors saying why
    findings, summary, _, manifest = read_run(completed)
    assert summary["images"]["lost_to_outages"] == len(within) and manifest["run_id"] == summary["run_id"]
    errors = findings.filter(pl.col("status") == "image_error")
    assert set(errors["product_id"]) == broken_products(sample_dir) | set(within)
    assert errors.filter(pl.col("product_id").is_in(within))["detail"].str.contains("images.invalid").all()
    assert findings["product_id"].n_unique() == len(products)  # every product accounted for

    # one image past it: the run stops with one line saying why, and publishes nothing
    assert failed.returncode == 1, failed.stderr[-3000:]
    reasons = reason_lines(failed, "audit")
    assert len(reasons) == 1 and failed.stderr.strip().splitlines()[-1] == reasons[0], failed.stderr[-3000:]
    assert "ImageOutage" in reasons[0] and f"{len(past)} of {len(products)} images" in reasons[0]
    assert f"max_transient_image_errors={MAX_LOST:g}" in reasons[0]
    assert "run_id=" not in failed.stdout
    assert not list((tmp_path / "past" / "reports").rglob("manifest.json"))
    assert not list((tmp_path / "past" / "reports").rglob("findings.parquet"))
