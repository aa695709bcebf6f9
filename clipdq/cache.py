"""Image embeddings cached by (model fingerprint, preprocessing version, SHA-256 of the image bytes).

A cache is a folder, local or ``s3://``, named after the model and the preprocessing, holding
Parquet files with columns ``sha256`` and ``embedding``. A run reads them once, embeds only the
images it has not seen, and adds its new embeddings as one more file, written whole, so a crash
never leaves a partial file behind and concurrent runs never overwrite each other.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid

import numpy as np
import polars as pl

from clipdq import storage
from clipdq.images import PixelSpec

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when decoding or preprocessing changes the pixels an image gives


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(model_fingerprint: str, pixels: PixelSpec, backend: str = "fp32") -> str:
    """Folder name: the model's fingerprint, a hash of how images become its input, and the image
    tower's backend where it is not fp32 (its embeddings differ slightly)."""
    preprocessing = hashlib.sha256(repr((PREPROCESS_VERSION, pixels)).encode()).hexdigest()[:12]
    return f"model={model_fingerprint}-pre={preprocessing}" + ("" if backend == "fp32" else f"-{backend}")


class EmbeddingCache:
    """The embeddings of one model and preprocessing, by image SHA-256."""

    def __init__(self, folder: str):
        self.folder = folder
        self.known: dict[str, np.ndarray] = {}
        self.new: dict[str, np.ndarray] = {}
        for name in storage.list_files(folder):
            if name.startswith("part-") and name.endswith(".parquet"):
                part = pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(folder, name))))
                self.known.update(zip(part["sha256"].to_list(), part["embedding"].to_numpy()))
        log.info("embedding cache %s: %d embeddings", folder, len(self.known))

    def get(self, sha256: str) -> np.ndarray | None:
        found = self.known.get(sha256)
        return found if found is not None else self.new.get(sha256)

    def add(self, sha256s: list[str], embeddings: np.ndarray) -> None:
        self.new.update(zip(sha256s, embeddings.astype(np.float32)))

    def flush(self) -> str | None:
        """Write the embeddings added since the last flush as one new file; returns its URI."""
        if not self.new:
            return None
        frame = pl.DataFrame({"sha256": list(self.new), "embedding": np.stack(list(self.new.values()))})
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        uri = storage.join(self.folder, f"part-{uuid.uuid4().hex}.parquet")
        storage.write_bytes(uri, buffer.getvalue())
        log.info("embedding cache: %d new embeddings written to %s", len(self.new), uri)
        self.known.update(self.new)
        self.new = {}
        return uri
