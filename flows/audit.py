"""Prefect flow: audit a catalog's attributes against its product images."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from datetime import datetime, timezone

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from clipdq import audit, catalog, images, model, report, sources, splits, storage, train
from clipdq.cache import EmbeddingCache, cache_key
from clipdq.compare import FINDINGS_SCHEMA, compare
from clipdq.sources import ImageAccess
from clipdq.spec import Spec, parse_spec
from flows.retries import IO_RETRIES


@task(**IO_RETRIES)
def load_spec(uri: str) -> Spec:
    return parse_spec(storage.read_bytes(uri).decode())


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def open_catalog(uri: str) -> catalog.CatalogFile:
    return catalog.CatalogFile(uri)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def validate_catalog(source: catalog.CatalogFile, spec: Spec, cache: str) -> tuple[pl.DataFrame, dict]:
    return catalog.validate_file(source, spec, cache=cache)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def load_model(uri: str) -> model.Clip:
    return model.load_model(uri)


@task(cache_policy=NO_CACHE)
def train_fold(start: model.Clip, rows: pl.DataFrame, spec: Spec, access: ImageAccess, fold: int,
               max_minutes: float | None, group_column: str | None = None):
    """A copy of ``start`` fine-tuned on the catalog rows outside one fold.

    The catalog's labels are as wrong as the spec expects, so calibration allows for that.
    """
    clip = copy.deepcopy(start)
    config = train.config_for(clip, max_minutes=max_minutes, seed=fold, label_noise=spec.expected_error_rate,
                              group_column=group_column)
    return train.finetune(clip, rows, spec, access=access, config=config)


@task(cache_policy=NO_CACHE)
def choose_backend(clip: model.Clip, backend: str, rows: pl.DataFrame, spec: Spec, access: ImageAccess):
    return audit.choose_backend(clip, backend, rows, spec=spec, access=access)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def open_cache(output_uri: str, clip: model.Clip) -> EmbeddingCache:
    key = cache_key(clip.fingerprint(), clip.pixels, clip.backend)
    return EmbeddingCache(storage.join(output_uri, "_embedding_cache", key))


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def save_cache(cache: EmbeddingCache) -> str | None:
    return cache.flush()


@task(cache_policy=NO_CACHE)
def score(batch: audit.Batch, clip: model.Clip, spec: Spec, value_emb: dict, calibration: dict, cache):
    return audit.score_batch(batch, clip=clip, spec=spec, value_emb=value_emb, calibration=calibration, cache=cache)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, findings: pl.DataFrame, summary: dict, keys: pl.DataFrame, spec: Spec,
            access: ImageAccess) -> str:
    shown = report.featured(findings)
    refs = dict(keys.select(pl.col(spec.id_column).cast(pl.String), spec.image_column).iter_rows())
    readable = shown.filter(pl.col("status") != "image_error")["product_id"].unique().to_list()
    thumbs = {pid: images.thumbnail(refs[pid], access) for pid in readable}
    return report.publish_run(folder, findings, summary, report.render_html(shown, summary, thumbs))


def _findings(row_batches: Iterable[pl.DataFrame], clip: model.Clip, spec: Spec, *, access: ImageAccess, progress,
              cache: EmbeddingCache | None = None):
    """(findings, calibration as JSON) of the catalog rows in ``row_batches``, scored by ``clip``.

    Images are fetched and decoded in a background thread a few batches ahead of the model; each
    batch is compared as it is scored, so only findings, not catalog rows, pile up.
    """
    calibration = audit.calibration_for(clip, spec)
    value_emb = audit.value_embeddings_for(clip, spec)  # once per run, shared by every batch
    prepare = functools.partial(audit.prepare_batch, spec=spec, access=access, pixels=clip.pixels, cache=cache)
    parts = [pl.DataFrame(schema=FINDINGS_SCHEMA)]
    for batch in audit.prepared_batches(row_batches, prepare):
        predictions = score(batch, clip, spec, value_emb, calibration, cache)
        parts.append(compare(batch.rows, predictions, spec=spec, calibration=calibration))
        progress(batch)
    return pl.concat(parts), {name: c.to_dict() for name, c in calibration.items()}


def _cross_fitted(frame: pl.DataFrame, clip: model.Clip, spec: Spec, *, k: int, fold_minutes: float | None,
                  group_column: str | None, access: ImageAccess, batch_size: int, progress):
    """(findings, one calibration per fold): each fold scored by ``clip`` fine-tuned on the other folds."""
    groups = train.group_keys(frame, group_column)
    folds = pl.Series(splits.fold_of(train.encode_labels(frame, spec), k=k, seed=0, groups=groups))
    parts = []
    for fold in range(k):
        get_run_logger().info("cross-fitting: training the model for fold %d of %d", fold + 1, k)
        fold_clip = train_fold(clip, frame.filter(folds != fold), spec, access, fold, fold_minutes, group_column)
        parts.append(_findings(audit.batches(frame.filter(folds == fold), batch_size), fold_clip, spec, access=access,
                               progress=progress))
    return pl.concat([findings for findings, _ in parts]), [calibration for _, calibration in parts]


@flow(name="clipdq-audit", log_prints=True)
def audit_catalog(
    catalog_uri: str,
    spec_uri: str,
    model_uri: str,
    output_uri: str,
    batch_size: int = 64,
    cross_fit: int = 0,
    fold_minutes: float | None = None,
    group_column: str | None = None,
    embedding_cache: bool = True,
    backend: str = "fp32",
    image_roots: list[str] | None = None,
) -> str:
    """Audit a catalog; returns the run folder holding findings, summary, report and manifest.

    ``cross_fit`` K >= 2 audits a catalog that is also the training data honestly: its rows are
    dealt into K folds, and each fold is scored by a model fine-tuned from ``model_uri`` on the
    other folds (at most ``fold_minutes`` each), so no row is judged by a model that learned it;
    rows sharing a ``group_column`` value (near-duplicate images) share a fold.
    The summary's ``calibration`` then lists one calibration per fold.

    ``embedding_cache`` keeps image embeddings under ``<output_uri>/_embedding_cache/``, keyed by
    model, preprocessing and image bytes, so a later run embeds only new or changed images
    (not with cross-fitting, whose fold models live only for the run).

    ``backend`` "int8" (CPU) or "bf16" runs the image tower faster, where its predictions on the
    catalog's first batch of images agree with fp32's for at least 99% of them; else the run stays
    on fp32. The summary's ``backend`` says what was measured and used.

    ``image_roots`` are folders and ``s3://`` prefixes outside the catalog's own that its images
    may come from, besides the spec's ``image_roots``; a reference elsewhere is an ``image_error``.
    When more than the spec's ``max_transient_image_errors`` share of images is lost to storage or
    network errors, the run fails and publishes nothing: an outage is not a finding.
    """
    if cross_fit == 1 or cross_fit < 0:
        raise ValueError(f"cross_fit must be 0 (off) or at least 2 folds, not {cross_fit}")
    if cross_fit and backend != "fp32":
        raise ValueError("cross-fitting trains its fold models during the run; audit them with the fp32 backend")
    model.check_backend(backend)  # before any work, even for an empty catalog
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    run_id, folder = report.new_run(output_uri, now=started)
    storage.check_writable(output_uri)  # a missing bucket or a read-only role fails now, not after the scoring
    spec = load_spec(spec_uri)
    source = open_catalog(catalog_uri)
    keys, validation = validate_catalog(source, spec, storage.join(output_uri, "_validation_cache"))
    access = sources.catalog_access(catalog_uri, spec, image_roots or ())
    clip = load_model(model_uri)
    backend_check = {"requested": backend, "used": backend}
    if backend != "fp32" and source.rows:
        clip, backend_check = choose_backend(clip, backend, next(source.batches(batch_size)), spec, access)
        logger.info("backend %s: predictions agree with fp32 for %s of %d images checked; using %s", backend,
                    backend_check["agreement"], backend_check["images_checked"], backend_check["used"])
    images_seen = {"scored": 0, "from_cache": 0, "embedded": 0, "lost_to_outages": 0}

    def progress(batch: audit.Batch) -> None:
        images_seen["scored"] += batch.rows.height
        images_seen["from_cache"] += len(batch.cached)
        images_seen["embedded"] += len(batch.to_embed)
        images_seen["lost_to_outages"] += batch.transient
        audit.check_outage(images_seen["lost_to_outages"], source.rows, spec.max_transient_image_errors)
        logger.info("scored %d/%d products (%d images from the cache)", images_seen["scored"], source.rows,
                    images_seen["from_cache"])

    if cross_fit:
        findings, calibration = _cross_fitted(source.read(), clip, spec, k=cross_fit, fold_minutes=fold_minutes,
                                              group_column=group_column, access=access, batch_size=batch_size,
                                              progress=progress)
    else:
        cache = open_cache(output_uri, clip) if embedding_cache else None
        findings, calibration = _findings(source.batches(batch_size), clip, spec, access=access, progress=progress,
                                          cache=cache)
        if cache is not None:
            save_cache(cache)
    run = {"run_id": run_id, "started_at": started.isoformat(), "catalog": catalog_uri, "model": model_uri,
           "model_fingerprint": clip.fingerprint(), "target_precision": spec.target_precision,
           "cross_fit": cross_fit, "calibration": calibration, "images": images_seen, "backend": backend_check}
    summary = report.summarize(findings, products=source.rows, run=run, validation=validation)
    publish(folder, findings, summary, keys, spec, access)
    create_table_artifact(key="clipdq-audit-counts", table=summary["by_attribute"],
                          description=f"Findings per attribute, run {run_id}")
    create_markdown_artifact(key="clipdq-audit-report", markdown=report.markdown(summary, folder),
                             description="Where the audit report is and what it found")
    t = summary["totals"]
    logger.info("%d conflicts, %d gaps, %d invalid values, %d image errors; report: %s",
                t["conflict"], t["gap"], t["invalid_value"], t["image_error"], storage.join(folder, "report.html"))
    return folder
