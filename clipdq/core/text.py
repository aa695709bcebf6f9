"""Image and text agreement: does a product's image show what its title says? (numpy; polars reads the texts)

Vocabulary: ``agreement`` (n,) is the cosine of each image's embedding with its own text's
embedding; ``categories`` (n,) the group each row belongs to (a catalog column's value, "" where
it has none). A text is judged against its category's typical agreement: its ``score`` is
(agreement - its category's centre) / spread, fitted on validation rows whose texts are right:
each category's median agreement, shrunk towards the overall median where it has few rows, and
one spread (scaled MAD) for all, which a category's few rows would estimate poorly (on the
Grocery Store photos, one seed, a spread per coarse class cut precision on other sessions from 0.93 to 0.72).
An audit then judges each score against the audited catalog's own typical score
(``catalog_shift``): photos from other sessions than validation's agree with their texts
differently, and most texts in a catalog are right (on the Grocery Store photos, three seeds,
pooled precision on other sessions rose from 0.86 to 0.96, recall fell from 0.77 to 0.42).
A row is flagged where its score, less that shift, falls to the threshold or below.

The threshold is calibrated like the attribute flags: each validation image is also paired with
the text of other validation products (planted mismatches), and the threshold is the highest
whose lower confidence bound of precision, at the spec's expected error rate, meets the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from clipdq.core.predict import BOUND_Z, MIN_SUPPORT, accuracy_lower_bound
from clipdq.core.spec import Spec

SHRINK_ROWS = 50  # a category's own median weighs as much as this many rows of the overall one
PLANTED_PER_ROW = 3  # mismatched texts paired with each validation image
MIN_CATALOG_ROWS = 50  # scored texts an audit needs before it judges them against its own catalog


@dataclass(frozen=True)
class TextCalibration:
    """How agreement scores become trusted "the image may not show this product" flags."""

    column: str  # the catalog column whose texts it was fitted on
    centre: float  # typical agreement of an image with its own text, over all categories
    spread: float  # scaled MAD of that agreement, the unit of scores
    categories: dict[str, float] = field(default_factory=dict)  # category -> its typical agreement
    threshold: float | None = None  # flag where score <= threshold; None: never
    rows: int = 0  # validation rows with their own text: the evidence behind the threshold
    planted_rows: int = 0  # validation images paired with another product's text
    mismatch_score: tuple[float, float] = (-3.0, 1.0)  # mean and std of the planted rows' scores
    error_rate: float = 0.1  # prior share of mismatched texts the flags' precision assumes

    def scores(self, agreement: np.ndarray, categories: np.ndarray) -> np.ndarray:
        centre = np.array([self.categories.get(str(c), self.centre) for c in categories], dtype=float)
        return (agreement - centre) / self.spread

    def mismatch_probability(self, scores: np.ndarray) -> np.ndarray:
        """Chance that a text with this score does not describe its image, from a normal fit of
        the scores of right texts and of planted mismatches, at the prior ``error_rate``."""
        own = _normal(scores, 0.0, 1.0) * (1 - self.error_rate)
        planted = _normal(scores, *self.mismatch_score) * self.error_rate
        return planted / (own + planted + 1e-300)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TextCalibration:
        return cls(**(raw | {"mismatch_score": tuple(raw.get("mismatch_score", (-3.0, 1.0)))}))


def catalog_shift(scores: np.ndarray) -> float | None:
    """How far the audited catalog's typical score lies from validation's (0): the median of its
    ``scores``, which the few wrong texts of a catalog barely move; None with under
    MIN_CATALOG_ROWS, too few to know the catalog by."""
    return float(np.median(scores)) if len(scores) >= MIN_CATALOG_ROWS else None


def _normal(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / std


def row_agreement(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """(n,) cosine of each L2-normalised image embedding with the text embedding of its row."""
    return np.einsum("nd,nd->n", image_emb, text_emb)


def _centre_spread(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    return centre, max(1.4826 * float(np.median(np.abs(values - centre))), 1e-3)


def fit_categories(agreement: np.ndarray, categories: np.ndarray) -> tuple[float, float, dict[str, float]]:
    """(overall centre, spread, category -> centre) of right texts' agreement."""
    centre, spread = _centre_spread(agreement)
    fitted = {}
    for category in np.unique(categories):
        own = agreement[categories == category]
        weight = len(own) / (len(own) + SHRINK_ROWS)
        fitted[str(category)] = weight * float(np.median(own)) + (1 - weight) * centre
    return centre, spread, fitted


