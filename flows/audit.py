"""Prefect flow: audit a catalog's attributes against its product images."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from clipdq import audit, catalog, images, model, report, storage
from clipdq.compare import compare
from clipdq.spec import Spec, parse_spec
from flows.retries import IO_RETRIES


@task(**IO_RETRIES)
def load_spec(uri: str) -> Spec:
    return parse_spec(storage.read_bytes(uri).decode())


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_catalog(uri: str) -> pl.DataFrame:
    return catalog.read_catalog(uri)


@task(cache_policy=NO_CACHE)
def validate_catalog(frame: pl.DataFrame, spec: Spec) -> dict:
    return catalog.validate(frame, spec)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_model(uri: str) -> model.Clip:
    return model.load_model(uri)


@task(cache_policy=NO_CACHE)
def score(rows: pl.DataFrame, clip: model.Clip, spec: Spec, value_emb: dict, calibration: dict, base: str):
    return audit.score_batch(rows, clip=clip, spec=spec, value_emb=value_emb, calibration=calibration, base=base)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, findings: pl.DataFrame, summary: dict, frame: pl.DataFrame, spec: Spec, base: str) -> str:
    shown = report.featured(findings)
    refs = dict(frame.select(pl.col(spec.id_column).cast(pl.String), spec.image_column).iter_rows())
    readable = shown.filter(pl.col("status") != "image_error")["product_id"].unique().to_list()
    thumbs = {pid: images.thumbnail(refs[pid], base) for pid in readable}
    return report.publish_run(folder, findings, summary, report.render_html(shown, summary, thumbs))


@flow(name="clipdq-audit", log_prints=True)
def audit_catalog(catalog_uri: str, spec_uri: str, model_uri: str, output_uri: str, batch_size: int = 256) -> str:
    """Audit a catalog; returns the run folder holding findings, summary, report and manifest."""
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    run_id, folder = report.new_run(output_uri, now=started)
    spec = load_spec(spec_uri)
    frame = load_catalog(catalog_uri)
    validation = validate_catalog(frame, spec)
    clip = load_model(model_uri)
    calibration = audit.calibration_for(clip, spec)
    value_emb = audit.value_embeddings_for(clip, spec)  # once per run, shared by every batch
    base = storage.parent(catalog_uri)
    scored, done = [], 0
    for rows in audit.batches(frame, batch_size):
        scored.append(score(rows, clip, spec, value_emb, calibration, base))
        done += rows.height
        logger.info("scored %d/%d products", done, frame.height)
    findings = compare(frame, pl.concat(scored), spec=spec, calibration=calibration)
    run = {"run_id": run_id, "started_at": started.isoformat(), "catalog": catalog_uri, "model": model_uri,
           "model_fingerprint": clip.fingerprint(), "target_precision": spec.target_precision,
           "calibration": {k: v.to_dict() for k, v in calibration.items()}}
    summary = report.summarize(findings, products=frame.height, run=run, validation=validation)
    publish(folder, findings, summary, frame, spec, base)
    create_table_artifact(key="clipdq-audit-counts", table=summary["by_attribute"],
                          description=f"Findings per attribute, run {run_id}")
    create_markdown_artifact(key="clipdq-audit-report", markdown=report.markdown(summary, folder),
                             description="Where the audit report is and what it found")
    t = summary["totals"]
    logger.info("%d conflicts, %d gaps, %d invalid values, %d image errors; report: %s",
                t["conflict"], t["gap"], t["invalid_value"], t["image_error"], storage.join(folder, "report.html"))
    return folder
