"""The one value encoder: spellings, synonyms, missing and invalid values, tree paths."""

from __future__ import annotations

import numpy as np
import polars as pl

from clipdq.core import values
from clipdq.core.spec import parse_spec

SPEC = parse_spec("""\
attributes:
  color:
    values: [red, blue]
    synonyms: {red: [rood, Crimson]}
  size:
    values: [small, large]
""")
COLORS = ["red", " ROOD ", "crimson", "Blue", None, "purple", "", "red\tblue"]


def test_codes_read_spellings_and_synonyms_and_tell_missing_from_invalid():
    frame = pl.DataFrame({"color": COLORS})

    found = values.codes(frame, SPEC)

    red, blue = SPEC.attribute("color").values.index("red"), SPEC.attribute("color").values.index("blue")
    missing, invalid = values.MISSING, values.INVALID
    assert found["color"].tolist() == [red, red, red, blue, missing, invalid, missing, invalid]
    assert found["size"].tolist() == [missing] * frame.height  # no column: every value missing
    assert found["color"].dtype == np.int64


def test_labels_mark_every_value_the_vocabulary_does_not_know_as_minus_one():
    labels = values.labels(pl.DataFrame({"color": COLORS}), SPEC)

    assert labels["color"].tolist() == [0, 0, 0, 1, -1, -1, -1, -1]
    assert labels["size"].tolist() == [-1] * len(COLORS)


def test_a_spelling_normalised_like_the_spec_reads_as_its_value():
    spellings = ["Crimson", "  crimson", "CRIMSON  ", "rood"]
    assert values.codes(pl.DataFrame({"color": spellings}), SPEC)["color"].tolist() == [0] * 4
    assert all(SPEC.attribute("color").lookup()[" ".join(s.lower().split())] == "red" for s in spellings)
