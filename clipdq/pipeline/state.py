"""What a shard keeps from one night to the next, its *state*, so that a rerun of the shard reads
O(shard), never O(cache), and does per row only what changed.

A shard's state is a folder of Parquet parts, one row per product whose image is a file or object
that decoded (STATE_SCHEMA): where its image
was read and at which version, the image's digest, embedding and pixel signature, a hash of the
row's catalog cells, the key of what judged it (``judge``: the spec), and its findings and text
score. A rerun (``shards.run_shard``) reads the light columns (no embeddings, no signatures) and
sorts each row into one of three:

- *reused*: same image location and version, same cells, same judge: its findings are copied
  (a row whose image failed is never kept: it may have failed for a passing reason);
- *rescored*: same image, other cells or another judge: scored again from its kept embedding;
- *fresh*: anything else, embedded through the digest-keyed cache (images that moved between
  shards, inline bytes and URLs are found there by the bytes' digest).

Parts are named by a sequence number and a random suffix (two runs at once never overwrite each
other's; every row says what it was judged on, so a state shared by accident stays correct). A
*base* holds every product of the shard, a *delta* the rows that changed since; a reader takes the
latest base and the deltas after it, a product's last row winning. Nothing is written when nothing
changed, a delta when few rows did, a new base (then the older parts are deleted) when many did or
deltas pile up. A part is written whole under a new name, so a crash leaves the state as it was, or
with one more complete part.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clipdq.checks.schemas import FINDINGS_SCHEMA, TEXTS_SCHEMA
from clipdq.core import values
from clipdq.io import storage

log = logging.getLogger(__name__)

STATE_VERSION = 1  # raise when what a state row means changes, so old states are not read
DELTA_SHARE = 0.25  # deltas past this share of a shard's rows are folded into a new base
BASE_KEY = b"clipdq_base"  # Parquet metadata of a part: "1" for a base, "0" for a delta

FINDING_FIELDS = [name for name in FINDINGS_SCHEMA if name != "product_id"]
TEXT_FIELDS = [name for name in TEXTS_SCHEMA if name != "product_id"]
FINDING = pl.Struct({name: FINDINGS_SCHEMA[name] for name in FINDING_FIELDS})
TEXT = pl.Struct({name: TEXTS_SCHEMA[name] for name in TEXT_FIELDS})
LIGHT_SCHEMA = pl.Schema(
    {
        "product_id": pl.String(),
        "location": pl.String(),  # where the image was read (``sources.versions``)
        "version": pl.String(),  # its version then
        "cells": pl.UInt64(),  # hash of the row's catalog cells (``cells``)
        "judge": pl.String(),  # what judged the findings (``judge_key``)
        "sha256": pl.String(),  # digest of the image bytes
        "findings": pl.List(FINDING),  # in the order the comparison gave them
        "text": TEXT,  # null where the row has no text
    }
)
STATE_SCHEMA = pl.Schema({**LIGHT_SCHEMA, "embedding": pl.List(pl.Float32()), "signature": pl.Binary()})


def judge_key(spec_text: str) -> str:
    """What decides a row's findings besides its cells and its image (the model is in the state's folder name)."""
    return hashlib.sha256(f"{STATE_VERSION}\0{spec_text}".encode()).hexdigest()[:16]


def cells(rows: pl.DataFrame) -> pl.Series:
    """(UInt64) a hash of each row's catalog cells: equal cells, equal hash (within a polars version)."""
    return values.row_hashes(rows).alias("cells")


def shard_folder(root: str, index: int) -> str:
    return storage.join(root, f"shard-{index:05d}")


@dataclass(frozen=True)
class Parts:
    """The parts of a shard's state that count: the latest base and the deltas after it."""

    folder: str
    names: tuple[str, ...]  # oldest first
    delta_rows: int  # rows in the deltas
    stale: tuple[str, ...]  # older parts, superseded by the base

    @classmethod
    def of(cls, folder: str) -> Parts:
        names = sorted(name for name in storage.list_files(folder) if name.endswith(".parquet"))
        footers = {name: _footer(storage.join(folder, name)) for name in names}
        readable = {name: meta for name, meta in footers.items() if meta is not None}
        bases = [name for name, meta in readable.items() if (meta.metadata or {}).get(BASE_KEY) == b"1"]
        if not bases:  # nothing counts
            return cls(folder, (), 0, tuple(names))
        current = [name for name in readable if name >= bases[-1]]
        delta_rows = sum(readable[name].num_rows for name in current[1:])
        return cls(folder, tuple(current), delta_rows, tuple(name for name in names if name not in current))

    def read(self, columns: list[str]) -> pl.DataFrame:
        """``columns`` of each product's latest row (in no particular order)."""
        frames = [pl.DataFrame(schema={name: STATE_SCHEMA[name] for name in columns})]
        for name in self.names:
            stream, _ = storage.open_read(storage.join(self.folder, name))
            with stream:
                frames.append(pl.DataFrame(pq.ParquetFile(stream).read(columns=columns)).cast(frames[0].schema))
        return pl.concat(frames).unique("product_id", keep="last")

    def write(self, frame: pl.DataFrame, *, base: bool) -> None:
        """``frame`` (STATE_SCHEMA) as the next part; a base makes every older part stale and deletes it."""
        number = int(self.names[-1].split("-")[0]) + 1 if self.names else 0
        table = frame.select(STATE_SCHEMA.names()).cast(STATE_SCHEMA).to_arrow()
        buffer = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({BASE_KEY: b"1" if base else b"0"}), buffer)
        name = f"{number:08d}-{uuid.uuid4().hex[:8]}.parquet"  # two runs at once never overwrite each other
        storage.write_bytes(storage.join(self.folder, name), buffer.getvalue().to_pybytes(), create_only=True)
        for name in (*self.stale, *self.names) if base else ():
            storage.delete(storage.join(self.folder, name))


def _footer(uri: str) -> pq.FileMetaData | None:
    try:
        stream, _ = storage.open_read(uri)
        with stream:
            return pq.read_metadata(stream)
    except (OSError, pa.ArrowException) as error:
        log.warning("shard state part %s cannot be read (%s): ignored", uri, error)
        return None