def planted_pairs(
    texts: np.ndarray, rng: np.random.Generator, *, per_row: int = PLANTED_PER_ROW
) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows): each row paired with up to ``per_row`` other rows whose text differs."""
    images, others = [], []
    for i, text in enumerate(texts):
        candidates = np.flatnonzero(texts != text)
        if len(candidates):
            picks = rng.choice(candidates, size=min(per_row, len(candidates)), replace=False)
            images += [i] * len(picks)
            others += picks.tolist()
    return np.array(images, dtype=int), np.array(others, dtype=int)


def flag_threshold(own: np.ndarray, planted: np.ndarray, *, target_precision: float, error_rate: float) -> float | None:
    """The highest score at or below which flags are right ``target_precision`` of the time,
    judged by lower confidence bounds: of the share of mismatches flagged (recall) and of the
    share of right texts left alone; None where no threshold with MIN_SUPPORT planted rows qualifies."""
    candidates = np.sort(planted)
    caught = np.searchsorted(candidates, candidates, side="right").astype(float)
    passed = len(own) - np.searchsorted(np.sort(own), candidates, side="right").astype(float)
    recall = accuracy_lower_bound(caught, np.full_like(caught, len(planted)), z=BOUND_Z)
    false_rate = 1 - accuracy_lower_bound(passed, np.full_like(passed, len(own)), z=BOUND_Z)
    precision = error_rate * recall / (error_rate * recall + (1 - error_rate) * false_rate)
    ok = (precision >= target_precision) & (caught >= MIN_SUPPORT)
    return float(candidates[np.flatnonzero(ok).max()]) if ok.any() else None


def calibrate(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: np.ndarray,
    categories: np.ndarray,
    *,
    column: str,
    target_precision: float,
    error_rate: float,
    seed: int = 0,
) -> TextCalibration:
    """A TextCalibration from validation rows whose texts (of ``column``) describe their images."""
    own = row_agreement(image_emb, text_emb)
    centre, spread, fitted = fit_categories(own, categories)
    calibration = TextCalibration(column, centre, spread, fitted, error_rate=error_rate, rows=len(own))
    images, others = planted_pairs(texts, np.random.default_rng(seed))
    if not len(images):
        return calibration
    own_scores = calibration.scores(own, categories)
    # a mismatched listing keeps its text's category: the catalog row is the text's product
    planted = calibration.scores(row_agreement(image_emb[images], text_emb[others]), categories[others])
    threshold = flag_threshold(own_scores, planted, target_precision=target_precision, error_rate=error_rate)
    return TextCalibration(
        column,
        centre,
        spread,
        fitted,
        threshold,
        len(own),
        len(planted),
        (float(planted.mean()), max(float(planted.std()), 1e-3)),
        error_rate,
    )


def texts_of(frame: pl.DataFrame, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """(texts, categories) per row of ``frame`` as (n,) string arrays, "" where missing: the spec's
    text column (whitespace collapsed) and its text category column."""

    def column(name: str | None) -> np.ndarray:
        if name is None or name not in frame.columns:
            return np.full(frame.height, "", dtype=object)
        values = pl.col(name).cast(pl.String).str.replace_all(r"\s+", " ").str.strip_chars().fill_null("")
        return frame.select(values)[name].to_numpy().astype(object)

    return column(spec.text_column), column(spec.text_category)
