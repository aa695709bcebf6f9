"""Image embeddings cached by (model fingerprint, preprocessing version, SHA-256 of the image bytes),
and the image locations whose bytes are known not to have changed since they were embedded.

A cache is a folder, local or ``s3://``, named after the model and the preprocessing, with two
tables of Parquet parts, each part sorted by its key and written whole (a crash never leaves a
partial part; concurrent writers never overwrite each other):

- ``embeddings/``: ``sha256``, ``embedding``, ``signature`` (the image's pixel signature);
- ``locations/``: ``location`` (where an image was read), ``version`` (its size and modification
  time, or its S3 ETag) and ``sha256``: an image whose location still has that version is not
  read again.

A lookup reads the parts' footers once, then only the row groups whose key range holds a wanted
key: the cache is never loaded whole. A part that cannot be read is skipped with a warning (its
images are embedded again), and ``compact`` merges small parts into one.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import uuid
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clipdq.io import storage
from clipdq.io.images import PixelSpec

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # bump when decoding or preprocessing changes the pixels an image gives
ROW_GROUP_ROWS = 256  # rows a lookup reads at least per wanted key: small groups, little read for a few keys
SMALL_PART_ROWS = 100_000  # parts below this are merged by ``compact``, at most this many rows at a time
COMPACT_AT_PARTS = 8  # ``compact`` merges once a table has this many small parts


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(model_fingerprint: str, pixels: PixelSpec, backend: str = "fp32", view: tuple = ()) -> str:
    """Folder name: the model's fingerprint, a hash of how images become its input (``pixels``, and
    the ``view`` its training chose: ``ModelFiles.view``), and the image tower's backend where it is
    not fp32 (its embeddings differ slightly)."""
    preprocessing = hashlib.sha256(repr((PREPROCESS_VERSION, pixels, *view)).encode()).hexdigest()[:12]
    return f"model={model_fingerprint}-pre={preprocessing}" + ("" if backend == "fp32" else f"-{backend}")


class Entry(NamedTuple):
    embedding: np.ndarray  # (d,) float32
    signature: bytes  # images.signature of the image


class PartIndex(NamedTuple):
    rows: int
    ranges: list[tuple[str, str]]  # (min, max) key of each row group


class SortedParts:
    """A table of Parquet parts under ``folder``, each sorted by the string column ``key``."""

    def __init__(self, folder: str, key: str):
        self.folder, self.key = folder, key
        self._index: dict[str, PartIndex] | None = None

    def parts(self) -> dict[str, PartIndex]:
        """Readable parts, their rows and their row groups' key ranges, read from the footers once."""
        if self._index is None:
            names = [n for n in storage.list_files(self.folder) if n.startswith("part-") and n.endswith(".parquet")]
            found = ((name, self._read_index(storage.join(self.folder, name))) for name in names)
            self._index = {name: index for name, index in found if index is not None}
        return self._index

    def _read_index(self, uri: str) -> PartIndex | None:
        try:
            meta = self._open(uri).metadata
            column = meta.schema.names.index(self.key)
            stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            return PartIndex(meta.num_rows, [(s.min, s.max) for s in stats])
        except (OSError, ValueError, pa.ArrowException, AttributeError) as error:
            log.warning("skipping unreadable cache part %s: %s", uri, error)
            return None

    @staticmethod
    def _open(uri: str) -> pq.ParquetFile:
        return pq.ParquetFile(storage.open_read(uri)[0], pre_buffer=False)

    def lookup(self, keys: Iterable[str]) -> pl.DataFrame:
        """The rows whose key is one of ``keys`` (any order; a key kept twice may appear twice).
        Only the key column of the row groups whose range may hold a key is read first, then whole
        only the groups that do hold one."""
        wanted = sorted(set(keys))
        frames = []
        for name, index in self.parts().items() if wanted else ():
            groups = [g for g, (low, high) in enumerate(index.ranges) if _any_between(wanted, low, high)]
            if not groups:
                continue
            try:
                part = self._open(storage.join(self.folder, name))
                held = [
                    g for g in groups if pl.Series(part.read_row_group(g, [self.key]).column(0)).is_in(wanted).any()
                ]
                table = part.read_row_groups(held) if held else None
            except (OSError, pa.ArrowException) as error:
                log.warning("skipping unreadable cache part %s: %s", name, error)
                continue
            if table is not None:
                frames.append(pl.DataFrame(table).filter(pl.col(self.key).is_in(wanted)))
        return pl.concat(frames) if frames else pl.DataFrame()

    def write(self, frame: pl.DataFrame) -> str:
        """``frame`` as one new part, sorted by the key; returns its URI."""
        buffer = io.BytesIO()
        pq.write_table(frame.sort(self.key).to_arrow(), buffer, row_group_size=ROW_GROUP_ROWS)
        uri = storage.join(self.folder, f"part-{uuid.uuid4().hex}.parquet")
        storage.write_bytes(uri, buffer.getvalue(), create_only=True)
        self._index = None
        return uri

    def compact(self) -> str | None:
        """Merge the smallest parts into one once there are ``COMPACT_AT_PARTS`` small ones (at most
        SMALL_PART_ROWS rows at once, so memory stays bounded); returns the new part's URI. A key in
        several parts is kept once. Large parts stay as they are."""
        sizes = sorted((index.rows, name) for name, index in self.parts().items() if index.rows < SMALL_PART_ROWS)
        if len(sizes) < COMPACT_AT_PARTS:
            return None
        totals = np.cumsum([rows for rows, _ in sizes])  # the smallest first, SMALL_PART_ROWS at most at once
        small = [name for i, ((_, name), total) in enumerate(zip(sizes, totals)) if total <= SMALL_PART_ROWS or i < 2]
        frames = [pl.DataFrame(self._open(storage.join(self.folder, name)).read()) for name in small]
        merged = self.write(pl.concat(frames).unique(self.key, keep="first"))
        for name in small:  # after the merged part is written, so nothing is ever missing
            storage.delete(storage.join(self.folder, name))
        log.info("cache %s: %d small parts merged into %s", self.folder, len(small), merged)
        return merged


