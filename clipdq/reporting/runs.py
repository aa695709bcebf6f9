"""Runs under an output folder or prefix: publishing one, finding the complete ones, and what
changed from one to the next.

A run is complete once its ``manifest.json`` exists (written last by ``publish``); runs sort by
their folder names, which begin with the date and the start time.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path

import polars as pl

from clipdq.io import storage

PROBLEMS = ("conflict", "gap", "invalid_value", "image_error")  # what a data steward acts on
CHANGES = ("new", "resolved", "persisting")
KEY = ["product_id", "attribute", "status"]  # a problem: the same finding of the same product and attribute

log = logging.getLogger(__name__)


def publish(folder: str, summary: dict, files: dict[str, bytes | pl.DataFrame], *, meta: dict) -> str:
    """A run's ``files`` (frames as Parquet) and its ``summary.json``, then the manifest, which
    names the run (``meta``, the summary's run_id) and lists every file with its digest, written
    last (``storage.publish``): a crash before it leaves no run that looks complete. Returns the
    manifest's URI."""
    data = {name: _parquet(value) if isinstance(value, pl.DataFrame) else value for name, value in files.items()}
    data["summary.json"] = json.dumps(summary, indent=2, default=str).encode()
    return storage.publish(folder, data, meta={"run_id": summary["run_id"], **meta})


def _parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def complete_runs(output: str) -> list[str]:
    """Folders of the complete runs under ``output``, oldest first."""
    manifests = [
        name
        for name in storage.list_files(output, start="run_date=")
        if name.endswith("/" + storage.MANIFEST) and "/run_id=" in name
    ]
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
    return (
        now.join(before, on=KEY, how="full", coalesce=True)
        .select(
            *KEY,
            change=pl.when(pl.col("now").is_null())
            .then(pl.lit("resolved"))
            .when(pl.col("before").is_null())
            .then(pl.lit("new"))
            .otherwise(pl.lit("persisting")),
        )
        .collect()
    )


def change_counts(changes: pl.DataFrame | None, previous_folder: str | None) -> dict | None:
    """What ``summary.json`` says of the changes: totals and per attribute counts of each kind; None
    without a previous run."""
    if changes is None or previous_folder is None:
        return None
    wide = changes.group_by("attribute", "change").len().pivot(on="change", index="attribute", values="len")
    wide = wide.with_columns(pl.lit(0, pl.UInt32).alias(c) for c in CHANGES if c not in wide.columns)
    by_attribute = wide.select("attribute", *CHANGES).fill_null(0).sort("attribute")
    return {
        "previous_run": run_id_of(previous_folder),
        "totals": {c: int(by_attribute[c].sum()) for c in CHANGES},
        "by_attribute": by_attribute.to_dicts(),
    }


def changes_since_previous(output: str, catalog: str, findings: pl.LazyFrame) -> tuple[str | None, pl.DataFrame | None]:
    """(the previous complete run of ``catalog`` under ``output``, every problem's change since it),
    or (None, None) for a first run, or where that run's findings cannot be read: the audit goes on,
    and says so."""
    previous = previous_run(output, catalog)
    if previous is None:
        return None, None
    try:
        return previous, changed(findings, read_problems(previous))
    except (OSError, pl.exceptions.PolarsError) as error:
        log.warning("cannot compare with the previous run %s (%s): no changes reported", previous, error)
        return None, None


def kept_duplicates(
    previous: str | None, images_key: str | None, threshold: float | None
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """(the duplicate listings of the run ``previous`` where it found them among the same images
    (``images_key``: a rerun of an unchanged catalog), its search (DUPLICATE_SEARCH_SCHEMA) where it
    searched at ``threshold``), None for each that cannot be kept."""
    if previous is None or images_key is None:
        return None, None
    try:
        found = summary(previous).get("duplicates") or {}
        if found.get("similarity_threshold") != threshold:
            return None, None
        search = _read_table(previous, "duplicate_search.parquet")
        listings = _read_table(previous, "duplicates.parquet") if found.get("images_key") == images_key else None
    except (OSError, ValueError, pl.exceptions.PolarsError) as error:
        log.warning("cannot reuse the duplicate search of %s (%s): searching afresh", previous, error)
        return None, None
    log.info(
        "duplicate listings: the search of run %s kept (%s)",
        run_id_of(previous),
        "whole" if listings is not None else "its links",
    )
    return listings, search


def _read_table(folder: str, name: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(folder, name))))
