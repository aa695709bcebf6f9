"""Complete runs under an output folder or prefix, and what changed from one to the next.

A run is complete once its ``manifest.json`` exists; runs sort by their folder names, which begin
with the date and the start time.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

from clipdq.io import storage

PROBLEMS = ("conflict", "gap", "invalid_value", "image_error")  # what a data steward acts on
CHANGES = ("new", "resolved", "persisting")
KEY = ["product_id", "attribute", "status"]  # a problem: the same finding of the same product and attribute


def complete_runs(output: str) -> list[str]:
    """Folders of the complete runs under ``output``, oldest first."""
    manifests = [name for name in storage.list_files(output, start="run_date=")
                 if name.endswith("/" + storage.MANIFEST) and "/run_id=" in name]
    return sorted(storage.join(output, name.rsplit("/", 1)[0]) for name in manifests)


def summary(folder: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(folder, "summary.json")))


def run_id_of(folder: str) -> str:
    return folder.rstrip("/").rsplit("run_id=", 1)[1]


def manifest(folder: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(folder, storage.MANIFEST)))


def find_run(output: str, run_id: str) -> str:
    for folder in complete_runs(output):
        if run_id_of(folder) == run_id:
            return folder
    raise LookupError(f"no complete run {run_id!r} under {output}")


def previous_run(output: str, catalog: str, *, before: str | None = None) -> str | None:
    """The newest complete run of ``catalog`` under ``output`` (older than the run folder ``before``), if any."""
    for folder in reversed(complete_runs(output)):
        if (before is None or folder < before) and manifest(folder).get("catalog") == catalog:
            return folder
    return None


def problems(findings: pl.LazyFrame) -> pl.LazyFrame:
    return findings.filter(pl.col("status").is_in(PROBLEMS)).select(KEY)


def read_problems(folder: str) -> pl.DataFrame:
    """The problems of a published run: its findings read through a local file, problem rows only."""
    uri = storage.join(folder, "findings.parquet")
    if not storage.is_s3(uri):
        return problems(pl.scan_parquet(uri)).collect()
    with tempfile.TemporaryDirectory(prefix="clipdq-run-") as scratch:
        local = Path(scratch, "findings.parquet")
        local.write_bytes(storage.read_bytes(uri))
        return problems(pl.scan_parquet(local)).collect()


def changed(current: pl.LazyFrame, previous: pl.DataFrame) -> pl.DataFrame:
    """Every problem of either run with its ``change``: new (only now), resolved (only before) or persisting."""
    now, before = problems(current).with_columns(now=True), previous.lazy().with_columns(before=True)
    return (now.join(before, on=KEY, how="full", coalesce=True)
            .select(*KEY, change=pl.when(pl.col("now").is_null()).then(pl.lit("resolved"))
                    .when(pl.col("before").is_null()).then(pl.lit("new")).otherwise(pl.lit("persisting")))
            .collect())


def change_counts(changes: pl.DataFrame, previous_folder: str) -> dict:
    """What ``summary.json`` says of the changes: totals and per attribute counts of each kind."""
    wide = (changes.group_by("attribute", "change").len()
            .pivot(on="change", index="attribute", values="len"))
    wide = wide.with_columns(pl.lit(0, pl.UInt32).alias(c) for c in CHANGES if c not in wide.columns)
    by_attribute = wide.select("attribute", *CHANGES).fill_null(0).sort("attribute")
    return {"previous_run": run_id_of(previous_folder),
            "totals": {c: int(by_attribute[c].sum()) for c in CHANGES},
            "by_attribute": by_attribute.to_dicts()}
