"""Findings in; summary JSON, an HTML report and a published run folder out."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import polars as pl
from markupsafe import Markup

from clipdq.checks.schemas import NOT_APPLICABLE, STATUSES
from clipdq.core.spec import Spec
from clipdq.core.text import TextCalibration
from clipdq.io import images, storage
from clipdq.io.catalog import CatalogFile
from clipdq.io.sources import ImageAccess
from clipdq.reporting import charts as charts_svg
from clipdq.reporting import runs

TOP_N = 12  # findings shown with thumbnails, per section
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("clipdq.reporting", "templates"), autoescape=True)


def new_run(output: str, *, now: datetime | None = None) -> tuple[str, str]:
    """(run_id, run folder) as ``<output>/run_date=YYYY-MM-DD/run_id=<id>``."""
    now = now or datetime.now(UTC)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    return run_id, storage.join(output, f"run_date={now:%Y-%m-%d}", f"run_id={run_id}")


Findings = pl.DataFrame | pl.LazyFrame  # a run's findings, in memory or scanned from its file


def counts(findings: Findings) -> pl.DataFrame:
    """One row per attribute, one column per status, zeros included."""
    per_status = (
        findings.lazy()
        .filter(pl.col("attribute").is_not_null())  # not_applicable rows name none
        .group_by("attribute", "status")
        .len()
        .collect()
    )
    wide = per_status.pivot(on="status", index="attribute", values="len")
    missing = [pl.lit(0, pl.UInt32).alias(s) for s in STATUSES if s not in wide.columns]
    return wide.with_columns(missing).select("attribute", *STATUSES).fill_null(0).sort("attribute")


def duplicates_summary(found: pl.DataFrame, threshold: float | None, images_key: str | None = None) -> dict:
    """What summary.json says of the duplicate listings (DUPLICATES_SCHEMA) found among the
    images ``images_key`` names (``pipeline.audit.images_key``)."""
    if threshold is None:
        return {"checked": False, "why": "duplicate_similarity is null in the spec"}
    identical = found.group_by("group").agg(pl.col("kind").eq("identical bytes").all())["kind"].sum()
    return {
        "checked": True,
        "similarity_threshold": threshold,
        "groups": found["group"].n_unique(),
        "products": found.height,
        "groups_of_identical_bytes": int(identical),
        "crops": int((found["kind"] == "cropped from the other").sum()),
        "images_key": images_key,
    }


def text_summary(spec: Spec, calibration: TextCalibration | None, judged: dict) -> dict:
    """What summary.json says of image and text agreement, before the findings are counted;
    ``judged``: how the audit judged the texts (``audit.judge_texts``)."""
    if spec.text_column is None:
        return {"checked": False, "why": "the spec names no text_column"}
    if calibration is None:
        return {
            "checked": False,
            "column": spec.text_column,
            "why": f"the model was not calibrated on texts of {spec.text_column!r} (fine-tune it on a catalog "
            f"with that column)",
        }
    return {
        "checked": True,
        "column": spec.text_column,
        "category_column": spec.text_category,
        "threshold": calibration.threshold,
        "validation_rows": calibration.rows,
        "planted_rows": calibration.planted_rows,
    } | judged


def summarize(
    findings: Findings,
    *,
    products: int,
    run: dict,
    validation: dict,
    reported: int | None = None,
    changes: dict | None = None,
    duplicates: dict | None = None,
    text: dict | None = None,
) -> dict:
    """Summary JSON: what was checked, with what, how many findings of each kind, and what changed
    since the previous complete run (``runs.change_counts``; null for a first run).

    ``reported``: the products in ``findings`` where the caller has counted them (an audit in
    shards counts them part by part: a distinct count here would hold every id at once).
    """
    by_attribute = counts(findings)
    products_in = pl.col("product_id").n_unique() if reported is None else pl.lit(reported)
    rows, not_applicable, reported = (
        findings.lazy().select(pl.len(), (pl.col("status") == NOT_APPLICABLE).sum(), products_in).collect().row(0)
    )
    warnings = list(validation.get("warnings", []))
    if not_applicable:
        warnings.append(f"{not_applicable} products have no attribute that applies to them (applies_to)")
    if reported < products:  # compare reports every product: fewer means rows were lost on the way
        warnings.append(f"{products - reported} products are missing from the findings")
    if text and text["checked"]:
        column = by_attribute.filter(pl.col("attribute") == text["column"])
        text = text | {"flagged": int(column["conflict"].sum()), "agreeing": int(column["match"].sum())}
    return {
        **run,
        "products": products,
        "products_reported": reported,
        "findings": rows,
        "totals": {s: int(by_attribute[s].sum()) for s in STATUSES} | {NOT_APPLICABLE: not_applicable},
        "by_attribute": by_attribute.to_dicts(),
        "changes": changes,
        "duplicates": duplicates,
        "text_agreement": text,
        "warnings": warnings,
        "expectations": validation.get("expectations", []),
        "expectations_reused": bool(validation.get("reused")),  # kept from an earlier run of the same keys
    }


FIXES_SCHEMA = pl.Schema(
    {
        "product_id": pl.String,
        "attribute": pl.String,
        "current_value": pl.String,
        "suggested_value": pl.String,
        "confidence": pl.Float64,
        "status": pl.String,
    }
)


def suggested_fixes(findings: Findings) -> pl.DataFrame:
    """One row per gap and conflict (and per tree level below a conflict, so a fix sets the whole
    path), ready to import into a product information system: the value the catalog holds (null
    for a gap), the value the image suggests, and how sure."""
    return (
        findings.lazy()
        .filter(pl.col("status").is_in(["conflict", "gap", "parent_conflict"]))
        .select(
            "product_id",
            "attribute",
            pl.col("existing_value").alias("current_value"),
            pl.col("predicted_value").alias("suggested_value"),
            "confidence",
            "status",
        )
        .sort("status", "attribute", "confidence", "product_id", descending=[False, False, True, False])
        .collect()
        .cast(FIXES_SCHEMA)
    )


def top_findings(findings: Findings, status: str, n: int = TOP_N) -> pl.DataFrame:
    """The most confident findings of a status, taking attributes in turn so each is shown."""
    return (
        findings.lazy()
        .filter(pl.col("status") == status)
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


TABLE_COLUMNS = (
    "product_id",
    "attribute",
    "status",
    "existing_value",
    "predicted_value",
    "confidence",
    "change",
    "detail",
)
TABLE_ROWS = 100_000  # problems in the report's table, the most confident first (all are in suggested_fixes)
TABLE_THUMBNAILS = 200  # problems shown with a thumbnail in the table, the most confident first
RESOLVED_SHOWN = 200  # resolved problems listed by name
DUPLICATES_SHOWN = 500  # duplicate listings in the report (all are in duplicates.parquet)
TEXT_FLAGS_SHOWN = 200  # images that may not show their product, in their own section (all are in the table)
CONFUSION_VALUES = 25  # catalog values per attribute in the catalog x predicted table, the commonest first
CONFIDENCE_BINS = 20


def problem_table(findings: Findings, changes: pl.DataFrame | None, limit: int | None = None) -> pl.DataFrame:
    """The problems (``runs.PROBLEMS``, the ``limit`` most confident, or all) with their change since
    the previous run, the most confident first."""
    table = findings.lazy().filter(pl.col("status").is_in(runs.PROBLEMS))
    if changes is None:
        table = table.with_columns(change=pl.lit(None, pl.String))
    else:
        table = table.join(changes.lazy().filter(pl.col("change") != "resolved"), on=runs.KEY, how="left")
    table = table.select(TABLE_COLUMNS).sort("confidence", descending=True, nulls_last=True)
    return (table if limit is None else table.head(limit)).collect()


def thumbnail_ids(findings: Findings) -> list[str]:
    """Products whose thumbnails the report shows: the featured findings' and the table's first."""
    readable = pl.col("status") != "image_error"
    table = problem_table(findings, None, TABLE_ROWS).lazy().filter(readable).head(TABLE_THUMBNAILS)
    ids = pl.concat([featured(findings).lazy().filter(readable).select("product_id"), table.select("product_id")])
    return ids.unique(maintain_order=True).collect()["product_id"].to_list()


def confusion(findings: Findings) -> list[dict]:
    """Per attribute, counts of each (catalog value, predicted value) pair among the rows that have both."""
    pairs = (
        findings.lazy()
        .filter(pl.col("existing_value").is_not_null() & pl.col("predicted_value").is_not_null())
        .group_by("attribute", "existing_value", "predicted_value")
        .len()
        .collect()
    )
    tables = []
    for (attribute,), part in pairs.sort("attribute").group_by("attribute", maintain_order=True):
        by_count = (
            part.group_by("existing_value")
            .agg(pl.col("len").sum())
            .sort("len", "existing_value", descending=[True, False])
        )
        rows = by_count["existing_value"].head(CONFUSION_VALUES).to_list()
        columns = sorted(part["predicted_value"].unique().to_list())
        cells = {(r, c): n for r, c, n in part.select("existing_value", "predicted_value", "len").iter_rows()}
        tables.append(
            {
                "attribute": attribute,
                "columns": columns,
                "more": by_count.height - len(rows),
                "rows": [{"value": r, "cells": [cells.get((r, c), 0) for c in columns]} for r in rows],
            }
        )
    return tables


def thresholds_in_force(summary: dict) -> dict[str, list[dict]]:
    """Per attribute, its calibration as each model that scored the run used it: one, or one per
    fold under cross-fitting (``summary["calibration"]``, a list)."""
    models = summary.get("calibration") or []
    names = dict.fromkeys(name for model in models for name in model)
    return {name: [model[name] for model in models if name in model] for name in names}


def confidence_charts(findings: Findings, thresholds: dict[str, list[dict]]) -> list[str]:
    """Per attribute, an SVG histogram of confidence by status with its gap and conflict thresholds
    (where one model scored the run: folds have thresholds of their own)."""
    shown = ("match", "conflict", "gap", "uncertain")
    binned = (
        findings.lazy()
        .filter(pl.col("confidence").is_not_null() & pl.col("status").is_in(shown))
        .with_columns(bin=(pl.col("confidence") * CONFIDENCE_BINS).floor().clip(0, CONFIDENCE_BINS - 1).cast(pl.Int32))
        .group_by("attribute", "status", "bin")
        .len()
        .collect()
    )
    charts = []
    for attribute in sorted(binned["attribute"].unique().to_list()):
        bins = {status: [0] * CONFIDENCE_BINS for status in shown}
        for status, b, n in binned.filter(pl.col("attribute") == attribute).select("status", "bin", "len").iter_rows():
            bins[status][b] = n
        in_force = thresholds.get(attribute, [])
        limits = in_force[0] if len(in_force) == 1 else {}
        charts.append(
            charts_svg.histogram(
                bins,
                {"gap": limits.get("gap_threshold"), "conflict": limits.get("conflict_threshold")},
                title=attribute,
            )
        )
    return charts


def _script_json(value) -> Markup:
    """JSON to embed in a ``<script type="application/json">``: no ``<`` can end the element early."""
    return Markup(json.dumps(value, ensure_ascii=False, default=str).replace("<", "\\u003c"))


def render_html(
    findings: Findings,
    summary: dict,
    thumbnails: dict[str, bytes | None],
    changes: pl.DataFrame | None = None,
    duplicates: pl.DataFrame | None = None,
) -> str:
    """A self-contained page for a data steward: counts, rates and thresholds per attribute, charts,
    every problem in a sortable and filterable table, catalog x predicted values, duplicate listings,
    the catalog checks, what changed since the previous run, and the most confident findings with
    their images."""
    images = {pid: base64.b64encode(jpeg).decode() for pid, jpeg in thumbnails.items() if jpeg}
    shown = featured(findings)

    def cards(status: str) -> list[dict]:
        rows = shown.filter(pl.col("status") == status).to_dicts()
        return [row | {"thumbnail": images.get(row["product_id"])} for row in rows]

    table = problem_table(findings, changes, TABLE_ROWS)
    problems = sum(summary["totals"][status] for status in runs.PROBLEMS)
    resolved = [] if changes is None else changes.filter(pl.col("change") == "resolved").head(RESOLVED_SHOWN).to_dicts()
    thresholds = thresholds_in_force(summary)
    text = summary.get("text_agreement") or {}
    text_flags = (
        []
        if not text.get("column")
        else (
            findings.lazy()
            .filter((pl.col("attribute") == text["column"]) & (pl.col("status") == "conflict"))
            .sort("confidence", descending=True)
            .head(TEXT_FLAGS_SHOWN)
            .collect()
            .to_dicts()
        )
    )
    template = _TEMPLATES.get_template("report.html.j2")
    return template.render(
        summary=summary,
        statuses=STATUSES,
        problems=runs.PROBLEMS,
        nonce=uuid.uuid4().hex,
        sections=[{"title": title, "rows": cards(status)} for status, title in SECTIONS.items()],
        thresholds=thresholds,
        per_attribute=[row | {"total": sum(row[s] for s in STATUSES)} for row in summary["by_attribute"]],
        status_chart=Markup(charts_svg.status_bars(summary["by_attribute"], STATUSES)),
        confidence_charts=[Markup(chart) for chart in confidence_charts(findings, thresholds)],
        confusion=confusion(findings),
        resolved=resolved,
        duplicates=[] if duplicates is None else duplicates.head(DUPLICATES_SHOWN).to_dicts(),
        duplicates_more=duplicates is not None and duplicates.height > DUPLICATES_SHOWN,
        text_flags=[row | {"thumbnail": images.get(row["product_id"])} for row in text_flags],
        table=_script_json({"columns": TABLE_COLUMNS, "rows": table.rows(), "total": problems}),
        table_images=_script_json({pid: images[pid] for pid in table["product_id"].unique() if pid in images}),
    )


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span that no backtick inside it can close early."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def markdown(summary: dict, folder: str) -> str:
    """Short run summary for a Prefect markdown artifact."""
    t, changes = summary["totals"], summary.get("changes")
    since = (
        f"\n\nSince run {_code_span(changes['previous_run'])}: {changes['totals']['new']} new, "
        f"{changes['totals']['resolved']} resolved, {changes['totals']['persisting']} persisting problems."
        if changes
        else "\n\nNo earlier complete run of this catalog to compare with."
    )
    return (
        f"# clipdq audit {summary['run_id']}\n\n"
        f"Report: {_code_span(storage.join(folder, 'report.html'))}\n\n"
        f"{summary['products']} products: **{t['conflict']} conflicts**, **{t['gap']} gaps** with a suggested "
        f"value, {t['invalid_value']} invalid values, {t['image_error']} image errors, {t['uncertain']} uncertain."
        + _duplicates_line(summary.get("duplicates"))
        + _text_line(summary.get("text_agreement"))
        + since
    )


def _text_line(text: dict | None) -> str:
    if not text or not text["checked"]:
        return ""
    return f" {text['flagged']} images may not show the product their {text['column']} names."


def _duplicates_line(duplicates: dict | None) -> str:
    if not duplicates or not duplicates["checked"]:
        return ""
    return f" {duplicates['products']} products in {duplicates['groups']} groups of duplicate listings."


def publish_run(
    folder: str,
    findings: pl.DataFrame | Path,
    summary: dict,
    html: str,
    *,
    validation: dict | None = None,
    duplicates: pl.DataFrame | None = None,
    duplicate_search: pl.DataFrame | None = None,
) -> str:
    """Write an audit's findings (a frame, or a Parquet file), summary, report, suggested fixes,
    duplicate listings (and the search that found them, for the next run to keep) and the catalog
    checks' result, then the manifest that marks the run complete."""
    fixes = suggested_fixes(findings if isinstance(findings, pl.DataFrame) else pl.scan_parquet(findings))
    csv = io.BytesIO()
    fixes.write_csv(csv)
    files = {
        "findings.parquet": findings if isinstance(findings, pl.DataFrame) else findings.read_bytes(),
        "suggested_fixes.parquet": fixes,
        "suggested_fixes.csv": csv.getvalue(),
        **({} if duplicates is None else {"duplicates.parquet": duplicates}),
        **({} if duplicate_search is None else {"duplicate_search.parquet": duplicate_search}),
        "validation.json": json.dumps(validation or {}, indent=2, default=str).encode(),
        "report.html": html.encode(),
    }
    meta = {
        "catalog": summary.get("catalog"),
        "rows": summary["findings"],
        "totals": summary["totals"],
        **({"shards": summary["shards"]} if "shards" in summary else {}),
    }
    return runs.publish(folder, summary, files, meta=meta)


def thumbnails(findings: Findings, source: CatalogFile, spec: Spec, access: ImageAccess) -> dict[str, bytes | None]:
    """Product id -> a small JPEG of its image, for the products the report shows (``thumbnail_ids``)."""
    wanted = pl.Series(thumbnail_ids(findings), dtype=pl.String)
    refs = source.rows_where(spec.id_column, wanted, [spec.image_column]).rows()
    with ThreadPoolExecutor(8) as pool:  # image reads: latency-bound on object storage
        read = pool.map(lambda row: images.thumbnail(row[1], access), refs)
        return dict(zip([product for product, _ in refs], read))
