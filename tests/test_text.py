"""Image and text agreement: calibration on planted mismatches, scores per category, findings."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipdq.checks.compare import text_findings
from clipdq.checks.schemas import FINDINGS_SCHEMA, TEXTS_SCHEMA
from clipdq.core import text
from clipdq.core.spec import SpecError, parse_spec
from clipdq.pipeline import audit


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embeddings(rng: np.random.Generator, n: int, products: int, *, noise: float) -> tuple[np.ndarray, ...]:
    """(image_emb, text_emb, texts): each row shows one of ``products``, its text names it."""
    centres = _unit(rng.normal(size=(products, 32)))
    which = rng.integers(products, size=n)
    image_emb = _unit(centres[which] + noise * rng.normal(size=(n, 32)))
    return image_emb, centres[which], np.array([f"product {k}" for k in which], dtype=object)


def test_a_model_that_tells_products_apart_gets_a_threshold_that_keeps_the_promise():
    rng = np.random.default_rng(0)
    image_emb, text_emb, texts = embeddings(rng, 400, 40, noise=0.15)
    categories = np.array(["a", "b"] * 200, dtype=object)

    fitted = text.calibrate(
        image_emb, text_emb, texts, categories, column="title", target_precision=0.9, error_rate=0.1
    )

    assert fitted.threshold is not None and fitted.rows == 400 and fitted.planted_rows == 1200
    assert set(fitted.categories) == {"a", "b"}
    # new rows, 10% of them under another product's text: flags are right and find most
    image_emb, text_emb, texts = embeddings(rng, 1000, 40, noise=0.15)
    wrong = rng.random(1000) < 0.1
    shown = np.where(wrong[:, None], np.roll(text_emb, 1, axis=0), text_emb)
    wrong &= np.roll(texts, 1) != texts
    flagged = fitted.scores(text.row_agreement(image_emb, shown), np.full(1000, "a", dtype=object)) <= fitted.threshold
    assert wrong[flagged].mean() >= 0.9 and flagged[wrong].mean() >= 0.9


def test_a_model_blind_to_the_texts_never_flags():
    rng = np.random.default_rng(1)
    image_emb = _unit(rng.normal(size=(300, 32)))
    text_emb = _unit(rng.normal(size=(300, 32)))  # unrelated to the images
    texts = np.array([f"t{i % 30}" for i in range(300)], dtype=object)

    fitted = text.calibrate(
        image_emb, text_emb, texts, np.full(300, "", dtype=object), column="title", target_precision=0.9, error_rate=0.1
    )

    assert fitted.threshold is None


def test_scores_are_relative_to_the_category_and_small_categories_lean_on_the_whole():
    agreement = np.array([0.9] * 100 + [0.5] * 100 + [0.2, 0.2])
    categories = np.array(["high"] * 100 + ["low"] * 100 + ["rare"] * 2, dtype=object)
    agreement = agreement + np.linspace(-0.01, 0.01, len(agreement))

    centre, spread, fitted = text.fit_categories(agreement, categories)

    shrunk = lambda own, n: (n * own + text.SHRINK_ROWS * centre) / (n + text.SHRINK_ROWS)  # noqa: E731
    assert fitted["high"] == pytest.approx(shrunk(0.9, 100), abs=0.01)
    assert fitted["low"] == pytest.approx(shrunk(0.5, 100), abs=0.01)
    assert fitted["rare"] == pytest.approx(shrunk(0.2, 2), abs=0.01)  # two rows lean on the overall centre
    calibration = text.TextCalibration("title", centre, 0.05, fitted, threshold=-3.0)
    scores = calibration.scores(np.array([0.5, 0.5, 0.5]), np.array(["high", "low", "unseen"], dtype=object))
    assert scores[0] < -3 < scores[1] and scores[2] == pytest.approx((0.5 - centre) / 0.05)
    assert text.TextCalibration.from_dict(calibration.to_dict()) == calibration


def test_planted_pairs_never_pair_a_row_with_its_own_text():
    texts = np.array(["a", "a", "b", "c", "c", "c"], dtype=object)
    images, others = text.planted_pairs(texts, np.random.default_rng(0), per_row=3)
    assert len(images) == 6 * 3 and (texts[images] != texts[others]).all()


def texts_frame(scores: list[float | None], errors: list[str | None] | None = None) -> pl.DataFrame:
    n = len(scores)
    return pl.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(n)],
            "text": [f"title {i}" for i in range(n)],
            "category": ["apparel"] * n,
            "score": scores,
            "image_error": errors or [None] * n,
        },
        schema=TEXTS_SCHEMA,
    )


def test_text_findings_flag_low_scores_and_account_for_every_row_with_a_text():
    calibration = text.TextCalibration("title", 0.8, 0.05, {}, threshold=-4.0, mismatch_score=(-8.0, 2.0))
    texts = texts_frame([0.2, -7.0, None], errors=[None, None, "missing file"])

    found = text_findings(texts, column="title", calibration=calibration)

    assert dict(found.schema) == FINDINGS_SCHEMA
    rows = {r["product_id"]: r for r in found.iter_rows(named=True)}
    assert [rows[p]["status"] for p in ("p0", "p1", "p2")] == ["match", "conflict", "image_error"]
    assert rows["p2"]["detail"] == "missing file" and rows["p1"]["existing_value"] == "title 1"
    assert "may not show this product" in rows["p1"]["detail"] and "apparel" in rows["p1"]["detail"]
    assert rows["p1"]["confidence"] > 0.9 and rows["p0"]["confidence"] > 0.9
    # judged against a catalog whose texts typically score 3.5 lower, -7 is no longer unusual
    assert text_findings(texts, column="title", calibration=calibration, shift=-3.5)["status"][1] == "match"

    blind = text_findings(texts_frame([None, None]), column="title", calibration=None)
    assert blind["status"].to_list() == ["uncertain", "uncertain"]


def test_an_audit_judges_texts_against_its_own_catalog_once_it_has_enough_of_them():
    """Photos from a new session agree with their titles less than validation's did: every score
    drops by 2.5. Judged against validation, right titles would be flagged; against the catalog's
    own median, only the planted mismatches (10%, 3 units below the rest) are."""
    calibration = text.TextCalibration("title", 0.8, 0.05, {}, threshold=-2.0, mismatch_score=(-5.0, 1.0))
    spec = parse_spec("attributes: {color: {values: [red, blue]}}\ntext_column: title\n")
    rng = np.random.default_rng(0)
    right = rng.normal(-2.5, 0.3, 90)
    planted = rng.normal(-5.5, 0.3, 10)
    texts = texts_frame([*right, *planted])

    findings, judged = audit.judge_texts(texts, calibration, spec)

    assert judged["against"] == "this catalog" and judged["catalog_rows"] == 100
    assert judged["catalog_shift"] == pytest.approx(-2.5, abs=0.15)
    flagged = findings["status"].to_numpy() == "conflict"
    assert not flagged[:90].any() and flagged[90:].all()

    few, judged = audit.judge_texts(texts.head(text.MIN_CATALOG_ROWS - 1), calibration, spec)
    assert judged == {"catalog_rows": text.MIN_CATALOG_ROWS - 1, "catalog_shift": 0.0, "against": "validation"}
    assert (few["status"] == "conflict").mean() > 0.5  # too few to know the catalog: validation's centre


def test_the_spec_names_its_text_columns():
    base = "attributes: {color: {values: [red, blue]}}\n"
    spec = parse_spec(base + "text_column: title\ntext_category: product_type\n")
    assert (spec.text_column, spec.text_category) == ("title", "product_type")
    assert parse_spec(base).text_column is None
    with pytest.raises(SpecError, match="text_category needs text_column"):
        parse_spec(base + "text_category: product_type\n")
    with pytest.raises(SpecError, match="text_column"):
        parse_spec(base + "text_column: 3\n")
