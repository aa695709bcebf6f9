"""Catalog values against image predictions: one finding per product and attribute (polars only)."""

from __future__ import annotations

import numpy as np
import polars as pl

from clipdq.checks.schemas import FINDINGS_SCHEMA, NOT_APPLICABLE
from clipdq.core import values
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec, Tree
from clipdq.core.text import TextCalibration


def _long_catalog(catalog: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """(product_id, attribute, existing_value, canonical, missing) for every attribute that applies
    to a product: its value as given, the vocabulary value it reads as (``values.codes``: null where
    it is invalid or missing) and whether it is missing.

    An attribute applies unless an ``applies_to`` column holds a value outside its list; a
    missing attribute column counts as all values missing.
    """
    leveled, found = values.leveled_codes(catalog, spec)
    parts = []
    for attribute in spec.attributes:
        applies = pl.lit(True)
        for column, allowed in attribute.applies_to.items():
            applies = applies & (pl.col(column).is_null() | pl.col(column).is_in(list(allowed)))
        existing = pl.col(attribute.name) if attribute.name in leveled.columns else pl.lit(None)
        code = found[attribute.name]
        canonical = np.array([*attribute.values, None], dtype=object)[np.where(code >= 0, code, len(attribute.values))]
        parts.append(
            leveled.with_columns(
                pl.Series("__canonical", canonical.tolist(), dtype=pl.String),
                pl.Series("__missing", code == values.MISSING),
            )
            .filter(applies)
            .select(
                pl.col(spec.id_column).cast(pl.String).alias("product_id"),
                pl.lit(attribute.name).alias("attribute"),
                existing.cast(pl.String).alias("existing_value"),
                pl.col("__canonical").alias("canonical"),
                pl.col("__missing").alias("missing"),
            )
        )
    return pl.concat(parts)


def _thresholds(calibration: dict[str, Calibration]) -> pl.DataFrame:
    rows = [(name, c.gap_threshold, c.conflict_threshold) for name, c in calibration.items()]
    schema = {"attribute": pl.String, "gap_threshold": pl.Float64, "conflict_threshold": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _confident(threshold: str) -> pl.Expr:
    """Confidence reaches the threshold; a null threshold means never."""
    return pl.col(threshold).is_not_null() & (pl.col("confidence") >= pl.col(threshold))


def _p(column: str) -> pl.Expr:
    return pl.col(column).round(3).cast(pl.String).fill_null("never")


def _status() -> pl.Expr:
    """Each row's status, from its value (missing, canonical) and its prediction's confidence."""
    missing = pl.col("missing")
    no_prediction = pl.col("predicted_value").is_null()
    return (
        pl.when(missing & pl.col("image_error").is_not_null())
        .then(pl.lit("image_error"))
        .when(missing & no_prediction)
        .then(pl.lit("uncertain"))
        .when(missing & _confident("gap_threshold"))
        .then(pl.lit("gap"))
        .when(missing)
        .then(pl.lit("uncertain"))
        .when(pl.col("canonical").is_null())
        .then(pl.lit("invalid_value"))
        .when(pl.col("image_error").is_not_null() | no_prediction)
        .then(pl.lit("image_error"))
        .when(pl.col("predicted_value") == pl.col("canonical"))
        .then(pl.lit("match"))
        .when(_confident("conflict_threshold"))
        .then(pl.lit("conflict"))
        .otherwise(pl.lit("uncertain"))
    )


def _detail() -> pl.Expr:
    """Why each row has its status, in words."""
    missing = pl.col("missing")
    return (
        pl.when(pl.col("status") == "image_error")
        .then(pl.coalesce("image_error", pl.lit("no prediction for this product")))
        .when(pl.col("status") == "invalid_value")
        .then(pl.format("'{}' is not a known {} value", "existing_value", "attribute"))
        .when(pl.col("status") == "gap")
        .then(pl.format("missing; the image shows '{}' (p={})", "predicted_value", _p("confidence")))
        .when(pl.col("status") == "conflict")
        .then(
            pl.format(
                "catalog says '{}', the image shows '{}' (p={})", "canonical", "predicted_value", _p("confidence")
            )
        )
        .when((pl.col("status") == "uncertain") & missing)
        .then(
            pl.format(
                "missing; best guess '{}' (p={}), threshold to suggest: {}",
                "predicted_value",
                _p("confidence"),
                _p("gap_threshold"),
            )
        )
        .when(pl.col("status") == "uncertain")
        .then(
            pl.format(
                "the image suggests '{}' (p={}), threshold to flag: {}",
                "predicted_value",
                _p("confidence"),
                _p("conflict_threshold"),
            )
        )
        .when(pl.col("existing_value") != pl.col("canonical"))
        .then(pl.format("'{}' read as '{}'", "existing_value", "canonical"))
    )


def compare(
    catalog: pl.DataFrame, predictions: pl.DataFrame, *, spec: Spec, calibration: dict[str, Calibration]
) -> pl.DataFrame:
    """Findings with the columns of FINDINGS_SCHEMA, one row per product and applicable attribute,
    and one ``not_applicable`` row for each product that has no other finding: every product appears.
    (Its text, where the spec names a text column, is judged apart: ``text_findings``.)

    ``predictions`` has the columns of PREDICTIONS_SCHEMA for the same products.
    """
    frame = (
        _long_catalog(catalog, spec)
        .join(predictions, on=["product_id", "attribute"], how="left")
        .join(_thresholds(calibration), on="attribute", how="left")
    )
    findings = (
        frame.with_columns(_status().alias("status"))
        .with_columns(_detail().alias("detail"))
        .select(list(FINDINGS_SCHEMA))
        .cast(FINDINGS_SCHEMA)
    )
    for tree in spec.trees:
        findings = _highest_conflict(findings, tree)
    return pl.concat([findings, _not_applicable(catalog, findings, spec)])


def text_findings(
    texts: pl.DataFrame, *, column: str, calibration: TextCalibration | None, shift: float = 0.0
) -> pl.DataFrame:
    """Findings (FINDINGS_SCHEMA) of image and text agreement, attribute ``column``, for each row
    of ``texts`` (TEXTS_SCHEMA): ``conflict`` where the image may not show the product its text
    describes, ``match`` where they agree, ``uncertain`` where the model cannot tell at the target
    precision. Each score is judged less ``shift``, the audited catalog's typical score.

    Confidence is the chance that the text does not describe the image on a conflict, and that it
    does on the other rows.
    """
    ok = texts["image_error"].is_null().to_numpy()
    score = texts["score"].fill_null(np.nan).to_numpy() - shift
    mismatch = calibration.mismatch_probability(score) if calibration else np.full(len(score), np.nan)
    threshold = None if calibration is None else calibration.threshold
    flagged = np.zeros(len(score), dtype=bool) if threshold is None else ok & (score <= threshold)
    status = np.where(
        ~ok, "image_error", np.where(flagged, "conflict", "match" if threshold is not None else "uncertain")
    )
    named = ok if threshold is None else flagged
    shown = np.full(len(score), "", dtype=object)  # the scores a detail names, as f"{score:.2f}" writes them
    shown[named] = np.char.mod("%.2f", score[named]).tolist()
    frame = pl.DataFrame(
        {
            "product_id": texts["product_id"],
            "attribute": column,
            "existing_value": texts["text"],
            "predicted_value": None,
            "confidence": np.where(flagged, mismatch, 1 - mismatch),
            "status": status,
            "image_error": texts["image_error"],
            "category": texts["category"],
            "shown": pl.Series(shown, dtype=pl.String),
        },
        strict=False,
    )
    detail = _text_detail(column=column, calibration=calibration)
    return (
        frame.with_columns(detail.alias("detail"), pl.col("confidence").fill_nan(None))
        .select(list(FINDINGS_SCHEMA))
        .cast(FINDINGS_SCHEMA)
    )


def _highest_conflict(findings: pl.DataFrame, tree: Tree) -> pl.DataFrame:
    """Each product's conflict with ``tree`` reported at the highest level where it occurs, the
    whole paths in its detail; the deeper levels whose value the image reads otherwise (conflicts,
    and values it is less sure of) become ``parent_conflict``, so the suggested fixes set a path."""
    depth = pl.col("attribute").replace_strict({level: d for d, level in enumerate(tree.levels)}, default=None)
    levels = findings.filter(pl.col("attribute").is_in(tree.levels)).with_columns(depth.alias("depth"))
    path = {
        column: pl.col(column).fill_null("?").sort_by("depth").str.join(tree.separator)
        for column in ("existing_value", "predicted_value")
    }
    per_product = levels.group_by("product_id").agg(
        pl.col("depth").filter(pl.col("status") == "conflict").min().alias("first_conflict"),
        path["existing_value"].alias("catalog_path"),
        path["predicted_value"].alias("image_path"),
    )
    frame = findings.with_columns(depth.alias("depth")).join(per_product, on="product_id", how="left")
    first_level = pl.col("first_conflict").replace_strict(dict(enumerate(tree.levels)), default=None)
    # below the first conflict, every level the image reads otherwise follows from it, however sure:
    # its fix completes the image's path (the choice is a whole path of the tree)
    differs = (pl.col("status") == "conflict") | (
        (pl.col("status") == "uncertain") & (pl.col("existing_value").str.strip_chars() != "")
    )
    below = differs & (pl.col("depth") > pl.col("first_conflict"))
    at = (pl.col("status") == "conflict") & (pl.col("depth") == pl.col("first_conflict"))
    return frame.with_columns(
        pl.when(below).then(pl.lit("parent_conflict")).otherwise("status").alias("status"),
        pl.when(below)
        .then(
            pl.format(
                "follows from the conflict at {}: catalog says '{}', the image shows '{}' (p={})",
                first_level,
                "existing_value",
                "predicted_value",
                _p("confidence"),
            )
        )
        .when(at)
        .then(pl.format("{}; catalog path '{}', the image's '{}'", "detail", "catalog_path", "image_path"))
        .otherwise("detail")
        .alias("detail"),
    ).select(list(FINDINGS_SCHEMA))


def _not_applicable(catalog: pl.DataFrame, findings: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """A row for each product of ``catalog`` that has no finding: no attribute applies to it."""
    ids = catalog.select(pl.col(spec.id_column).cast(pl.String).alias("product_id"))
    return (
        ids.join(findings.select("product_id").unique(), on="product_id", how="anti")
        .with_columns(status=pl.lit(NOT_APPLICABLE), detail=pl.lit("no attribute applies to this product (applies_to)"))
        .with_columns(pl.lit(None).alias(c) for c in ("attribute", "existing_value", "predicted_value", "confidence"))
        .select(list(FINDINGS_SCHEMA))
        .cast(FINDINGS_SCHEMA)
    )


def _text_detail(*, column: str, calibration: TextCalibration | None) -> pl.Expr:
    """Why each text finding is what it is: its image's error, or what the model could judge and
    how (columns of ``text_findings``' frame; ``shown``: the score as the detail writes it)."""
    if calibration is None:
        said = pl.lit(f"the model was not calibrated on {column!r}: image and text agreement is not judged")
    elif calibration.threshold is None:
        said = pl.format("agreement score {}; the model cannot flag mismatched texts at the target precision", "shown")
    else:
        said = pl.when(pl.col("status") == "conflict").then(
            pl.format(
                f"the image may not show this product: it agrees with its {column} unusually little for "
                "{} (score {}, flagged at {} or below)",
                pl.col("category").fill_null("").replace("", "the catalog"),
                "shown",
                pl.lit(f"{calibration.threshold:.2f}"),
            )
        )
    return pl.when(pl.col("status") == "image_error").then("image_error").otherwise(said)
