"""Prefect flow: audit a catalog's attributes against its product images."""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from clipdq.core.options import AuditOptions
from clipdq.core.spec import Spec, parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.io.sources import ImageAccess
from clipdq.model import scorer
from clipdq.model.files import ModelFiles
from clipdq.pipeline import audit, crossfit, shards
from clipdq.reporting import report, runs
from flows.inputs import read_model, read_spec
from flows.retries import IO_RETRIES

TOP_PROBLEMS = 25  # problems in the run's table artifact


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def open_catalog(uri: str) -> catalog.CatalogFile:
    return catalog.CatalogFile(uri)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def validate_catalog(source: catalog.CatalogFile, spec: Spec, cache: str) -> dict:
    return catalog.validate_file(source, spec, cache=cache)


@task(cache_policy=NO_CACHE)
def choose_backend(model_uri: str, backend: str, source: catalog.CatalogFile, spec: Spec, access: ImageAccess,
                   batch_size: int) -> dict:
    """The backend the run uses, and the agreement with fp32 measured on the catalog's first batch."""
    if backend == "fp32" or not source.row_count:
        return {"requested": backend, "used": backend}
    _, checked = audit.choose_backend(scorer.load_model(model_uri), backend, next(source.batches(batch_size)),
                                      spec=spec, access=access)
    get_run_logger().info("backend %s: predictions agree with fp32 for %s of %d images checked; using %s",
                          backend, checked["agreement"], checked["images_checked"], checked["used"])
    return checked


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def score_shard(job: shards.Job, shard: shards.Shard) -> shards.ShardResult:
    return shards.run_shard(job, shard)


def task_runner(dask_address: str | None, workers: int):
    """Where shards run: an existing Dask cluster, a local one of ``workers`` processes, or here."""
    if not dask_address and workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1)  # one shard at a time: each uses every core already
    from prefect_dask import DaskTaskRunner  # imports dask: only when it is used

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def score_in_shards(job: shards.Job, source: catalog.CatalogFile, spec: Spec, files: ModelFiles,
                    findings_file: str, options: AuditOptions) -> audit.Scored:
    """Every shard of the catalog scored on the options' task runner, within the calling flow run
    (a subflow would cost a second of a small rerun), progress logged as shards finish."""
    logger, plan = get_run_logger(), shards.plan(source.group_rows, rows_per_shard=options.rows_per_shard)
    logger.info("%d products in %d shards; shard parts in %s", source.row_count, len(plan), job.work)
    with task_runner(options.dask_address, options.workers) as runner:
        results = []
        for future in as_completed(runner.map(score_shard, {"job": unmapped(job), "shard": plan})):
            results.append(future.result())
            logger.info("shard %d done (%d of %d)%s", results[-1].index, len(results), len(plan),
                        ", reused from an interrupted run" if results[-1].reused else "")
    return shards.collect(sorted(results, key=lambda result: result.index), row_count=source.row_count, spec=spec,
                          files=files, findings_file=findings_file, rows_per_shard=options.rows_per_shard)


@task(cache_policy=NO_CACHE)
def score_cross_fitted(source: catalog.CatalogFile, model_uri: str, spec: Spec, findings_file: str,
                       options: AuditOptions, access: ImageAccess) -> audit.Scored:
    return crossfit.score(source, scorer.load_model(model_uri), spec, findings_file, k=options.cross_fit,
                          access=access, batch_size=options.batch_size, fold_minutes=options.fold_minutes,
                          group_column=options.group_column)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def find_duplicates(scored: audit.Scored, spec: Spec, kept: pl.DataFrame | None) -> pl.DataFrame:
    return audit.duplicate_listings(scored, spec, kept=kept)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, scored: audit.Scored, summary: dict, source: catalog.CatalogFile, spec: Spec,
            access: ImageAccess, changes: pl.DataFrame | None, validation: dict, duplicates: pl.DataFrame) -> str:
    findings = pl.scan_parquet(scored.findings_file)
    html = report.render_html(findings, summary, report.thumbnails(findings, source, spec, access), changes,
                              duplicates)
    return report.publish_run(folder, Path(scored.findings_file), summary, html, validation=validation,
                              duplicates=duplicates)


