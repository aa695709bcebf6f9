"""Prefect flow: audit a catalog's attributes against its product images."""

from __future__ import annotations

import copy
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from clipdq.checks import schemas
from clipdq.checks.schemas import TEXTS_SCHEMA
from clipdq.core import splits, values
from clipdq.core.options import AuditOptions
from clipdq.core.spec import Spec, parse_spec
from clipdq.core.text import TextCalibration
from clipdq.io import catalog, images, sources, storage
from clipdq.io.cache import cache_key
from clipdq.io.sources import ImageAccess
from clipdq.model import scorer
from clipdq.model.files import ModelFiles
from clipdq.pipeline import audit, embedding, shards
from clipdq.reporting import report, runs
from flows.inputs import read_model, read_spec
from flows.retries import IO_RETRIES

if TYPE_CHECKING:
    from clipdq.model.towers import Clip


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def open_catalog(uri: str) -> catalog.CatalogFile:
    return catalog.CatalogFile(uri)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def validate_catalog(source: catalog.CatalogFile, spec: Spec, cache: str) -> dict:
    return catalog.validate_file(source, spec, cache=cache)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_model(uri: str) -> Clip:
    return scorer.load_model(uri)  # once per process


@task(cache_policy=NO_CACHE)
def train_fold(start: Clip, rows: pl.DataFrame, spec: Spec, access: ImageAccess, fold: int,
               max_minutes: float | None, group_column: str | None = None):
    """A copy of ``start`` fine-tuned on the catalog rows outside one fold.

    The catalog's labels are as wrong as the spec expects, so calibration allows for that.
    """
    from clipdq.training import train

    clip = copy.deepcopy(start)
    config = train.config_for(clip, mode=train.quick_mode(clip), max_minutes=max_minutes, seed=fold,
                              label_noise=spec.expected_error_rate, group_column=group_column)
    return train.finetune(clip, rows, spec, access=access, config=config)


@task(cache_policy=NO_CACHE)
def choose_backend(clip: Clip, backend: str, rows: pl.DataFrame, spec: Spec, access: ImageAccess):
    return audit.choose_backend(clip, backend, rows, spec=spec, access=access)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def score_shard(job: shards.Job, shard: shards.Shard) -> shards.ShardResult:
    return shards.run_shard(job, shard)


def score_shards(runner, job: shards.Job, plan: list[shards.Shard], rows: int) -> list[shards.ShardResult]:
    """Every shard of the plan scored on ``runner``, within the calling flow run (a subflow would
    cost a second of a small rerun); progress logged as shards finish."""
    logger = get_run_logger()
    with runner:
        futures = runner.map(score_shard, {"job": unmapped(job), "shard": plan})
        results, scored = [], 0
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            scored += result.counts["scored"]
            logger.info("shard %d done (%d of %d)%s: %d/%d products scored", result.index, len(results), len(plan),
                        ", reused from an interrupted run" if result.reused else "", scored, rows)
    return sorted(results, key=lambda result: result.index)


def task_runner(dask_address: str | None, workers: int):
    """Where shards run: an existing Dask cluster, a local one of ``workers`` processes, or here."""
    if not dask_address and workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1)  # one shard at a time: each uses every core already
    from prefect_dask import DaskTaskRunner  # imports dask: only when it is used

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def find_duplicates(images: pl.DataFrame, signatures: np.ndarray, spec: Spec, key: str,
                    previous: str | None) -> pl.DataFrame:
    """Duplicate listings among the usable ``images`` (ids and digests; their ``signatures``, a row
    each): the previous run's where it saw the same images at the same threshold (``key``: a rerun
    of an unchanged catalog), else found afresh."""
    kept = _previous_duplicates(previous, key) if previous else None
    if kept is not None:
        get_run_logger().info("duplicate listings: the same images as run %s, its findings reused",
                              runs.run_id_of(previous))
        return kept
    from clipdq.checks import duplicates  # imports torch: not needed for a rerun of an unchanged catalog

    found = duplicates.find(images["product_id"].to_list(), images["sha256"].to_list(), signatures,
                            threshold=spec.duplicate_similarity)
    get_run_logger().info("duplicate listings: %d products in %d groups among %d images", found.height,
                          found["group"].n_unique(), images.height)
    return found


def _previous_duplicates(previous: str, key: str) -> pl.DataFrame | None:
    try:
        if (runs.summary(previous).get("duplicates") or {}).get("images_key") != key:
            return None
        return pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(previous, "duplicates.parquet"))))
    except (OSError, ValueError, pl.exceptions.PolarsError) as error:
        get_run_logger().warning("cannot reuse the duplicate listings of %s (%s): finding them afresh", previous, error)
        return None


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, findings_file: str, summary: dict, source: catalog.CatalogFile, spec: Spec,
            access: ImageAccess, changes: pl.DataFrame | None, validation: dict, duplicates: pl.DataFrame) -> str:
    findings = pl.scan_parquet(findings_file)
    wanted = pl.Series(report.thumbnail_ids(findings), dtype=pl.String)
    refs = source.rows_where(spec.id_column, wanted, [spec.image_column]).rows()
    with ThreadPoolExecutor(8) as pool:  # image reads: latency-bound on object storage
        thumbs = dict(zip([pid for pid, _ in refs], pool.map(lambda row: images.thumbnail(row[1], access), refs)))
    html = report.render_html(findings, summary, thumbs, changes, duplicates)
    return report.publish_run(folder, Path(findings_file), summary, html, validation=validation,
                              duplicates=duplicates)


