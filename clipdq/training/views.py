"""The audit's view of a model trained on crops: the image sizes (and mirroring) at which the audit
shows it photos, chosen by validation loss, and how training decodes photos so that each of those
sizes is resized down from the photo.

Vocabulary: a *view* is one image size or a set of sizes whose embeddings are averaged
(``audit_views``); sizes are in px, the side of a square photo.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from clipdq.core.presets import TrainConfig
from clipdq.io import images
from clipdq.model import towers
from clipdq.model.card import sizes_text
from clipdq.training.labeled import LabeledSet
from clipdq.training.steps import EVAL_BATCH, attribute_logits, autocast, batch_loss

log = logging.getLogger(__name__)

AUDIT_SIZES = 3  # single image sizes the audit may use after training on crops: the model's and the two below
AUDIT_SIZE_STEP = 16  # it, this many px apart (grocery photos trained at 160 px: 208 best, 192 to 224 within 0.02 loss)
SCALE_SPANS = (1, 2)  # or the model's size and this many steps of SCALE_STEP either side, embeddings averaged:
SCALE_STEP = 32  # px (grocery fine classes 0.79 at 160 to 288 px, 0.755 at 208 px, three models; docs/benchmarks.md)


def audit_views(tower: int) -> list[tuple[int, ...]]:
    """The candidate image sizes of ``choose_audit_view`` for a tower built for ``tower``-px photos:
    single sizes, then sets averaged."""
    singles = [(tower - AUDIT_SIZE_STEP * i,) for i in reversed(range(AUDIT_SIZES))]
    return singles + [tuple(tower + SCALE_STEP * k for k in range(-span, span + 1)) for span in SCALE_SPANS]


def loading_spec(clip: towers.Clip, config: TrainConfig) -> images.PixelSpec:
    """How labeled photos are decoded for training: as the model's processor says, or, where full
    mode trains on random crops, at the largest size an audit view may show them (``audit_views``),
    so that crops and views are resized down from the photo, not up from a smaller copy."""
    if not config.train_size:
        return clip.pixels
    side = max(max(view) for view in audit_views(towers.tower_size(clip)))
    return replace(clip.pixels, resize=side, crop=side)


def _mirrored_features(clip: towers.Clip, pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The sum of the image features of ``pixels`` at ``size`` and of their mirror images."""
    pixels = towers.resized(pixels, size).to(clip.device)
    with autocast(clip, inference=True):
        total = sum(
            torch.cat(
                [towers.image_features(clip.model, p[i : i + EVAL_BATCH]).float() for i in range(0, len(p), EVAL_BATCH)]
            )
            for p in (pixels, pixels.flip(-1))
        )
    return cast(torch.Tensor, total)  # a sum of tensors (sum is typed as if it might add none)


@torch.inference_mode()
def choose_audit_view(
    clip: towers.Clip, data: LabeledSet, rows: np.ndarray, captions: towers.Captions
) -> tuple[dict, np.ndarray]:
    """The image sizes the audit uses (``audit_views``: one, or several with their embeddings
    averaged): those with the lowest loss on ``rows`` (validation). A tower trained on small crops
    sees a product larger than it is in the whole photo, so a size between the two suits it best
    (FixRes), and the product seen at several sizes better still. Each photo's embedding is also
    averaged with its mirror image's: training flips photos at random, and on grocery photos from
    other sessions the mirror average read fine classes 1 to 3 points better wherever it was
    measured, also in models whose validation loss had preferred the plain view. Sets the view in
    ``clip.meta``: from then on ``towers.image_embeddings`` resizes the photos it is given as they
    were resized here (decoded once, as training decoded them (``loading_spec``), then resized, as
    in training: decoding afresh at each size read grocery fine classes 4 points worse). Returns
    (what was chosen and why, the embeddings of ``rows`` in the chosen view: calibration's, without
    computing them again)."""
    clip.model.eval()
    labels = {k: v[rows].to(clip.device) for k, v in data.labels.items()}
    views = audit_views(towers.tower_size(clip))
    features = {
        size: _mirrored_features(clip, data.pixels[rows], size)
        for size in sorted({size for sizes in views for size in sizes})
    }
    # averaged as ``towers.image_embeddings`` averages them
    in_view = {sizes: F.normalize(cast(torch.Tensor, sum(features[size] for size in sizes)), dim=-1) for sizes in views}
    losses = {sizes: float(batch_loss(attribute_logits(clip, emb, captions), labels)) for sizes, emb in in_view.items()}
    sizes = min(losses, key=losses.__getitem__)
    clip.meta.image_sizes, clip.meta.mirror_average = list(sizes), True
    log.info(
        "the audit sees photos at %s px, mirror averaged: validation loss %.3f (%s)",
        sizes_text(sizes),
        losses[sizes],
        ", ".join(f"{sizes_text(s)} px {v:.3f}" for s, v in losses.items()),
    )
    chosen = {"image_sizes": list(sizes), "mirror_average": True}
    return (
        chosen | {"val_losses": [{"sizes": list(s), "val_loss": v} for s, v in losses.items()]},
        in_view[sizes].cpu().numpy(),
    )
