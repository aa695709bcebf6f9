"""The embedding cache: keyed by model, preprocessing and image bytes; new entries written whole."""

from __future__ import annotations

import numpy as np
import pytest

from clipdq import cache, storage
from clipdq.images import PixelSpec

PIXELS = PixelSpec(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_entries_survive_a_reload_and_only_new_ones_are_written(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    folder = storage.join(root, "cache", cache.cache_key("abc", PIXELS))
    rng = np.random.default_rng(0)
    first = rng.normal(size=(3, 8)).astype(np.float32)

    store = cache.EmbeddingCache(folder)
    assert store.get("a") is None and store.flush() is None  # empty, nothing to write
    store.add(["a", "b", "c"], first)
    written = store.flush()

    again = cache.EmbeddingCache(folder)
    np.testing.assert_array_equal(again.get("b"), first[1])
    again.add(["d"], first[:1] * 2)
    second = again.flush()
    assert sorted(storage.list_files(folder)) == sorted([written.rsplit("/", 1)[1], second.rsplit("/", 1)[1]])
    assert len(cache.EmbeddingCache(folder).known) == 4


def test_the_key_changes_with_the_model_and_with_preprocessing():
    other_pixels = PixelSpec(224, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    keys = {cache.cache_key("abc", PIXELS), cache.cache_key("abd", PIXELS), cache.cache_key("abc", other_pixels)}
    assert len(keys) == 3
    assert cache.cache_key("abc", PIXELS) == cache.cache_key("abc", PIXELS)
    assert cache.digest(b"x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
