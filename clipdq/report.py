"""Findings in; summary JSON, an HTML report and a published run folder out."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from datetime import datetime, timezone

import jinja2
import polars as pl

from clipdq import storage
from clipdq.compare import NOT_APPLICABLE, STATUSES

TOP_N = 12  # findings shown with thumbnails, per section
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("clipdq", "templates"), autoescape=True)


def new_run(output: str, *, now: datetime | None = None) -> tuple[str, str]:
    """(run_id, run folder) as ``<output>/run_date=YYYY-MM-DD/run_id=<id>``."""
    now = now or datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    return run_id, storage.join(output, f"run_date={now:%Y-%m-%d}", f"run_id={run_id}")


Findings = pl.DataFrame | pl.LazyFrame  # a run's findings, in memory or scanned from its file


def counts(findings: Findings) -> pl.DataFrame:
    """One row per attribute, one column per status, zeros included."""
    per_status = (findings.lazy().filter(pl.col("attribute").is_not_null())  # not_applicable rows name none
                  .group_by("attribute", "status").len().collect())
    wide = per_status.pivot(on="status", index="attribute", values="len")
    missing = [pl.lit(0, pl.UInt32).alias(s) for s in STATUSES if s not in wide.columns]
    return wide.with_columns(missing).select("attribute", *STATUSES).fill_null(0).sort("attribute")


def summarize(findings: Findings, *, products: int, run: dict, validation: dict, reported: int | None = None) -> dict:
    """Summary JSON: what was checked, with what, and how many findings of each kind.

    ``reported``: the products in ``findings`` where the caller has counted them (an audit in
    shards counts them part by part: a distinct count here would hold every id at once).
    """
    by_attribute = counts(findings)
    products_in = pl.col("product_id").n_unique() if reported is None else pl.lit(reported)
    rows, not_applicable, reported = findings.lazy().select(
        pl.len(), (pl.col("status") == NOT_APPLICABLE).sum(), products_in).collect().row(0)
    warnings = list(validation.get("warnings", []))
    if not_applicable:
        warnings.append(f"{not_applicable} products have no attribute that applies to them (applies_to)")
    if reported < products:  # compare reports every product: fewer means rows were lost on the way
        warnings.append(f"{products - reported} products are missing from the findings")
    return {
        **run,
        "products": products,
        "products_reported": reported,
        "findings": rows,
        "totals": {s: int(by_attribute[s].sum()) for s in STATUSES} | {NOT_APPLICABLE: not_applicable},
        "by_attribute": by_attribute.to_dicts(),
        "warnings": warnings,
        "expectations": validation.get("expectations", []),
        "expectations_reused": bool(validation.get("reused")),  # kept from an earlier run of the same keys
    }


def top_findings(findings: Findings, status: str, n: int = TOP_N) -> pl.DataFrame:
    """The most confident findings of a status, taking attributes in turn so each is shown."""
    return (
        findings.lazy().filter(pl.col("status") == status)
        .sort("confidence", descending=True, nulls_last=True)
        .with_columns(pl.int_range(pl.len()).over("attribute").alias("turn"))
        .sort("turn", maintain_order=True)
        .head(n)
        .drop("turn")
        .collect()
    )


SECTIONS = {  # status -> heading of its section in the HTML report
    "conflict": "Most confident conflicts",
    "gap": "Most confident gaps, with suggested values",
    "invalid_value": "Invalid values",
    "image_error": "Image errors",
}


def featured(findings: Findings) -> pl.DataFrame:
    """The findings the HTML report shows: the top of each section's status."""
    return pl.concat([top_findings(findings, status) for status in SECTIONS])


def render_html(shown: pl.DataFrame, summary: dict, thumbnails: dict[str, bytes | None]) -> str:
    """A self-contained page: counts, then the ``shown`` findings per section with their images."""
    def rows(status: str) -> list[dict]:
        out = shown.filter(pl.col("status") == status).to_dicts()
        for row in out:
            jpeg = thumbnails.get(row["product_id"])
            row["thumbnail"] = base64.b64encode(jpeg).decode() if jpeg else None
        return out

    sections = [{"title": title, "rows": rows(status)} for status, title in SECTIONS.items()]
    template = _TEMPLATES.get_template("report.html.j2")
    return template.render(summary=summary, statuses=STATUSES, sections=sections)


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span that no backtick inside it can close early."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def markdown(summary: dict, folder: str) -> str:
    """Short run summary for a Prefect markdown artifact."""
    t = summary["totals"]
    return (
        f"# clipdq audit {summary['run_id']}\n\n"
        f"Report: {_code_span(storage.join(folder, 'report.html'))}\n\n"
        f"{summary['products']} products: **{t['conflict']} conflicts**, **{t['gap']} gaps** with a suggested "
        f"value, {t['invalid_value']} invalid values, {t['image_error']} image errors, {t['uncertain']} uncertain."
    )


def publish_run(folder: str, findings: pl.DataFrame | bytes, summary: dict, html: str) -> str:
    """Write findings (a frame, or a Parquet file's bytes), summary and report, then the manifest
    that marks the run complete."""
    if isinstance(findings, pl.DataFrame):
        parquet = io.BytesIO()
        findings.write_parquet(parquet)
        findings = parquet.getvalue()
    files = {
        "findings.parquet": findings,
        "summary.json": json.dumps(summary, indent=2, default=str).encode(),
        "report.html": html.encode(),
    }
    meta = {"run_id": summary["run_id"], "rows": summary["findings"], "totals": summary["totals"],
            **({"shards": summary["shards"]} if "shards" in summary else {})}
    return storage.publish(folder, files, meta=meta)
