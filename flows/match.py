"""Prefect flow: match photos (shelf photos, supplier images) with the catalog's products."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from clipdq.checks import match
from clipdq.checks.neighbours import ValueAgreement
from clipdq.core.options import MatchOptions
from clipdq.core.spec import parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.io.cache import EmbeddingCache
from clipdq.model import scorer
from clipdq.pipeline import embedding, matching
from clipdq.reporting import report, runs
from flows.artifacts import announce_match
from flows.inputs import read_model, read_spec
from flows.retries import IO_RETRIES


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def embed_catalog(
    uri: str, spec_text: str, model_uri: str, cache: str | None, options: MatchOptions, role: str
) -> match.Embedded:
    spec = parse_spec(spec_text)
    return matching.embed_catalog(
        catalog.CatalogFile(uri),
        scorer=scorer.of_files(model_uri, spec, text_folder=cache),
        access=sources.catalog_access(uri, spec, options.image_roots),
        cache=EmbeddingCache(cache) if cache else None,
        batch_size=options.batch_size,
        role=role,
    )


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def read_labels(uri: str, id_column: str, label_column: str) -> dict[str, str | None]:
    rows = catalog.CatalogFile(uri).read([id_column, label_column])
    return dict(zip(rows[id_column].cast(pl.String).to_list(), rows[label_column].cast(pl.String).to_list()))


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def read_agreement(
    uri: str, references: match.Embedded, spec_text: str, model_uri: str, cache: str | None, weight: float | None
) -> tuple[ValueAgreement | None, str]:
    return matching.agreement_for(
        catalog.CatalogFile(uri),
        references,
        parse_spec(spec_text),
        model_uri=model_uri,
        text_folder=cache,
        weight=weight,
    )


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def publish(folder: str, matches: pl.DataFrame, summary: dict) -> str:
    return runs.publish(folder, summary, {"matches.parquet": matches}, meta={"kind": "match", "rows": matches.height})


@flow(name="clipdq-match", log_prints=True)
def match_catalogs(
    references_uri: str,
    queries_uri: str,
    spec_uri: str,
    model_uri: str,
    output_uri: str,
    options: MatchOptions = MatchOptions(),
) -> str:
    """Find the nearest catalog products of other photos; returns the run folder holding
    ``matches.parquet`` (query_id, rank from 1, reference_id, score), ``summary.json`` and the
    manifest (written last: the run is complete). The score is the cosine similarity of the image
    embeddings, plus, with a model fine-tuned on the spec, how likely the query shows each
    reference's attribute values (``options.attribute_weight``). A query is never matched with a reference
    image of the same bytes; the summary says how many such pairs were left out, and how many
    matches show near-identical pixels (a resized or re-encoded copy: marked in their detail).

    Args:
        references_uri: The catalog whose products are matched (Parquet, local or s3://): the spec's id
            and image columns.
        queries_uri: The photos to match, a catalog of the same form.
        spec_uri: The spec YAML naming the id and image columns, local or s3://.
        model_uri: The model whose image embeddings are compared: a model folder, an s3:// prefix or a hub id.
        output_uri: The folder or s3:// prefix that receives run folders and the embedding cache.
        options: How matching runs; every field has a default.
    """
    started = datetime.now(UTC)
    run_id, folder = report.new_run(output_uri, now=started)
    storage.check_writable(output_uri)
    spec_text = read_spec(spec_uri)
    spec = parse_spec(spec_text)
    files = read_model(model_uri)
    cache = embedding.cache_folder(output_uri, files, "fp32") if options.embedding_cache else None
    references = embed_catalog(references_uri, spec_text, model_uri, cache, options, "references")
    queries = embed_catalog(queries_uri, spec_text, model_uri, cache, options, "queries")
    agreement, why = read_agreement(references_uri, references, spec_text, model_uri, cache, options.attribute_weight)
    matches, found = matching.ranked(references, queries, spec, options=options, agreement=agreement, cache=cache)
    found["score"]["why"] = why
    summary = {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "references_catalog": references_uri,
        "queries_catalog": queries_uri,
        "model": model_uri,
        "model_fingerprint": files.fingerprint(),
        "options": options.model_dump(),
        **found,
        "accuracy": None,
    }
    if options.label_column:
        summary["accuracy"] = match.accuracy(matches, read_labels(queries_uri, spec.id_column, options.label_column))
    publish(folder, matches, summary)
    announce_match(summary, folder, matches)
    return folder