def _cross_fitted(frame: pl.DataFrame, clip: Clip, spec: Spec, *, k: int, fold_minutes: float | None,
                  group_column: str | None, access: ImageAccess, batch_size: int, on_batch):
    """(findings, one calibration per fold as JSON, how each fold's texts were judged): each fold
    scored by ``clip`` fine-tuned on the other folds."""
    from clipdq.training import train

    groups = train.group_keys(frame, group_column)
    folds = pl.Series(splits.fold_of(values.labels(frame, spec), k=k, seed=0, groups=groups))
    parts, calibrations, judged = [], [], []
    for fold in range(k):
        get_run_logger().info("cross-fitting: training the model for fold %d of %d", fold + 1, k)
        fold_clip = train_fold(clip, frame.filter(folds != fold), spec, access, fold, fold_minutes, group_column)
        fold_scorer = scorer.of_clip(fold_clip, spec)
        findings, texts = audit.findings_of(audit.batches(frame.filter(folds == fold), batch_size),
                                            scorer=fold_scorer, access=access, on_batch=on_batch)
        text_findings, fold_judged = audit.judge_texts(texts, fold_scorer.text_calibration, spec)
        parts += [findings, text_findings]
        calibrations.append({name: c.to_dict() for name, c in fold_scorer.calibration.items()})
        judged.append(fold_judged)
    return pl.concat(parts), calibrations, judged


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
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    run_id, folder = report.new_run(output_uri, now=started)
    storage.check_writable(output_uri)  # a missing bucket or a read-only role fails now, not after the scoring
    spec_text = read_spec(spec_uri)
    spec = parse_spec(spec_text)
    source = open_catalog(catalog_uri)
    validation = validate_catalog(source, spec, storage.join(output_uri, "_validation_cache"))
    access = sources.catalog_access(catalog_uri, spec, options.image_roots)
    files = read_model(model_uri)  # its weights load only where something needs them
    backend_check = {"requested": options.backend, "used": options.backend}
    if options.backend != "fp32" and source.rows:
        _, backend_check = choose_backend(load_model(model_uri), options.backend,
                                          next(source.batches(options.batch_size)), spec, access)
        logger.info("backend %s: predictions agree with fp32 for %s of %d images checked; using %s", options.backend,
                    backend_check["agreement"], backend_check["images_checked"], backend_check["used"])
    run = {"run_id": run_id, "started_at": started.isoformat(), "catalog": catalog_uri, "model": model_uri,
           "model_fingerprint": files.fingerprint(), "target_precision": spec.target_precision,
           "cross_fit": options.cross_fit, "backend": backend_check, "options": options.model_dump()}
    with tempfile.TemporaryDirectory(prefix="clipdq-findings-") as scratch:
        findings_file = str(Path(scratch, "findings.parquet"))
        reported = None  # products in the findings: counted by the summary unless the shards count them
        text_calibration = scorer.text_calibration_for(files, spec)
        if options.cross_fit:
            in_folds, (usable, signatures), judged = _audit_cross_fitted(source, load_model(model_uri), spec,
                                                                         findings_file, options, access)
            run |= in_folds
        else:
            job = shards.new_job(output_uri, model_fingerprint=files.fingerprint(),
                                 rows_per_shard=options.rows_per_shard, catalog_uri=catalog_uri,
                                 catalog_version=source.version, spec_text=spec_text, model_uri=model_uri,
                                 backend=backend_check["used"],
                                 cache=_embedding_cache(output_uri, files, backend_check["used"], options),
                                 image_roots=tuple(sorted(options.image_roots)), batch_size=options.batch_size)
            in_shards, reported, (usable, signatures), judged = _audit_in_shards(job, source, spec, findings_file,
                                                                                 options, text_calibration)
            run |= in_shards | {"calibration": {name: c.to_dict()
                                                for name, c in scorer.calibration_for(files, spec).items()}}
        previous, changes = _changes_since_previous_run(output_uri, catalog_uri, findings_file)
        key = None if spec.duplicate_similarity is None else audit.images_key(usable, spec.duplicate_similarity)
        duplicates = (find_duplicates(usable, signatures, spec, key, previous) if key
                      else pl.DataFrame(schema=schemas.DUPLICATES_SCHEMA))
        summary = report.summarize(pl.scan_parquet(findings_file), products=source.rows, run=run,
                                   validation=validation, reported=reported,
                                   changes=runs.change_counts(changes, previous) if previous else None,
                                   duplicates=report.duplicates_summary(duplicates, spec.duplicate_similarity, key),
                                   text=report.text_summary(spec, text_calibration, judged))
        publish(folder, findings_file, summary, source, spec, access, changes, validation, duplicates)
        top = report.problem_table(pl.scan_parquet(findings_file), changes, TOP_PROBLEMS)
    if not options.cross_fit:
        storage.delete_tree(job.work)  # published: the parts are not needed to resume any more
    _announce(summary, folder, top)
    t = summary["totals"]
    logger.info("%d conflicts, %d gaps, %d invalid values, %d image errors, %d duplicate listings; report: %s",
                t["conflict"], t["gap"], t["invalid_value"], t["image_error"], duplicates.height,
                storage.join(folder, "report.html"))
    return folder


