"""The labeled set: a catalog's labeled rows as pixels and value indices, their groups (rows that
must share a split) and train-only rows, and the splits of its rows.

Vocabulary: ``data`` a LabeledSet; ``labels`` attribute -> (n,) value indices with -1 where
unknown; ``splits`` (train, val, test) row indices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from clipdq.core import values
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits, near_duplicate_groups, split_indices
from clipdq.core.text import texts_of
from clipdq.io import images
from clipdq.io.sources import ImageAccess
from clipdq.model import towers
from clipdq.training import locked
from clipdq.training.steps import autocast

log = logging.getLogger(__name__)

GROUPING_CHUNK = 256  # photos resized and embedded at once when grouping near-duplicates


@dataclass
class LabeledSet:
    pixels: torch.Tensor  # (n, 3, h, w) float32
    labels: dict[str, torch.Tensor]  # attribute -> (n,) value index, -1 where unknown
    dropped: int  # labeled rows without a readable image
    groups: np.ndarray | None = None  # (n,) group per row: near-duplicates that must share a split
    texts: np.ndarray | None = None  # (n,) the spec's text column ("" where missing); None without one
    text_categories: np.ndarray | None = None  # (n,) the spec's text category column, "" where missing
    train_only: np.ndarray | None = None  # (n,) bool: rows that only train (``TrainConfig.train_only_column``)
    instances: np.ndarray | None = None  # (n,) product shown (``TrainConfig.instance_column``), -1 where unknown


def load_labeled(
    frame: pl.DataFrame,
    spec: Spec,
    *,
    access: ImageAccess,
    pixel_spec: images.PixelSpec,
    group_column: str | None = None,
    train_only_column: str | None = None,
    instance_column: str | None = None,
) -> LabeledSet:
    groups, train_only = group_keys(frame, group_column), train_only_rows(frame, train_only_column)
    instances = instance_keys(frame, instance_column)
    loaded = images.load_images(frame[spec.image_column].to_list(), access, pixel_spec)
    if not loaded.ok.any():
        raise ValueError("no labeled image could be read")
    labels = {k: torch.from_numpy(v[loaded.ok]) for k, v in values.labels(frame, spec).items()}
    texts, categories = (part[loaded.ok] for part in texts_of(frame, spec))
    has_texts = spec.text_column in frame.columns
    return LabeledSet(
        torch.from_numpy(loaded.pixels),
        labels,
        int((~loaded.ok).sum()),
        None if groups is None else groups[loaded.ok],
        texts if has_texts else None,
        categories if has_texts else None,
        None if train_only is None else train_only[loaded.ok],
        None if instances is None else instances[loaded.ok],
    )


def group_keys(frame: pl.DataFrame, column: str | None) -> np.ndarray | None:
    """(n,) group of each row from ``column`` (nulls form one group); None without a column."""
    values = _named_column(frame, column, "group")
    return None if values is None else values.fill_null("").to_numpy()


def instance_keys(frame: pl.DataFrame, column: str | None) -> np.ndarray | None:
    """(n,) the product each row shows, as a code per value of ``column`` (null: -1); None without
    a column."""
    values = _named_column(frame, column, "instance")
    return None if values is None else (values.rank("dense").fill_null(0).cast(pl.Int64) - 1).to_numpy()


def _named_column(frame: pl.DataFrame, column: str | None, role: str) -> pl.Series | None:
    """The labeled catalog's ``column`` as strings, None without one; a ValueError naming its
    ``role`` where the catalog lacks it."""
    if column is None:
        return None
    if column not in frame.columns:
        raise ValueError(f"{role} column {column!r} is not in the labeled catalog")
    return frame[column].cast(pl.String)


def train_only_rows(frame: pl.DataFrame, column: str | None) -> np.ndarray | None:
    """(n,) bool: the rows where the boolean ``column`` is true (null: false); None without a column."""
    if column is None:
        return None
    if frame.schema.get(column) != pl.Boolean:
        raise ValueError(f"train-only column {column!r} must be a boolean column of the labeled catalog")
    return frame[column].fill_null(False).to_numpy()


def label_arrays(data: LabeledSet) -> dict[str, np.ndarray]:
    return {name: values.numpy() for name, values in data.labels.items()}


def labels_of(data: LabeledSet, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The value indices of the given rows, per attribute."""
    return {name: values[idx] for name, values in label_arrays(data).items()}


def default_splits(data: LabeledSet, config: TrainConfig) -> Splits:
    return split_indices(
        label_arrays(data),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        groups=data.groups,
        train_only=data.train_only,
    )


def group_near_duplicates(clip: towers.Clip, data: LabeledSet, config: TrainConfig, plain: torch.Tensor | None) -> str:
    """Sets ``data.groups`` to near-duplicate groups of images, unless a group column gave them or
    the image tower is untrained (its features cannot tell); returns how rows were grouped.
    ``plain``: locked mode's kept activations of every row, where the caller has them."""
    if data.groups is not None:
        return f"group column {config.group_column!r}"
    if clip.meta.starting_point == "new":
        return "none: an untrained image tower cannot tell near-duplicates (name a group column)"
    if plain is not None:
        features = locked.pooled_features(clip, plain, config.unlock_blocks)
    else:
        tower = towers.tower_size(clip)
        with autocast(clip, inference=True):  # bf16 where native: 3x faster, alike groups; resized chunk by chunk
            features = np.concatenate(
                [
                    towers.embed_images(clip, towers.resized(chunk, tower).numpy())
                    for chunk in data.pixels.split(GROUPING_CHUNK)
                ]
            )
    data.groups = near_duplicate_groups(features, threshold=config.near_duplicate_cosine)
    log.info("%d labeled images form %d near-duplicate groups", len(features), data.groups.max() + 1)
    return f"near-duplicate images (cosine >= {config.near_duplicate_cosine} between image-tower features)"
