"""What a run tells Prefect: its log line, artifacts (counts, top problems, a summary, a link to the
report) and, for an audit, an event that automations can act on (alert on conflicts, on new problems)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from clipdq.io import storage
from clipdq.reporting import report

TOP_PROBLEMS = 25  # problems in an audit's table artifact
WEAKEST_MATCHES = 25  # queries in a match run's table artifact


def announce_audit(summary: dict, folder: str, top: pl.DataFrame) -> None:
    """An audit's log line, artifacts and event (its totals and changes)."""
    run_id, html, t = summary["run_id"], storage.join(folder, "report.html"), summary["totals"]
    get_run_logger().info(
        "%d conflicts, %d gaps, %d invalid values, %d image errors, %d duplicate listings; report: %s",
        t["conflict"],
        t["gap"],
        t["invalid_value"],
        t["image_error"],
        summary["duplicates"].get("products", 0),
        html,
    )
    create_table_artifact(
        key="clipdq-audit-counts", table=summary["by_attribute"], description=f"Findings per attribute, run {run_id}"
    )
    table = top.drop("detail").with_columns(pl.col("confidence").round(3)).to_dicts()
    create_table_artifact(
        key="clipdq-top-problems", table=table, description=f"The {len(top)} most confident problems, run {run_id}"
    )
    create_markdown_artifact(
        key="clipdq-audit-report",
        markdown=report.markdown(summary, folder),
        description="Where the audit report is and what it found",
    )
    create_link_artifact(
        key="clipdq-report-link",
        link=html if storage.is_s3(html) else Path(html).resolve().as_uri(),
        link_text=f"report of run {run_id}",
    )
    changes = summary["changes"]
    emit_event(
        event="clipdq.audit.completed",
        resource={"prefect.resource.id": f"clipdq.audit.{run_id}", "prefect.resource.name": summary["catalog"]},
        payload={"totals": summary["totals"], "changes": changes and changes["totals"], "report": html},
    )


def announce_match(summary: dict, folder: str, matches: pl.DataFrame) -> None:
    """A match run's log line and artifacts: what it found, and its weakest best matches."""
    excluded, acc = summary["same_image_excluded"], summary["accuracy"]
    line = (
        f"{summary['queries']} queries matched against {summary['references']} references; "
        f"{excluded['pairs']} same-image pairs left out ({excluded['queries']} queries)"
    )
    if acc:
        line += f"; top-1 {acc['top_1']:.3f}, top-5 {acc['top_5']:.3f} over {acc['labeled_queries']} labeled queries"
    get_run_logger().info("%s; matches: %s", line, storage.join(folder, "matches.parquet"))
    create_markdown_artifact(
        key="clipdq-match-report",
        markdown=f"{line}.\n\nRun folder: `{folder}`",
        description="What product matching found",
    )
    best = (
        matches.filter(pl.col("rank") == 1).sort("score").head(WEAKEST_MATCHES).with_columns(pl.col("score").round(3))
    )
    create_table_artifact(
        key="clipdq-weakest-matches",
        table=best.drop("rank", "detail").to_dicts(),
        description=f"The {WEAKEST_MATCHES} queries whose best match is weakest, run {summary['run_id']}",
    )