def _any_between(wanted: list[str], low: str | None, high: str | None) -> bool:
    """Whether sorted ``wanted`` holds a key in [low, high] (no statistics: assume it may)."""
    if low is None or high is None:
        return True
    i = bisect.bisect_left(wanted, low)
    return i < len(wanted) and wanted[i] <= high


class EmbeddingCache:
    """The embeddings of one model and preprocessing, by image SHA-256, and the image locations
    whose bytes are known. New entries are kept in memory until ``flush``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.embeddings = SortedParts(storage.join(folder, "embeddings"), "sha256")
        self.locations = SortedParts(storage.join(folder, "locations"), "location")
        self.new: dict[str, Entry] = {}
        self.new_locations: dict[str, tuple[str, str]] = {}  # location -> (version, sha256)

    def get_many(self, sha256s: Iterable[str]) -> dict[str, Entry]:
        """sha256 -> embedding and signature of the ones the cache holds."""
        wanted = set(sha256s)
        found = {sha: self.new[sha] for sha in wanted & self.new.keys()}
        kept = self.embeddings.lookup(wanted - found.keys())
        if kept.height:
            found |= {
                sha: Entry(embedding, signature)
                for sha, embedding, signature in zip(
                    kept["sha256"].to_list(), kept["embedding"].to_numpy(), kept["signature"].to_list()
                )
            }
        return found

    def known_digests(self, versions: dict[str, str]) -> dict[str, str]:
        """location -> sha256 of the locations whose recorded version is the one given."""
        kept = self.locations.lookup(versions)
        known = {row[0]: row[2] for row in kept.iter_rows() if versions[row[0]] == row[1]} if kept.height else {}
        return known | {loc: sha for loc, (ver, sha) in self.new_locations.items() if versions.get(loc) == ver}

    def add(self, sha256s: list[str], embeddings: np.ndarray, signatures: list[bytes]) -> None:
        self.new.update(zip(sha256s, map(Entry, embeddings.astype(np.float32), signatures)))

    def forget(self, sha256s: Iterable[str], locations: Iterable[str]) -> None:
        """Drop what was added of ``sha256s`` and ``locations`` (kept elsewhere: a shard's state)."""
        for sha in sha256s:
            self.new.pop(sha, None)
        for location in locations:
            self.new_locations.pop(location, None)

    def add_locations(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """(location, version, sha256) of images read whole."""
        self.new_locations.update((loc, (ver, sha)) for loc, ver, sha in entries)

    def flush(self) -> str | None:
        """Write what was added since the last flush as new parts, merging small parts where they
        pile up; returns the new embeddings part's URI."""
        uri = None
        if self.new:
            entries = list(self.new.values())
            uri = self.embeddings.write(
                pl.DataFrame(
                    {
                        "sha256": list(self.new),
                        "embedding": np.stack([entry.embedding for entry in entries]),
                        "signature": pl.Series([entry.signature for entry in entries], dtype=pl.Binary),
                    }
                )
            )
            log.info("embedding cache: %d new embeddings written to %s", len(self.new), uri)
        if self.new_locations:
            self.locations.write(
                pl.DataFrame(
                    [(loc, ver, sha) for loc, (ver, sha) in self.new_locations.items()],
                    schema={"location": pl.String, "version": pl.String, "sha256": pl.String},
                    orient="row",
                )
            )
        self.new, self.new_locations = {}, {}
        self.embeddings.compact()
        self.locations.compact()
        return uri
