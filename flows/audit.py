"""Prefect flow: audit a catalog's attributes against its product images."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from clipdq.core.options import AuditOptions
from clipdq.core.spec import Spec, parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.pipeline import audit, shards
from clipdq.reporting import report, runs
from flows.artifacts import TOP_PROBLEMS, announce_audit
from flows.inputs import read_model, read_spec
from flows.retries import IO_RETRIES
from flows.runners import task_runner


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def open_catalog(uri: str) -> catalog.CatalogFile:
    return catalog.CatalogFile(uri)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def validate_catalog(source: catalog.CatalogFile, spec: Spec, cache: str) -> dict:
    return catalog.validate_file(source, spec, cache=cache)


@task(cache_policy=NO_CACHE)
def check_backend(inputs: audit.AuditInputs) -> dict:
    return audit.backend_check(inputs)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def score_shard(job: shards.Job, shard: shards.Shard) -> shards.ShardResult:
    return shards.run_shard(job, shard)


def score_in_shards(inputs: audit.AuditInputs, job: shards.Job, findings_file: str) -> audit.Scored:
    """Every shard of the catalog scored on the options' task runner, within the calling flow run
    (a subflow would cost a second of a small rerun), progress logged as shards finish."""
    logger, plan = get_run_logger(), shards.plan(inputs.source.group_rows, rows_per_shard=inputs.options.rows_per_shard)
    logger.info("%d products in %d shards; shard parts in %s", inputs.source.row_count, len(plan), job.work)
    with task_runner(inputs.options.dask_address, inputs.options.workers) as runner:
        results = []
        for future in as_completed(runner.map(score_shard, {"job": unmapped(job), "shard": plan})):
            results.append(done := future.result())
            reused = ", reused from an interrupted run" if done.reused else ""
            logger.info("shard %d done (%d of %d)%s", done.index, len(results), len(plan), reused)
    return shards.collect(sorted(results, key=lambda result: result.index), inputs, findings_file)


@task(cache_policy=NO_CACHE)
def score_cross_fitted(inputs: audit.AuditInputs, findings_file: str) -> audit.Scored:
    from clipdq.pipeline import crossfit  # imports torch and transformers: seconds a nightly rerun does without

    return crossfit.score(inputs, findings_file)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def find_duplicates(
    scored: audit.Scored, spec: Spec, kept: tuple[pl.DataFrame | None, pl.DataFrame | None]
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    return audit.duplicate_listings(scored, spec, kept=kept[0], search=kept[1])


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, inputs: audit.AuditInputs, scored: audit.Scored, summary: dict, extras: dict) -> str:
    """The run's files, then its manifest; ``extras``: its changes, catalog checks, duplicate listings and search."""
    findings = pl.scan_parquet(scored.findings_file)
    thumbnails = report.thumbnails(findings, inputs.source, inputs.spec, inputs.access)
    html = report.render_html(findings, summary, thumbnails, extras["changes"], extras["duplicates"])
    return report.publish_run(
        folder,
        Path(scored.findings_file),
        summary,
        html,
        validation=extras["validation"],
        duplicates=extras["duplicates"],
        duplicate_search=extras["search"],
    )


@flow(name="clipdq-audit", log_prints=True)
def audit_catalog(
    catalog_uri: str, spec_uri: str, model_uri: str, output_uri: str, options: AuditOptions = AuditOptions()
) -> str:
    """Audit a catalog's attributes against its product images; returns the run folder (findings,
    suggested fixes, summary, report; its manifest, written last, marks the run complete).

    Shards (``options.rows_per_shard``) keep their findings under ``<output_uri>/_shards/``: a killed
    run resumes from them when started again. An outage (more than the spec's
    ``max_transient_image_errors`` of images lost to storage or network errors) publishes nothing.

    Args:
        catalog_uri: The catalog to audit: a Parquet file, local or s3://.
        spec_uri: The spec YAML (id and image columns, attributes and their values), local or s3://.
        model_uri: The fine-tuned model: a model folder, an s3:// prefix or a Hugging Face hub id.
        output_uri: The folder or s3:// prefix that receives run folders, the embedding cache and the
            catalog checks kept between runs.
        options: How the audit runs; every field has a default.
    """
    started = datetime.now(UTC)
    run_id, folder = report.new_run(output_uri, now=started)
    storage.check_writable(output_uri)  # a missing bucket or a read-only role fails now, not after the scoring
    spec_text = read_spec(spec_uri)
    spec, source = parse_spec(spec_text), open_catalog(catalog_uri)
    validation = validate_catalog(source, spec, storage.join(output_uri, "_validation_cache"))
    access = sources.catalog_access(catalog_uri, spec, options.image_roots)
    files = read_model(model_uri)  # its weights load only where something needs them
    inputs = audit.AuditInputs(catalog_uri, model_uri, output_uri, spec_text, spec, source, files, access, options)
    backend = check_backend(inputs)
    job = None if options.cross_fit else shards.job_for(inputs, backend=backend["used"])
    with tempfile.TemporaryDirectory(prefix="clipdq-findings-") as scratch:
        findings_file = str(Path(scratch, "findings.parquet"))
        scored = score_in_shards(inputs, job, findings_file) if job else score_cross_fitted(inputs, findings_file)
        findings = pl.scan_parquet(findings_file)
        previous, changes = runs.changes_since_previous(output_uri, catalog_uri, findings)
        key = audit.images_key(scored.usable, spec.duplicate_similarity)
        kept = runs.kept_duplicates(previous, key, spec.duplicate_similarity)
        duplicates, search = find_duplicates(scored, spec, kept)
        record = audit.run_record(scored, inputs, run_id=run_id, started=started, backend=backend)
        summary = report.summarize(
            findings,
            products=source.row_count,
            run=record,
            validation=validation,
            reported=scored.reported,
            changes=runs.change_counts(changes, previous),
            duplicates=report.duplicates_summary(duplicates, spec.duplicate_similarity, key),
            text=report.text_summary(spec, scored.text_calibration, scored.texts_judged),
        )
        publish(
            folder,
            inputs,
            scored,
            summary,
            {"changes": changes, "validation": validation, "duplicates": duplicates, "search": search},
        )
        top = report.problem_table(findings, changes, TOP_PROBLEMS)
    if job:
        storage.delete_tree(job.work)  # published: the parts are not needed to resume any more
    announce_audit(summary, folder, top)
    return folder
