"""The audit's batch steps: images prepared ahead of the model, cached embeddings reused."""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from clipdq.io import cache, images
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import scorer, towers
from clipdq.pipeline import audit, embedding


def test_prepared_batches_keep_the_order_and_work_ahead_of_the_consumer():
    frame = pl.DataFrame({"n": range(10)})  # four batches of 3, 3, 3 and 1 rows
    started, workers, changed = [], set(), threading.Condition()

    def prepare(rows):
        with changed:
            started.append(rows["n"][0] // 3)  # which batch
            workers.add(threading.get_ident())
            changed.notify_all()
        return rows

    seen = []
    for held, rows in enumerate(embedding.prepared_batches(audit.batches(frame, 3), prepare, ahead=2)):
        ahead = min(held + 2, 3)
        with changed:  # the model's turn: the next two batches are prepared meanwhile, and no more
            assert changed.wait_for(lambda: ahead in started, timeout=60), f"batch {ahead} not prepared"  # noqa: B023
            assert max(started) == ahead
        seen.append(rows["n"].to_list())

    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert started == [0, 1, 2, 3]  # each batch prepared once, in order
    assert threading.get_ident() not in workers  # in the background ...
    assert not workers & {thread.ident for thread in threading.enumerate()}  # ... by a thread gone once done


def test_scores_of_cached_embeddings_equal_fresh_ones_and_a_failed_first_image_is_kept(
    sample_dir, spec, trained_model_dir, tmp_path
):
    clip = towers.load_model(str(trained_model_dir), device="cpu")
    frame = read_catalog(str(sample_dir / "catalog.parquet"))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("missing.jpg")).otherwise(pl.col("image")).alias("image")
    )
    store = cache.EmbeddingCache(str(tmp_path / "cache"))
    options = {"scorer": scorer.of_clip(clip, spec), "cache": store}

    def run() -> tuple[pl.DataFrame, list[embedding.Batch]]:
        prepared = [
            embedding.prepare_batch(
                rows, spec=spec, access=access_for(str(sample_dir)), pixels=clip.pixels, cache=store
            )
            for rows in audit.batches(frame, 16)
        ]
        return pl.concat([audit.score_batch(batch, **options) for batch in prepared]), prepared

    fresh, first = run()
    store.flush()
    cached, second = run()

    assert_frame_equal(fresh, cached, check_exact=False, rel_tol=1e-6)  # same inputs, other memory layout
    assert sum(len(b.to_embed) for b in first) == sum(len(b.cached) for b in second) > 0
    assert sum(len(b.to_embed) for b in second) == 0
    assert sum(b.unread for b in second) == sum(len(b.cached) for b in second)  # unchanged files: not read again
    first_row = fresh.filter(pl.col("product_id") == frame["product_id"][0])
    assert first_row["image_error"].to_list() == ["image file not found"] * first_row.height
    assert first_row["predicted_value"].is_null().all()
    assert np.isfinite(cached["confidence"].drop_nulls().to_numpy()).all()


def test_a_faster_backend_is_used_only_where_it_agrees_with_fp32(sample_dir, spec, trained_model_dir):
    clip = towers.load_model(str(trained_model_dir), device="cpu")
    rows = read_catalog(str(sample_dir / "catalog.parquet")).head(24)
    options = {"spec": spec, "access": access_for(str(sample_dir))}

    fast, used = audit.choose_backend(clip, "int8", rows, **options, min_agreement=0.0)
    kept, refused = audit.choose_backend(clip, "int8", rows, **options, min_agreement=1.01)
    unreadable, unchecked = audit.choose_backend(
        clip, "int8", rows.with_columns(image=pl.lit("nope.jpg")), **options, min_agreement=0.0
    )

    readable = images.load_images(rows["image"].to_list(), access_for(str(sample_dir)), clip.pixels).ok.sum()
    assert used["images_checked"] == refused["images_checked"] == readable > 0
    assert 0.9 <= used["agreement"] == refused["agreement"] <= 1.0
    assert (fast.backend, used["used"]) == ("int8", "int8")
    assert kept is clip and refused["used"] == "fp32"
    assert unreadable is clip and unchecked == {
        "requested": "int8",
        "used": "fp32",
        "agreement": None,
        "images_checked": 0,
    }
