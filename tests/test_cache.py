"""The embedding cache: keyed by model, preprocessing and image bytes; parts written whole and sorted,
looked up by row group, compacted, and a broken part skipped."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipdq.io import cache, storage
from clipdq.io.images import PixelSpec

PIXELS = PixelSpec(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def signatures(n: int) -> list[bytes]:
    return [bytes([i]) * 12 for i in range(n)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_entries_survive_a_reload_and_only_new_ones_are_written(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    folder = storage.join(root, "cache", cache.cache_key("abc", PIXELS))
    first = vectors(3)

    store = cache.EmbeddingCache(folder)
    assert store.get_many(["a"]) == {} and store.flush() is None  # empty, nothing to write
    store.add(["a", "b", "c"], first, signatures(3))
    written = store.flush()

    again = cache.EmbeddingCache(folder)
    found = again.get_many(["b", "z"])
    assert list(found) == ["b"]
    np.testing.assert_array_equal(found["b"].embedding, first[1])
    assert found["b"].signature == signatures(3)[1]
    again.add(["d"], first[:1] * 2, signatures(1))
    second = again.flush()
    assert storage.list_files(storage.join(folder, "embeddings")) == sorted(
        uri.rsplit("/", 1)[1] for uri in (written, second)
    )
    assert set(cache.EmbeddingCache(folder).get_many("abcdz")) == set("abcd")


def test_a_lookup_reads_only_the_row_groups_that_hold_wanted_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "ROW_GROUP_ROWS", 4)
    store = cache.EmbeddingCache(str(tmp_path))
    keys = [f"{i:04d}" for i in range(40)]  # one part, ten row groups of four keys
    store.add(keys, vectors(40), signatures(40))
    store.flush()
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.append(list(groups)) or original(self, groups, **kw),
    )

    found = cache.EmbeddingCache(str(tmp_path)).get_many(["0005", "0006", "0031"])

    assert sorted(found) == ["0005", "0006", "0031"]
    np.testing.assert_array_equal(found["0031"].embedding, vectors(40)[31])
    assert read == [[1, 7]]  # not the other eight


def test_a_broken_part_is_skipped_with_a_warning(tmp_path, caplog):
    store = cache.EmbeddingCache(str(tmp_path))
    store.add(["a"], vectors(1), signatures(1))
    store.flush()
    (tmp_path / "embeddings" / "part-broken.parquet").write_bytes(b"PAR1 not really")

    with caplog.at_level(logging.WARNING, logger="clipdq.io.cache"):
        found = cache.EmbeddingCache(str(tmp_path)).get_many(["a"])

    assert list(found) == ["a"]
    assert "part-broken.parquet" in caplog.text


def test_small_parts_are_merged_once_they_pile_up(tmp_path):
    for run in range(cache.COMPACT_AT_PARTS):
        store = cache.EmbeddingCache(str(tmp_path))
        store.add([f"run{run}", "shared"], vectors(2, seed=run), signatures(2))
        store.flush()

    names = storage.list_files(str(tmp_path / "embeddings"))
    found = cache.EmbeddingCache(str(tmp_path)).get_many([f"run{run}" for run in range(10)] + ["shared"])

    assert len(names) == 1  # the eighth flush merged all eight parts
    assert pq.read_metadata(tmp_path / "embeddings" / names[0]).num_rows == cache.COMPACT_AT_PARTS + 1  # once each
    assert len(found) == cache.COMPACT_AT_PARTS + 1
    np.testing.assert_array_equal(found["run3"].embedding, vectors(2, seed=3)[0])


def test_a_location_is_known_only_at_the_version_it_was_read(tmp_path):
    store = cache.EmbeddingCache(str(tmp_path))
    store.add_locations([("/img/a.jpg", "10:111", "sha-a"), ("/img/b.jpg", "20:222", "sha-b")])
    assert store.known_digests({"/img/a.jpg": "10:111"}) == {"/img/a.jpg": "sha-a"}  # before the flush, too
    store.flush()

    again = cache.EmbeddingCache(str(tmp_path))
    assert again.known_digests({"/img/a.jpg": "10:111", "/img/b.jpg": "20:999", "/img/c.jpg": "1:1"}) == {
        "/img/a.jpg": "sha-a"
    }


def test_the_key_changes_with_the_model_and_with_preprocessing():
    other_pixels = PixelSpec(224, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    keys = {cache.cache_key("abc", PIXELS), cache.cache_key("abd", PIXELS), cache.cache_key("abc", other_pixels)}
    assert len(keys) == 3
    # a later run, another process, must find the cache: no per-process hash in the key
    code = (
        "from clipdq.io import cache; from clipdq.io.images import PixelSpec; "
        "print(cache.cache_key('abc', PixelSpec(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert other.stdout.strip() == cache.cache_key("abc", PIXELS)
    assert len({cache.cache_key("abc", PIXELS, backend) for backend in ("fp32", "int8", "bf16")}) == 3
    views = {
        cache.cache_key("abc", PIXELS, view=view)
        for view in [
            (),
            (("image_sizes", [208]), ("mirror_average", False)),
            (("image_sizes", [208]), ("mirror_average", True)),
            (("image_sizes", [192, 224, 256]), ("mirror_average", True)),
        ]
    }
    assert len(views) == 4 and cache.cache_key("abc", PIXELS, view=()) == cache.cache_key("abc", PIXELS)
    assert cache.digest(b"x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
