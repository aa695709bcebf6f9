"""A shard's rows scored with what its state kept from the last night (``state``): reused rows cost
a join, rescored rows a comparison from their kept embedding, and only fresh rows touch an image.

Vocabulary: ``rows`` are one shard's catalog rows; ``kept`` the state's parts; a *judged* frame has
one row per product, in catalog order, with its findings and text (``state.LIGHT_SCHEMA``) and,
for the rows scored now, the embedding and signature the state keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from clipdq.checks.schemas import FINDINGS_SCHEMA
from clipdq.core.spec import Spec
from clipdq.io import sources
from clipdq.io.cache import EmbeddingCache
from clipdq.io.sources import ImageAccess
from clipdq.model.scorer import Scorer
from clipdq.pipeline import audit, state
from clipdq.pipeline.embedding import JUDGED_ROWS, Batch, Tally, embedded_batches, grouped
from clipdq.pipeline.state import FINDING_FIELDS, LIGHT_SCHEMA, STATE_SCHEMA, TEXT_FIELDS, Parts

HEAVY = ["product_id", "embedding", "signature"]


@dataclass(frozen=True)
class Judged:
    """A shard's rows judged: ``rows`` (LIGHT_SCHEMA, catalog order), ``scored`` (STATE_SCHEMA) the
    ones scored now, in the same order, and how many were reused."""

    rows: pl.DataFrame
    scored: pl.DataFrame
    reused: int

    @property
    def changed(self) -> pl.DataFrame:
        """(STATE_SCHEMA) the rows scored now that a state keeps: a file or object that decoded."""
        return self.scored.filter(pl.col("location").is_not_null() & pl.col("embedding").is_not_null())

    def findings(self) -> pl.DataFrame:
        """(FINDINGS_SCHEMA) the shard's findings, a product's in the order the comparison gave."""
        return self.rows.select("product_id", "findings").explode("findings").unnest("findings").cast(FINDINGS_SCHEMA)

    def texts(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("text").is_not_null()).select("product_id", "text").unnest("text")

    def images(self, *, kept: bool) -> pl.DataFrame:
        """(IMAGES_SCHEMA) the rows whose image is usable, with the signatures of those scored now
        that a state does not keep (all, where none is ``kept``); null for the others."""
        signed = self.scored.filter(pl.col("embedding").is_not_null())
        if kept:
            signed = signed.filter(pl.col("location").is_null())
        usable = self.rows.filter(pl.col("sha256").is_not_null()).select("product_id", "sha256")
        return usable.join(signed.select("product_id", "signature"), on="product_id", how="left", maintain_order="left")


def judge_rows(
    rows: pl.DataFrame,
    *,
    kept: Parts | None,
    judge: str,
    scorer: Scorer,
    access: ImageAccess,
    cache: EmbeddingCache | None,
    tally: Tally,
    batch_size: int,
) -> Judged:
    """Every row of ``rows`` judged: reused where its image, cells and judge are as ``kept``, scored
    again from the kept embedding where only its cells or judge changed, else fetched and embedded."""
    now = _located(rows, scorer.spec, access).with_row_index("row")
    before = kept.read(LIGHT_SCHEMA.names()) if kept else pl.DataFrame(schema=LIGHT_SCHEMA)
    joined = now.join(before, on="product_id", how="left", suffix="_kept", maintain_order="left")
    same_image = (
        pl.col("location").is_not_null()
        & (pl.col("location") == pl.col("location_kept"))
        & (pl.col("version") == pl.col("version_kept"))
    )
    reuse = same_image & (pl.col("cells") == pl.col("cells_kept")) & (pl.col("judge") == judge)
    reused = joined.filter(reuse).select("row", *LIGHT_SCHEMA.names())
    tally.add_reused(reused.height)
    rescore, fresh = joined.filter(same_image & ~reuse), joined.filter(~same_image.fill_null(False))
    columns = pl.Schema({"row": pl.UInt32(), **STATE_SCHEMA})
    scored = pl.concat(
        [
            pl.DataFrame(schema=columns),
            *(
                frame.with_columns(judge=pl.lit(judge)).select(columns.names())
                for frame in (
                    *_rescored(rows[rescore["row"]], rescore, kept, scorer, cache, tally),
                    *_fresh(rows, fresh, access, scorer, cache, tally, batch_size),
                )
            ),
        ]
    ).sort("row")
    judged = pl.concat([reused, scored.select(reused.columns)]).sort("row").drop("row")
    return Judged(judged, scored.drop("row"), reused.height)


def _located(rows: pl.DataFrame, spec: Spec, access: ImageAccess) -> pl.DataFrame:
    """product_id, image location and version (``sources.versions``) and cells of each row."""
    located = sources.versions(rows[spec.image_column].to_list(), access)
    return pl.DataFrame(
        {
            "product_id": rows[spec.id_column].cast(pl.String),
            "location": [where[0] if where else None for where in located],
            "version": [where[1] if where else None for where in located],
            "cells": state.cells(rows),
        },
        schema={name: LIGHT_SCHEMA[name] for name in ("product_id", "location", "version", "cells")},
    )


def embeddings(frame: pl.DataFrame) -> np.ndarray:
    """(rows, d) float32 of the ``embedding`` column (STATE_SCHEMA) of rows that have one."""
    column = frame["embedding"]
    width = len(column[0]) if len(column) else 0
    return column.list.to_array(width).to_numpy().astype(np.float32, copy=False)


def _rescored(
    rows: pl.DataFrame,
    rescore: pl.DataFrame,
    kept: Parts | None,
    scorer: Scorer,
    cache: EmbeddingCache | None,
    tally: Tally,
) -> Iterator[pl.DataFrame]:
    """(row, STATE_SCHEMA) per batch of the rows whose image is the one kept, scored again from its embedding."""
    if kept is None or not rescore.height:
        return
    heavy = rescore.select("row", "product_id", "location", "version", "cells", "sha256").join(
        kept.read(HEAVY), on="product_id", how="left", maintain_order="left"
    )
    for offset in range(0, rows.height, JUDGED_ROWS):  # no image to read: judged as many at once as fresh rows
        part = heavy.slice(offset, JUDGED_ROWS)
        vectors = embeddings(part)
        batch = Batch(
            rows.slice(offset, JUDGED_ROWS),
            [None] * part.height,
            part["sha256"].to_list(),
            dict(enumerate(vectors)),
            np.zeros(0, dtype=int),
            np.zeros((0, 3, 1, 1), dtype=np.float32),
            part["signature"].to_list(),
            unread=part.height,
        )
        tally.add(batch, scorer.spec)
        yield part.hstack(_judged_batch(batch, vectors, scorer, cache))


def _fresh(
    rows: pl.DataFrame,
    fresh: pl.DataFrame,
    access: ImageAccess,
    scorer: Scorer,
    cache: EmbeddingCache | None,
    tally: Tally,
    batch_size: int,
) -> Iterator[pl.DataFrame]:
    """(row, STATE_SCHEMA) per batch of the rows whose image is read now."""
    located = fresh.select("row", "product_id", "location", "version", "cells")
    batches = audit.batches(rows[fresh["row"]], batch_size)
    versions = (  # as judge_rows found them: not asked for again
        [(where, version) if where is not None else None for where, version in zip(part["location"], part["version"])]
        for part in audit.batches(located, batch_size)
    )
    embedded = embedded_batches(batches, scorer=scorer, access=access, cache=cache, located=versions)
    offset = 0
    for batch, embeddings in grouped(embedded):
        full = np.zeros((batch.rows.height, embeddings.shape[1]), np.float32)
        full[batch.ok] = embeddings
        image = pl.DataFrame(
            {
                "sha256": pl.Series(batch.sha256, dtype=pl.String),
                "embedding": pl.Series(full).cast(pl.List(pl.Float32)),
                "signature": pl.Series(batch.signatures, dtype=pl.Binary),
                "usable": batch.ok,
            }
        ).select(pl.when(pl.col("usable")).then(pl.exclude("usable")))  # null where the image failed
        judged = _judged_batch(batch, embeddings, scorer, cache)
        tally.add(batch, scorer.spec)
        yield located.slice(offset, batch.rows.height).hstack(image).hstack(judged)
        offset += batch.rows.height


def _judged_batch(batch: Batch, embeddings: np.ndarray, scorer: Scorer, cache: EmbeddingCache | None) -> pl.DataFrame:
    """(findings, text) of each row of ``batch``, in its order (``audit.judge_batch``, a row each)."""
    findings, texts = audit.judge_batch(batch, embeddings, scorer, cache)
    ids = batch.rows.select(pl.col(scorer.spec.id_column).cast(pl.String).alias("product_id"))
    lists = findings.group_by("product_id", maintain_order=True).agg(pl.struct(*FINDING_FIELDS).alias("findings"))
    texts = texts.select("product_id", pl.struct(*TEXT_FIELDS).alias("text"))
    return (
        ids.join(lists, on="product_id", how="left", maintain_order="left")
        .join(texts, on="product_id", how="left", maintain_order="left")
        .drop("product_id")
    )
