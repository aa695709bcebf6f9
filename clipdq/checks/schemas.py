"""The tables that checks write and reports read, as polars schemas: the contracts of a run's files.

Kept free of heavy imports (polars only): reporting reads these without loading torch.
"""

from __future__ import annotations

import polars as pl

STATUSES = ("match", "conflict", "gap", "uncertain", "invalid_value", "image_error", "parent_conflict")
# parent_conflict: a tree level below the level where the catalog's path first conflicts with the image
NOT_APPLICABLE = "not_applicable"  # a product none of the attributes applies to: one row, attribute null

FINDINGS_SCHEMA = pl.Schema(
    {
        "product_id": pl.String,
        "attribute": pl.String,
        "existing_value": pl.String,
        "predicted_value": pl.String,
        "confidence": pl.Float64,
        "status": pl.String,
        "detail": pl.String,
    }
)

PREDICTIONS_SCHEMA = pl.Schema(
    {
        "product_id": pl.String,
        "attribute": pl.String,
        "predicted_value": pl.String,  # null when the image failed
        "confidence": pl.Float64,
        "image_error": pl.String,  # why the image failed, null when it loaded
    }
)


TEXTS_SCHEMA = pl.Schema(
    {  # an audited row with a text, before it is judged (text_findings)
        "product_id": pl.String,
        "text": pl.String,
        "category": pl.String,
        "score": pl.Float64,  # TextCalibration score; null where the image failed or the model has no text calibration
        "image_error": pl.String,  # why the image failed, null when it loaded
    }
)

DUPLICATES_SCHEMA = pl.Schema(
    {
        "group": pl.Int64,
        "product_id": pl.String,
        "group_size": pl.Int32,
        "other_id": pl.String,
        "similarity": pl.Float32,
        "kind": pl.String,
        "crop_area": pl.Float32,
    }
)  # duplicate listings (clipdq.checks.duplicates)

DUPLICATE_SEARCH_SCHEMA = pl.Schema(
    {
        "product_id": pl.String(),
        "sha256": pl.String(),
        "links": pl.List(
            pl.Struct(
                {
                    "other_id": pl.String(),
                    "other_sha256": pl.String(),
                    "similarity": pl.Float32(),
                    "kind": pl.Int64(),  # an index into duplicates.KINDS
                    "area": pl.Float32(),
                }
            )
        ),
    }
)  # a duplicate search's images, each with its links at or above the threshold from its side: kept by the next

MATCHES_SCHEMA = pl.Schema(
    {
        "query_id": pl.String,
        "rank": pl.Int32,
        "reference_id": pl.String,
        "reference_image": pl.String,  # the image of the reference that scored (a product may have several)
        "score": pl.Float32,
        "detail": pl.String,
    }
)
