"""The audit in shards: the plan, a shard's rows, and a run killed mid-way (SIGKILL) that resumes
from its finished shards (a real 2-worker Dask cluster: tests/test_end_to_end.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from test_cli import last_line
from test_flow import read_run

from clipdq.core.options import AuditOptions
from clipdq.io import catalog
from clipdq.io.images import SIGNATURE_BYTES
from clipdq.pipeline import embedding, shards, state
from flows.audit import audit_catalog

COLUMNS = ["product_id", "attribute", "existing_value", "predicted_value", "status", "detail"]


@pytest.mark.parametrize(
    ("groups", "per_shard", "expected"),
    [
        ([10, 10, 10], 25, [(0, 20), (20, 30)]),
        ([10, 10, 10], 10, [(0, 10), (10, 20), (20, 30)]),
        ([100], 30, [(0, 30), (30, 60), (60, 90), (90, 100)]),  # one large row group, cut into ranges
        ([5, 70, 5], 30, [(0, 5), (5, 35), (35, 65), (65, 75), (75, 80)]),
        ([], 30, []),
    ],
)
def test_shards_follow_row_groups_and_cover_every_row_once(groups, per_shard, expected):
    plan = shards.plan(groups, rows_per_shard=per_shard)
    assert [(s.start, s.stop) for s in plan] == expected
    assert [s.index for s in plan] == list(range(len(plan)))


def test_a_shard_reads_exactly_its_rows(tmp_path):
    frame = pl.DataFrame({"product_id": [f"p{i}" for i in range(50)]})
    pq.write_table(frame.to_arrow(), tmp_path / "c.parquet", row_group_size=7)
    source = catalog.CatalogFile(str(tmp_path / "c.parquet"))

    for shard in shards.plan(source.group_rows, rows_per_shard=12):
        rows = pl.concat(list(source.batches_between(shard.start, shard.stop, 4)))
        assert rows["product_id"].to_list() == [f"p{i}" for i in range(shard.start, shard.stop)]
    assert max(b.height for b in source.batches_between(3, 40, 4)) <= 4


def test_the_images_of_every_shard_are_read_back_with_their_signatures_from_one_file(tmp_path):
    rng = np.random.default_rng(0)
    results, written = [], []
    for index, rows in enumerate((3, 0, 2)):  # a shard whose images all failed writes an empty part
        frame = pl.DataFrame(
            {
                "product_id": [f"p{index}-{i}" for i in range(rows)],
                "sha256": [f"d{index}-{i}" for i in range(rows)],
                "signature": [rng.integers(0, 256, SIGNATURE_BYTES, np.uint8).tobytes() for _ in range(rows)],
            },
            schema=embedding.IMAGES_SCHEMA,
        )
        kept = None
        if index == 2:  # its state keeps the signatures: the part leaves them null
            kept = str(tmp_path / "state")
            kept_rows = pl.concat([pl.DataFrame(schema=state.STATE_SCHEMA), frame], how="diagonal")
            state.Parts.of(kept).write(kept_rows, base=True)
        part = frame.with_columns(signature=None) if kept else frame
        shards.write_parquet(str(tmp_path / f"images-{index}.parquet"), part.to_arrow())
        results.append(shards.ShardResult(index, "", str(tmp_path / f"images-{index}.parquet"), "", {}, False, kept))
        written.append(frame)

    images, signatures = shards.read_images(results), shards.write_signatures(results, str(tmp_path / "signatures"))

    everything = pl.concat(written)
    assert images.equals(everything.drop("signature"))
    assert signatures.shape == (5, SIGNATURE_BYTES)  # read from the file as they are asked for
    assert np.array_equal(signatures[:], embedding.signature_rows(everything))
    assert np.array_equal(signatures[[4, 0]], embedding.signature_rows(everything)[[4, 0]])
    with pytest.raises(IndexError):
        signatures[[5]]
    none = shards.write_signatures(results[1:2], str(tmp_path / "none"))
    assert none.shape == (0, SIGNATURE_BYTES) and none[:].shape == (0, SIGNATURE_BYTES)


def test_a_catalog_rewritten_since_the_run_began_is_refused(tmp_path):
    path = tmp_path / "c.parquet"
    pl.DataFrame({"product_id": ["a"]}).write_parquet(path)
    version = catalog.CatalogFile(str(path)).version
    time.sleep(0.01)
    pl.DataFrame({"product_id": ["a", "b"]}).write_parquet(path)

    with pytest.raises(catalog.CatalogError, match="changed since the run began"):
        catalog.CatalogFile(str(path), version=version)


def sharded_sample(sample_dir: Path, folder: Path, *, rows_per_group: int) -> Path:
    """The sample catalog rewritten with small row groups, beside a copy of its images."""
    shutil.copytree(sample_dir, folder, ignore=shutil.ignore_patterns("*.parquet", "model"))
    shutil.copy(sample_dir / "ground_truth.parquet", folder)
    pq.write_table(
        pl.read_parquet(sample_dir / "catalog.parquet").to_arrow(),
        folder / "catalog.parquet",
        row_group_size=rows_per_group,
    )
    return folder


def test_a_killed_audit_resumes_from_its_finished_shards(
    cli_env,
    prefect_harness,
    sample_dir,
    flagging_model_dir,  # noqa: F811
    tmp_path,
):
    data = sharded_sample(sample_dir, tmp_path / "sample", rows_per_group=10)
    inputs = str(data / "catalog.parquet"), str(data / "spec.yaml"), str(flagging_model_dir)
    command = [
        sys.executable,
        "-m",
        "clipdq.cli",
        "audit",
        "--catalog",
        inputs[0],
        "--spec",
        inputs[1],
        "--model",
        inputs[2],
        "--rows-per-shard",
        "10",
    ]
    output = tmp_path / "out"
    run = subprocess.Popen(
        [*command, "--output", str(output)],
        env=cli_env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(list((output / "_shards").glob("*/shard-*.parquet"))) < 3 and time.monotonic() < deadline:
            assert run.poll() is None, "the audit ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the audit and the Prefect server it started
        run.wait()
    finished = len(list((output / "_shards").glob("*/shard-*.parquet")))
    assert 3 <= finished < 10 and not list(output.rglob("manifest.json"))

    resumed = subprocess.run(
        [*command, "--output", str(output)], env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    fresh = audit_catalog(
        *inputs, str(tmp_path / "fresh"), AuditOptions(rows_per_shard=10)
    )  # in this process: no third server to start

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    findings, summary, _, _ = read_run(last_line(resumed.stdout))
    assert summary["shards"] == {"count": 10, "rows_per_shard": 10, "reused": finished}
    assert findings.select(COLUMNS).equals(read_run(fresh)[0].select(COLUMNS))
    assert findings.select("product_id", "attribute").is_unique().all()
    assert len(list(output.rglob("manifest.json"))) == 1
    assert json.loads(next(output.rglob("manifest.json")).read_text())["shards"]["reused"] == finished
    assert not list((output / "_shards").rglob("*.parquet"))  # published: the parts are gone


def test_an_unchanged_rerun_never_loads_the_model(
    prefect_harness, sample_dir, flagging_model_dir, tmp_path, monkeypatch
):
    from clipdq.model import scorer, towers

    loads = []
    real = towers.load_model
    monkeypatch.setattr(towers, "load_model", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    args = (
        str(sample_dir / "catalog.parquet"),
        str(sample_dir / "spec.yaml"),
        str(flagging_model_dir),
        str(tmp_path / "out"),
    )
    runs = []
    for _ in range(2):
        scorer._load.cache_clear()  # as in a new process
        shards.scorer_for.cache_clear()
        runs.append((audit_catalog(*args), len(loads)))

    (first, loaded_first), (again, loaded_again) = runs
    assert loaded_first == 1 and loaded_again == 1  # the rerun found every embedding, and the text side, kept
    assert read_run(again)[1]["images"]["embedded"] == 0
    assert read_run(first)[0].select(COLUMNS).equals(read_run(again)[0].select(COLUMNS))
