"""What the CLI prints of runs: a run's summary and the change between two runs, as plain text."""

from __future__ import annotations

import polars as pl

from clipdq.checks.schemas import STATUSES
from clipdq.io import storage
from clipdq.reporting import runs


def text(summary: dict, folder: str) -> str:
    """A run's summary for a terminal: totals, per attribute counts, and the change since the run before."""
    t = summary["totals"]
    lines = [
        f"run {summary['run_id']} ({summary['started_at']}): {summary['products']} products of {summary['catalog']}",
        f"  {t['conflict']} conflicts, {t['gap']} gaps, {t['invalid_value']} invalid values, "
        f"{t['image_error']} image errors, {t['uncertain']} uncertain, {t['match']} matches",
        _text_table(summary["by_attribute"], ["attribute", *STATUSES]),
    ]
    duplicates = summary.get("duplicates")
    if duplicates and duplicates["checked"]:
        crops = f", {duplicates['crops']} of them crops of another's image" if duplicates.get("crops") else ""
        lines.append(
            f"  {duplicates['products']} products in {duplicates['groups']} groups of duplicate listings"
            f"{crops} (duplicates.parquet)"
        )
    text = summary.get("text_agreement")
    if text and text["checked"]:
        few = (
            f"; judged against validation's typical agreement, {text['catalog_rows']} scored rows being too few "
            f"to judge this catalog's"
            if text.get("against") == "validation"
            else ""
        )
        lines.append(
            f"  {text['flagged']} images may not show the product their {text['column']} names "
            f"(attribute {text['column']!r}, status conflict{few})"
        )
    changes = summary.get("changes")
    if changes:
        c = changes["totals"]
        lines.append(
            f"since run {changes['previous_run']}: {c['new']} new, {c['resolved']} resolved, "
            f"{c['persisting']} persisting problems"
        )
    lines += [f"warning: {w}" for w in summary["warnings"]] + [f"report: {storage.join(folder, 'report.html')}"]
    return "\n".join(lines)


def diff_text(changes: pl.DataFrame, older: str, newer: str, *, listed: int = 20) -> str:
    """What changed between two runs: counts per attribute, then the first new and resolved problems."""
    counts = runs.change_counts(changes, older)
    assert counts is not None  # both runs are given
    lines = [
        f"run {runs.run_id_of(newer)} against run {runs.run_id_of(older)}: {counts['totals']['new']} new, "
        f"{counts['totals']['resolved']} resolved, {counts['totals']['persisting']} persisting problems",
        _text_table(counts["by_attribute"], ["attribute", "new", "resolved", "persisting"]),
    ]
    for kind in ("new", "resolved"):
        part = changes.filter(pl.col("change") == kind).sort("attribute", "product_id")
        lines += [f"{kind}: {pid} {attribute} {status}" for pid, attribute, status, _ in part.head(listed).rows()]
        if part.height > listed:
            lines.append(f"{kind}: ... and {part.height - listed} more")
    return "\n".join(lines)


def _text_table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  " + "  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
    lines += ["  " + "  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)