@flow(name="clipdq-audit", log_prints=True)
def audit_catalog(catalog_uri: str, spec_uri: str, model_uri: str, output_uri: str,
                  options: AuditOptions = AuditOptions()) -> str:
    """Audit a catalog's attributes against its product images; returns the run folder holding
    findings, suggested fixes, summary, report and manifest (written last: the run is complete).

    The catalog is scored in shards (``options.rows_per_shard``), each writing its findings part
    under ``<output_uri>/_shards/`` as it finishes: a run that is killed resumes from its finished
    shards when started again with the same arguments. When more than the spec's
    ``max_transient_image_errors`` share of images is lost to storage or network errors, the run
    fails and publishes nothing: an outage is not a finding.

    Args:
        catalog_uri: The catalog to audit: a Parquet file, local or s3://.
        spec_uri: The spec YAML (id and image columns, attributes and their values), local or s3://.
        model_uri: The fine-tuned model: a model folder, an s3:// prefix or a Hugging Face hub id.
        output_uri: The folder or s3:// prefix that receives run folders, the embedding cache and the
            catalog checks kept between runs.
        options: How the audit runs; every field has a default.
    """
    started = datetime.now(timezone.utc)
    run_id, folder = report.new_run(output_uri, now=started)
    storage.check_writable(output_uri)  # a missing bucket or a read-only role fails now, not after the scoring
    spec_text = read_spec(spec_uri)
    spec, source = parse_spec(spec_text), open_catalog(catalog_uri)
    validation = validate_catalog(source, spec, storage.join(output_uri, "_validation_cache"))
    access = sources.catalog_access(catalog_uri, spec, options.image_roots)
    files = read_model(model_uri)  # its weights load only where something needs them
    backend = choose_backend(model_uri, options.backend, source, spec, access, options.batch_size)
    with tempfile.TemporaryDirectory(prefix="clipdq-findings-") as scratch:
        findings_file = str(Path(scratch, "findings.parquet"))
        if options.cross_fit:
            scored = score_cross_fitted(source, model_uri, spec, findings_file, options, access)
        else:
            job = shards.job_for(source, spec_text, files, output_uri, backend=backend["used"], options=options)
            scored = score_in_shards(job, source, spec, files, findings_file, options)
        previous, changes = runs.changes_since_previous(output_uri, catalog_uri, pl.scan_parquet(findings_file))
        key = audit.images_key(scored.usable, spec.duplicate_similarity)
        duplicates = find_duplicates(scored, spec, runs.kept_duplicates(previous, key))
        record = audit.run_record(scored, spec, run_id=run_id, started=started, catalog_uri=catalog_uri,
                                  model_uri=model_uri, files=files, backend=backend, options=options)
        summary = report.summarize(pl.scan_parquet(findings_file), products=source.row_count, run=record,
                                   validation=validation, reported=scored.reported,
                                   changes=runs.change_counts(changes, previous),
                                   duplicates=report.duplicates_summary(duplicates, spec.duplicate_similarity, key),
                                   text=report.text_summary(spec, scored.text_calibration, scored.texts_judged))
        publish(folder, scored, summary, source, spec, access, changes, validation, duplicates)
        top = report.problem_table(pl.scan_parquet(findings_file), changes, TOP_PROBLEMS)
    if not options.cross_fit:
        storage.delete_tree(job.work)  # published: the parts are not needed to resume any more
    _announce(summary, folder, top)
    return folder


def _announce(summary: dict, folder: str, top: pl.DataFrame) -> None:
    """The run's log line, artifacts (counts, top problems, summary, a link to the report) and an
    event with its totals, which Prefect automations can act on (alert on conflicts, on new problems)."""
    run_id, html, t = summary["run_id"], storage.join(folder, "report.html"), summary["totals"]
    get_run_logger().info("%d conflicts, %d gaps, %d invalid values, %d image errors, %d duplicate listings; "
                          "report: %s", t["conflict"], t["gap"], t["invalid_value"], t["image_error"],
                          summary["duplicates"].get("products", 0), html)
    create_table_artifact(key="clipdq-audit-counts", table=summary["by_attribute"],
                          description=f"Findings per attribute, run {run_id}")
    table = top.drop("detail").with_columns(pl.col("confidence").round(3)).to_dicts()
    create_table_artifact(key="clipdq-top-problems", table=table,
                          description=f"The {len(top)} most confident problems, run {run_id}")
    create_markdown_artifact(key="clipdq-audit-report", markdown=report.markdown(summary, folder),
                             description="Where the audit report is and what it found")
    create_link_artifact(key="clipdq-report-link", link=html if storage.is_s3(html) else Path(html).resolve().as_uri(),
                         link_text=f"report of run {run_id}")
    changes = summary["changes"]
    emit_event(event="clipdq.audit.completed",
               resource={"prefect.resource.id": f"clipdq.audit.{run_id}", "prefect.resource.name": summary["catalog"]},
               payload={"totals": summary["totals"], "changes": changes and changes["totals"], "report": html})
