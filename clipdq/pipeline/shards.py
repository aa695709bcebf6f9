"""The audit in shards: a catalog cut into row ranges along its row groups, each scored by one plain
call, ``run_shard``, that any process can run (a thread here, a Dask worker elsewhere).

A shard reads its state from the last night (``state``), reuses the findings of its unchanged rows
and scores the others (``reuse``: the model loads once per process, only where an image must be
embedded), keeps what changed in its state, and writes its images' digests (their pixel signatures,
for duplicate listings, stay in the state) and its texts' scores (judged once every shard is done),
then its findings as one part with its counts. A part already written is reused, so a run killed
at any point resumes from its finished shards when the same command runs again; the work folder is
named after everything that decides the findings, so a changed catalog, spec, model or option
starts afresh. Only a ``Job`` (URIs and options), ``Shard``s and small ``ShardResult``s cross a
process boundary, never a model or pixels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clipdq.checks.schemas import FINDINGS_SCHEMA, TEXTS_SCHEMA
from clipdq.core.options import Backend
from clipdq.core.spec import parse_spec
from clipdq.io import catalog, sources, storage
from clipdq.io.cache import EmbeddingCache
from clipdq.io.images import SignatureFile
from clipdq.model import scorer
from clipdq.pipeline import audit, embedding, reuse, state
from clipdq.pipeline.embedding import Tally

log = logging.getLogger(__name__)

PARTS_VERSION = 3  # raise when what a shard writes changes, so old parts are not reused
COUNTS_KEY = b"clipdq_counts"  # Parquet metadata of a part: its image counts, as JSON


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row
    stop: int  # one past the last row

    @property
    def row_count(self) -> int:
        return self.stop - self.start


def plan(group_rows: list[int], *, rows_per_shard: int) -> list[Shard]:
    """Consecutive row groups (``group_rows`` rows each) gathered into shards of at most
    ``rows_per_shard`` rows; a larger row group is cut into ranges, each of which reads it whole."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, not {rows_per_shard}")
    ranges, start, end = [], 0, 0
    for rows in group_rows:
        if end > start and (end - start + rows > rows_per_shard or rows > rows_per_shard):
            ranges.append((start, end))
            start = end
        if rows > rows_per_shard:
            ranges += [(lo, min(lo + rows_per_shard, end + rows)) for lo in range(end, end + rows, rows_per_shard)]
            start = end + rows
        end += rows
    if end > start:
        ranges.append((start, end))
    return [Shard(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]


@dataclass(frozen=True)
class Job:
    """What every shard of one audit needs, as URIs and options."""

    catalog_uri: str
    catalog_version: str  # a shard refuses a catalog rewritten since the run began
    catalog_rows: int  # an outage is a share of the catalog's images, not of a shard's
    spec_text: str
    model_uri: str
    backend: Backend  # the image tower's backend the run chose
    work: str  # folder of the shards' parts
    cache: str | None = None  # embedding cache folder, None to embed every image
    state: str | None = None  # folder of the shards' states (``state``), None to keep none
    image_roots: tuple[str, ...] = ()
    batch_size: int = 64


def new_job(output_uri: str, *, model_fingerprint: str, rows_per_shard: int, **fields) -> Job:
    """A Job with its work folder at ``<output>/_shards/<key>``, the key a hash of everything that
    decides its shards' findings, so only the same audit of the same inputs reuses its parts."""
    payload = json.dumps([PARTS_VERSION, model_fingerprint, rows_per_shard, sorted(fields.items())], default=str)
    work = storage.join(output_uri, "_shards", hashlib.sha256(payload.encode()).hexdigest()[:16])
    return Job(work=work, **fields)


def job_for(inputs: audit.AuditInputs, *, backend: Backend) -> Job:
    """The Job of an audit of ``inputs`` with its image tower on ``backend``."""
    options, files = inputs.options, inputs.files
    cache = embedding.cache_folder(inputs.output_uri, files, backend) if options.embedding_cache else None
    return new_job(
        inputs.output_uri,
        model_fingerprint=files.fingerprint(),
        rows_per_shard=options.rows_per_shard,
        catalog_uri=inputs.catalog_uri,
        catalog_version=inputs.source.version,
        catalog_rows=inputs.source.row_count,
        spec_text=inputs.spec_text,
        model_uri=inputs.model_uri,
        backend=backend,
        cache=cache,
        state=state_folder(inputs.output_uri, cache) if cache else None,
        image_roots=tuple(sorted(options.image_roots)),
        batch_size=options.batch_size,
    )


def state_folder(output_uri: str, cache: str) -> str:
    """Where the shards of audits with the embeddings kept in ``cache`` keep their state:
    ``<output>/_state/<model and preprocessing>``, shard by shard. Rows are matched by product id, so
    a catalog read from a new path (a nightly export under a new name) finds its rows' states."""
    return storage.join(output_uri, "_state", cache.rstrip("/").rsplit("/", 1)[-1])


@dataclass(frozen=True)
class ShardResult:
    index: int
    part: str  # URI of the findings part
    images: str  # URI of its images' ids, digests and signatures (embedding.IMAGES_SCHEMA; null: in ``state``)
    texts: str  # URI of its rows' texts and their scores (schemas.TEXTS_SCHEMA)
    counts: dict[str, int]  # embedding.COUNT_KEYS: scored, reused, from_cache, unread, embedded, lost_to_outages
    reused: bool  # written by an earlier, interrupted run
    state: str | None = None  # folder of the shard's state


def part_uri(job: Job, shard: Shard) -> str:
    return storage.join(job.work, f"shard-{shard.index:05d}.parquet")


def images_uri(job: Job, shard: Shard) -> str:
    return storage.join(job.work, f"images-{shard.index:05d}.parquet")


def texts_uri(job: Job, shard: Shard) -> str:
    return storage.join(job.work, f"texts-{shard.index:05d}.parquet")


@functools.lru_cache(maxsize=1)
def scorer_for(job: Job) -> scorer.Scorer:
    """The job's scorer, made once per process: the model itself loads only if an image needs it."""
    return scorer.of_files(job.model_uri, parse_spec(job.spec_text), backend=job.backend, text_folder=job.cache)


def run_shard(job: Job, shard: Shard) -> ShardResult:
    """Score one shard's rows and write its findings part, or reuse the part an earlier run wrote.
    With a state, rows unchanged since the last night reuse their findings (``reuse``) and the
    state keeps what changed."""
    part, folder = part_uri(job, shard), state.shard_folder(job.state, shard.index) if job.state else None
    counts = read_counts(part)
    if counts is not None:
        log.info("shard %d: finished by an earlier run, reusing %s", shard.index, part)
        return ShardResult(shard.index, part, images_uri(job, shard), texts_uri(job, shard), counts, True, folder)
    counts = _score(job, shard, part, folder)
    release_memory()
    return ShardResult(shard.index, part, images_uri(job, shard), texts_uri(job, shard), counts, False, folder)


def _score(job: Job, shard: Shard, part: str, folder: str | None) -> dict[str, int]:
    """``run_shard``'s scoring: its parts and state written; returns its counts."""
    use = scorer_for(job)
    source = catalog.CatalogFile(job.catalog_uri, version=job.catalog_version)
    cache = EmbeddingCache(job.cache) if job.cache else None
    tally = Tally(
        shard.row_count,
        max_transient=use.spec.max_transient_image_errors,
        what=f"shard {shard.index}",
        catalog_rows=job.catalog_rows,
        keep_images=False,
    )
    kept = state.Parts.of(folder) if folder else None
    judged = reuse.judge_rows(
        pl.concat(source.batches_between(shard.start, shard.stop, 1 << 16)),
        kept=kept,
        judge=state.judge_key(job.spec_text),
        scorer=use,
        access=sources.catalog_access(job.catalog_uri, use.spec, job.image_roots),
        cache=cache,
        tally=tally,
        batch_size=job.batch_size,
    )
    if kept is not None:
        keep(kept, judged, cache)
    if cache is not None:
        cache.flush()  # before the part: a finished part's embeddings are kept
    counts = dict(tally.counts)
    write_parquet(images_uri(job, shard), judged.images(kept=kept is not None).to_arrow())
    write_parquet(texts_uri(job, shard), judged.texts().to_arrow())
    write_part(part, judged.findings(), counts)
    return counts


def release_memory() -> None:
    """Hand the memory a shard freed back to the OS where the C library is glibc: it keeps freed
    heap pages of the threads that read and embedded the shard, and a first run's peak RSS grew by
    about 45 MB a shard of 20,000 rows without this (flat with it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: nothing to do
        pass


def keep(kept: state.Parts, judged: reuse.Judged, cache: EmbeddingCache | None) -> None:
    """What changed in a shard, into its state: nothing, a delta, or a new base where deltas would
    pass ``state.DELTA_SHARE`` of its rows; the embeddings a new base drops (products gone from the
    shard, images replaced) go to the digest-keyed cache, where a product that moved finds its own."""
    changed = judged.changed
    if cache is not None:  # the state keeps these (a failed image is read again anyway): not twice
        cache.forget(changed["sha256"].to_list(), judged.scored["location"].drop_nulls().to_list())
    if not changed.height:
        return
    if kept.names and changed.height + kept.delta_rows <= state.DELTA_SHARE * judged.rows.height:
        kept.write(changed, base=False)
        return
    old = kept.read(state.STATE_SCHEMA.names()) if kept.names else pl.DataFrame(schema=state.STATE_SCHEMA)
    same = judged.rows.select("product_id", "sha256").join(changed.select("product_id"), on="product_id", how="anti")
    base = pl.concat([old.join(same, on=["product_id", "sha256"], how="semi"), changed.select(old.columns)])
    dropped = old.join(base, on=["product_id", "sha256"], how="anti")
    if cache is not None and dropped.height:
        cache.add(dropped["sha256"].to_list(), reuse.embeddings(dropped), dropped["signature"].to_list())
        cache.add_locations(dropped.select("location", "version", "sha256").iter_rows())
    kept.write(base, base=True)


def write_part(uri: str, findings: pl.DataFrame, counts: dict[str, int]) -> None:
    write_parquet(uri, findings.to_arrow().replace_schema_metadata({COUNTS_KEY: json.dumps(counts).encode()}))


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes())  # whole, renamed or PUT into place


def read_counts(uri: str) -> dict[str, int] | None:
    """The counts of a finished part, or None where there is none (or it cannot be read)."""
    try:
        stream, _ = storage.open_read(uri)
        with stream:
            meta = pq.read_metadata(stream).metadata or {}
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as error:
        log.warning("shard part %s cannot be read (%s): scoring its rows again", uri, error)
        return None
    return json.loads(meta[COUNTS_KEY]) if COUNTS_KEY in meta else None


def assemble(parts: list[str], dest: str, texts: list[str], judge: Callable[[pl.DataFrame], pl.DataFrame]) -> int:
    """The parts, in order, then the findings ``judge`` makes of each texts part (of products the
    parts report), as one Parquet file at the local path ``dest``, holding one part in memory at a
    time; returns the products it reports, counted part by part (shards never share a product:
    their rows differ and ids are unique)."""
    schema = pl.DataFrame(schema=FINDINGS_SCHEMA).to_arrow().schema
    products = 0
    with pq.ParquetWriter(dest, schema) as writer:
        for part in read_parts(parts, FINDINGS_SCHEMA):
            writer.write_table(part.to_arrow().cast(schema))
            products += part["product_id"].n_unique()
        for part in read_parts(texts, TEXTS_SCHEMA):
            writer.write_table(judge(part).to_arrow().cast(schema))
    return products


def totals(results: list[ShardResult]) -> dict[str, int]:
    """The image counts of a run, summed over its shards."""
    summed: Counter[str] = Counter()
    for result in results:
        summed.update(result.counts)
    return {key: summed[key] for key in embedding.COUNT_KEYS}


def read_images(results: list[ShardResult]) -> pl.DataFrame:
    """product_id and sha256 of the usable images of a run's shards, in order."""
    schema = pl.Schema({"product_id": pl.String, "sha256": pl.String})
    return pl.concat([pl.DataFrame(schema=schema), *read_parts([result.images for result in results], schema)])


def write_signatures(results: list[ShardResult], dest: str) -> SignatureFile:
    """The signatures of the usable images of a run's shards, in order (``read_images``), in the
    local file ``dest``, written shard by shard from the images parts and, where a part leaves them
    null, the shard's state, so the signatures of a million images (3 GB) are never in memory at once."""
    rows = 0
    with open(dest, "wb") as out:
        for result, part in zip(results, read_parts([result.images for result in results], embedding.IMAGES_SCHEMA)):
            if part["signature"].null_count() and result.state:
                kept = state.Parts.of(result.state).read(["product_id", "sha256", "signature"])
                part = part.join(kept, on=["product_id", "sha256"], how="left", maintain_order="left").select(
                    "product_id", "sha256", pl.coalesce("signature", "signature_right").alias("signature")
                )
            out.write(embedding.signature_rows(part).data)  # (its buffer: no copy)
            rows += part.height
    return SignatureFile(dest, rows)


def read_parts(parts: list[str], schema: pl.Schema) -> Iterator[pl.DataFrame]:
    """Each of the parts (findings, images, texts) of a run's shards, in order: its columns of
    ``schema``, read alone (``pq.read_table`` would import pyarrow.dataset, and that pandas: a
    second of a rerun)."""
    for uri in parts:
        stream, _ = storage.open_read(uri)
        with stream:
            yield pl.DataFrame(pq.ParquetFile(stream).read(columns=schema.names())).cast(schema)


def collect(results: list[ShardResult], inputs: audit.AuditInputs, findings_file: str) -> audit.Scored:
    """The run's shards, scored, as one audit: their image counts summed (an outage fails the run
    here too), the texts judged once all are scored, the parts joined into the local Parquet file
    ``findings_file``, the usable images' signatures in a file beside it."""
    spec, files = inputs.spec, inputs.files
    images_seen = totals(results)
    embedding.check_outage(images_seen["lost_to_outages"], inputs.source.row_count, spec.max_transient_image_errors)
    texts = [result.texts for result in results]
    text_calibration = scorer.text_calibration_for(files, spec)
    score_parts = read_parts(texts, pl.Schema({"score": pl.Float64}))  # the column alone: judged below, part by part
    scores = np.concatenate([np.zeros(0), *(part["score"].drop_nulls().to_numpy() for part in score_parts)])
    judge, judged = audit.text_judge(scores, text_calibration, spec)
    reported = assemble([result.part for result in results], findings_file, texts, judge)
    signatures = functools.partial(write_signatures, results, str(Path(findings_file).with_name("signatures")))
    seen = {
        "count": len(results),
        "rows_per_shard": inputs.options.rows_per_shard,
        "reused": sum(result.reused for result in results),
    }
    return audit.Scored(
        findings_file,
        read_images(results),
        signatures,
        images_seen,
        [scorer.calibration_for(files, spec)],
        text_calibration,
        judged,
        reported,
        seen,
    )