def _changes_since_previous_run(output_uri: str, catalog_uri: str, findings_file: str):
    """(the previous complete run of the catalog, every problem's change since it), or (None, None)
    for a first run, or where that run's findings cannot be read: the audit goes on, and says so."""
    previous = runs.previous_run(output_uri, catalog_uri)
    if previous is None:
        return None, None
    try:
        return previous, runs.changed(pl.scan_parquet(findings_file), runs.read_problems(previous))
    except (OSError, pl.exceptions.PolarsError) as error:
        get_run_logger().warning("cannot compare with the previous run %s (%s): no changes reported", previous, error)
        return None, None


def _embedding_cache(output_uri: str, files: ModelFiles, backend: str, options: AuditOptions) -> str | None:
    if not options.embedding_cache:
        return None
    key = cache_key(files.fingerprint(), files.pixels, backend, files.view())
    return storage.join(output_uri, "_embedding_cache", key)


def _audit_in_shards(job: shards.Job, source: catalog.CatalogFile, spec: Spec, findings_file: str,
                     options: AuditOptions, text_calibration: TextCalibration | None
                     ) -> tuple[dict, int, tuple[pl.DataFrame, np.ndarray], dict]:
    """The catalog scored shard by shard on the chosen task runner, its texts judged once all are
    scored, joined into ``findings_file``; returns what the summary says of it, the products in
    the findings, the usable images (ids and digests; signatures, mapped from a file beside
    ``findings_file``) and how the texts were judged."""
    plan = shards.plan(source.group_rows, rows_per_shard=options.rows_per_shard)
    get_run_logger().info("%d products in %d shards; shard parts in %s", source.rows, len(plan), job.work)
    results = score_shards(task_runner(options.dask_address, options.workers), job, plan, source.rows)
    images_seen = shards.totals(results)
    embedding.check_outage(images_seen["lost_to_outages"], source.rows, spec.max_transient_image_errors)
    text_parts = shards.read_parts([result.texts for result in results], TEXTS_SCHEMA)
    texts = pl.concat([pl.DataFrame(schema=TEXTS_SCHEMA), *text_parts])
    text_findings, judged = audit.judge_texts(texts, text_calibration, spec)
    reported = shards.assemble([result.part for result in results], findings_file, text_findings)
    signatures_file = str(Path(findings_file).with_name("signatures"))
    usable = shards.read_images([result.images for result in results], signatures_file)
    shards_seen = {"count": len(plan), "rows_per_shard": options.rows_per_shard,
                   "reused": sum(result.reused for result in results)}
    return {"images": images_seen, "shards": shards_seen}, reported, usable, judged


TOP_PROBLEMS = 25  # problems in the run's table artifact


def _announce(summary: dict, folder: str, top: pl.DataFrame) -> None:
    """The run's artifacts (counts, top problems, summary, a link to the report) and an event with
    its totals, which Prefect automations can act on (alert on conflicts, on new problems)."""
    run_id, html = summary["run_id"], storage.join(folder, "report.html")
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


def _audit_cross_fitted(source: catalog.CatalogFile, clip: Clip, spec: Spec, findings_file: str,
                        options: AuditOptions, access: ImageAccess
                        ) -> tuple[dict, tuple[pl.DataFrame, np.ndarray], dict]:
    """Cross-fitted findings written to ``findings_file``; returns what the summary says of them,
    the usable images (ids and digests, signatures) and how each fold's texts were judged."""
    images_seen, usable = dict.fromkeys(embedding.COUNT_KEYS, 0), [pl.DataFrame(schema=embedding.IMAGES_SCHEMA)]

    def on_batch(batch: embedding.Batch) -> None:
        usable.append(embedding.usable_images(batch, spec))
        for key, value in embedding.counts(batch).items():
            images_seen[key] += value
        embedding.check_outage(images_seen["lost_to_outages"], source.rows, spec.max_transient_image_errors)
        get_run_logger().info("scored %d/%d products", images_seen["scored"], source.rows)

    findings, calibrations, judged = _cross_fitted(source.read(), clip, spec, k=options.cross_fit,
                                                   fold_minutes=options.fold_minutes, group_column=options.group_column,
                                                   access=access, batch_size=options.batch_size, on_batch=on_batch)
    findings.write_parquet(findings_file)
    usable = pl.concat(usable)
    return {"calibration": calibrations, "images": images_seen}, (usable.drop("signature"),
                                                                  embedding.signature_rows(usable)), {"folds": judged}
