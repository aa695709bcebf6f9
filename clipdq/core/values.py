"""The one value encoder: a catalog's attribute values as indices into the spec's vocabularies.

Vocabulary: a ``code`` is a value's index in its attribute's ``values``, or ``MISSING`` where the
catalog holds no value (null or blank) or ``INVALID`` where it holds one that is neither a value nor
a synonym of one. Spellings are compared ``normalized`` (lower case, single spaces, trimmed: the
spec's ``normalize_value``), and a tree's path column gives its levels (``with_levels``).
``labels`` are codes as training learns them and matching trusts them: -1 wherever the vocabulary
knows no value, and a known tree level implies its missing parents. Comparison, training and
matching all read values through here.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from clipdq.core.spec import Spec

MISSING = -1  # no value: null or blank
INVALID = -2  # a value that is neither in the vocabulary nor a synonym of one


def normalized(column: pl.Expr) -> pl.Expr:
    """``column`` as the spec compares spellings (``spec.normalize_value``), vectorised."""
    return column.cast(pl.String).str.replace_all(r"\s+", " ").str.strip_chars().str.to_lowercase()


def with_levels(catalog: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """``catalog`` with a column per level of each tree that keeps whole paths in one column.

    A path with fewer parts than levels leaves the deeper levels missing; one with more parts
    than levels is no path of the tree, and every level holds it whole (an invalid value).
    """
    columns = []
    for tree in spec.trees:
        if tree.path_column and tree.path_column in catalog.columns:
            path = pl.col(tree.path_column).cast(pl.String).str.strip_chars()
            parts = pl.when(path != "").then(path.str.split(tree.separator))
            too_long = parts.list.len() > len(tree.levels)
            columns += [
                pl.when(too_long)
                .then(path)
                .otherwise(parts.list.get(depth, null_on_oob=True).str.strip_chars())
                .alias(level)
                for depth, level in enumerate(tree.levels)
            ]
    return catalog.with_columns(columns) if columns else catalog


def codes(catalog: pl.DataFrame, spec: Spec) -> dict[str, np.ndarray]:
    """Per attribute, (rows,) int64: each row's code of the catalog's value as given (a missing
    attribute column: every row ``MISSING``)."""
    return leveled_codes(catalog, spec)[1]


def leveled_codes(catalog: pl.DataFrame, spec: Spec) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """(``catalog`` with its tree levels (``with_levels``), its ``codes``): the paths split once."""
    catalog = with_levels(catalog, spec)
    out = {}
    for attribute in spec.attributes:
        if attribute.name not in catalog.columns:
            out[attribute.name] = np.full(catalog.height, MISSING, np.int64)
            continue
        index = {spelling: attribute.values.index(value) for spelling, value in attribute.lookup().items()}
        text = normalized(pl.col(attribute.name))
        code = (
            pl.when(text.is_null() | (text == ""))
            .then(pl.lit(MISSING, pl.Int64))
            .otherwise(text.replace_strict(index, default=INVALID, return_dtype=pl.Int64))
        )
        out[attribute.name] = catalog.select(code.alias("code"))["code"].to_numpy().astype(np.int64)
    return catalog, out


def labels(catalog: pl.DataFrame, spec: Spec) -> dict[str, np.ndarray]:
    """Per attribute, (rows,) int64 value indices, -1 where the row has no value the vocabulary
    knows; in a tree, a known level implies its missing parents (a child names them)."""
    out = {name: np.where(found >= 0, found, -1) for name, found in codes(catalog, spec).items()}
    for tree in spec.trees:
        for depth in range(len(tree.levels) - 1, 0, -1):
            child, parent = out[tree.levels[depth]], out[tree.levels[depth - 1]]
            parent_of = np.array(tree.parent_indices(depth))
            implied = (parent < 0) & (child >= 0)
            parent[implied] = parent_of[child[implied]]
    return out


def row_hashes(frame: pl.DataFrame) -> pl.Series:
    """(UInt64) a hash of each row of ``frame``: equal rows, equal hashes (within one polars version)."""
    return frame.hash_rows(seed=0)
