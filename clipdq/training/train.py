"""Fine-tune CLIP on labeled products (``finetune``): cross-entropy of image embeddings against the
embeddings of each attribute's value captions in the mode the config names (``full``, ``locked``,
``prototypes``), best checkpoint by validation loss, then a per-attribute calibration fitted on
the validation split (``calibration``) and figures on the test split (``metrics``).

Vocabulary as in ``labeled``: ``data`` a LabeledSet, ``splits`` (train, val, test) row indices;
``config`` a TrainConfig, made from job options by ``config_for`` (defaults: ``presets``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import polars as pl
import torch

from clipdq.core import presets
from clipdq.core.presets import Mode, TrainConfig
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits
from clipdq.io.sources import ImageAccess
from clipdq.model import towers
from clipdq.training import full, locked, prototypes, texts
from clipdq.training.calibration import calibrate_attributes, calibrate_texts, calibration_basis
from clipdq.training.labeled import LabeledSet, default_splits, group_near_duplicates, load_labeled
from clipdq.training.metrics import add_test_metrics, split_sizes
from clipdq.training.views import loading_spec

log = logging.getLogger(__name__)


def config_for(clip: towers.Clip, **options) -> TrainConfig:
    """The config for ``clip``: the defaults that suit where it starts and the mode (``presets.PRESETS``),
    overridden by the options that are not None."""
    given = {name: value for name, value in options.items() if value is not None}
    return presets.preset(clip.meta.starting_point, **given)


def quick_mode(clip: towers.Clip) -> Mode | None:
    """The mode for a model trained many times over, as cross-fitting's fold models are: locked for a
    pretrained image tower (minutes instead of a quarter hour), else the default (None)."""
    return "locked" if clip.meta.starting_point == "pretrained image tower" else None


def _fit(
    clip: towers.Clip, data: LabeledSet, spec: Spec, config: TrainConfig, splits: Splits, plain: torch.Tensor | None
) -> tuple[dict, Callable[[np.ndarray], np.ndarray]]:
    """Train in ``config.mode``; returns (training summary, ``embed(rows)``: image embeddings of
    labeled rows as the audit computes them)."""
    if config.mode == "locked":
        return locked.fit(clip, data, spec, config, splits, plain=plain)
    result = (prototypes.fit_model if config.mode == "prototype" else full.fit)(clip, data, spec, config, splits)
    return result, lambda rows: towers.embed_images(clip, data.pixels[rows].numpy())


def train_on(
    clip: towers.Clip,
    data: LabeledSet,
    spec: Spec,
    *,
    config: TrainConfig,
    splits: Splits,
    plain: torch.Tensor | None = None,
) -> dict:
    """Train (``config.mode``) on the train rows, calibrate on the validation rows, measure on the
    test rows; returns the metadata that describes the result (``ModelMeta`` fields, see
    ``finetune``). ``plain``: the locked mode's kept activations of every row, where the caller
    has them."""
    if torch.cuda.is_available():
        # transformers wraps Module.cuda with functools.wraps, which mypy does not bind to the model
        clip.model.cuda()  # type: ignore[call-arg]
    _, val_idx, test_idx = splits
    clip.meta.clear_view()  # only training on crops sets it again
    result, embed = _fit(clip, data, spec, config, splits, plain)
    value_emb = clip.value_emb if clip.value_emb is not None else towers.embed_captions(clip, spec)
    if data.texts is not None and config.text_epochs:
        clip.value_emb = (
            value_emb  # fixed: teaching the text tower the texts leaves the attributes' predictions as they are
        )
        result["texts"] = texts.fit_texts(clip, data, embed, config, splits)
    val_emb = result.pop("val_embeddings", None)  # the audit's view chosen on them, in validation's arithmetic
    val_emb = embed(val_idx) if val_emb is None else val_emb
    calibration, metrics = calibrate_attributes(
        clip, data, spec, val_idx, val_emb, value_emb, label_noise=config.label_noise
    )
    if len(test_idx):
        add_test_metrics(metrics, clip, data, spec, test_idx, embed, value_emb, calibration)
    outcome: dict[str, Any] = {
        "training": result | split_sizes(data, splits),
        "metrics": metrics,
        "calibration": calibration,
        "calibration_basis": calibration_basis(spec, val_idx, label_noise=config.label_noise),
    }
    if data.texts is not None:
        outcome["text_calibration"] = calibrate_texts(clip, data, spec, val_idx, val_emb, seed=config.seed)
    return outcome


def finetune(
    clip: towers.Clip, frame: pl.DataFrame, spec: Spec, *, access: ImageAccess, config: TrainConfig
) -> towers.Clip:
    """Train on labeled rows (``config.mode``) and record metrics and calibration in the model's metadata."""
    started = time.monotonic()
    decoding = loading_spec(clip, config)
    data = load_labeled(
        frame,
        spec,
        access=access,
        pixel_spec=decoding,
        group_column=config.group_column,
        train_only_column=config.train_only_column,
        instance_column=config.instance_column,
    )
    log.info("training on %d labeled products (%d without a readable image)", len(data.pixels), data.dropped)
    plain = locked.plain_activations(clip, data, config.unlock_blocks) if config.mode == "locked" else None
    grouping = group_near_duplicates(clip, data, config, plain)
    rows = default_splits(data, config)
    outcome = train_on(clip, data, spec, config=config, splits=rows, plain=plain)
    clip.pixels = decoding  # saved as the processor: the audit decodes photos as training did
    outcome["training"] |= {
        "labeled_rows": frame.height,
        "unreadable_images": data.dropped,
        "total_minutes": round((time.monotonic() - started) / 60, 2),
    }  # images read, kept, trained
    outcome["calibration_basis"] |= {
        "grouping": grouping,
        "val_groups": len(np.unique(data.groups[rows[1]])) if data.groups is not None else len(rows[1]),
    }
    clip.meta = replace(
        clip.meta,
        trained=True,
        spec_fingerprint=spec.fingerprint(),
        train_config=asdict(config),
        values={a.name: list(a.values) for a in spec.attributes},
        fingerprint=f"unsaved-{uuid.uuid4().hex[:12]}",
        **outcome,
    )  # new weights; saving sets it
    return clip
