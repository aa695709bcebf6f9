"""Fine-tuning on a locked image tower (the LiT recipe), optionally with its top blocks unlocked.

The frozen part of the image tower runs once per training image and augmented view; its
activations are kept, and only what sits above them trains: the text tower, both projections,
the logit scale and, for an EfficientNet tower, its top ``unlock_blocks`` blocks (at a lower
learning rate). Because nothing below is recomputed, an epoch costs what the unlocked part costs:
seconds with the tower locked.

Vocabulary as in ``labeled``: ``data`` a LabeledSet, ``splits`` (train, val, test) row indices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from clipdq.model import efficientnet, towers
from clipdq.training.steps import (
    attribute_logits,
    augment_views,
    balanced_batches,
    batch_loss,
    run_epochs,
    schedule,
    take_step,
)

log = logging.getLogger(__name__)


@dataclass
class Tower:
    """The image tower cut in two: ``below`` runs once (frozen), ``above`` trains."""

    below: Callable[[torch.Tensor], torch.Tensor]  # pixels -> kept activations
    above: Callable[[torch.Tensor], torch.Tensor]  # kept activations -> normalised image embeddings
    unlocked: list[torch.nn.Parameter]  # image-tower parameters that train (none when locked)


def split_tower(clip: towers.Clip, unlock_blocks: int) -> Tower:
    """The tower of ``clip`` frozen below its top ``unlock_blocks`` blocks (EfficientNet towers only
    unlock blocks; any tower can be locked whole, below its projection)."""
    vision, projection = clip.model.vision_model, clip.model.visual_projection
    if unlock_blocks == 0:
        return Tower(
            lambda pixels: vision(pixel_values=pixels).pooler_output, lambda x: F.normalize(projection(x), dim=-1), []
        )
    blocks = getattr(vision, "blocks", None)
    if blocks is None or not 0 < unlock_blocks <= len(blocks):
        raise ValueError(f"unlock_blocks={unlock_blocks} needs an EfficientNet image tower with that many blocks")
    tower = cast(efficientnet.EfficientNetLiteModel, vision)  # only EfficientNet towers have blocks
    start = len(blocks) - unlock_blocks
    unlocked = [p for block in blocks[start:] for p in block.parameters()] + list(tower.head.parameters())
    return Tower(
        lambda pixels: tower.features_below(pixels, start),
        lambda x: F.normalize(projection(tower.features_from(x, start)), dim=-1),
        unlocked,
    )


@torch.inference_mode()
def keep_activations(
    tower: Tower, pixels: torch.Tensor, device: torch.device, *, chunk: int = 16, bf16: bool = False
) -> torch.Tensor:
    """``tower.below`` of every image, stored in bfloat16 (half the memory; the tower is frozen),
    computed in bf16 arithmetic where ``bf16``."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat(
            [tower.below(pixels[i : i + chunk].to(device)).to(torch.bfloat16) for i in range(0, len(pixels), chunk)]
        )


@torch.inference_mode()
def pooled_features(clip: towers.Clip, activations: torch.Tensor, unlock_blocks: int) -> np.ndarray:
    """(n, d) image-tower features (before the projection) from kept activations: what
    near-duplicate grouping compares."""
    if unlock_blocks == 0:
        return activations.float().cpu().numpy()
    vision = cast(efficientnet.EfficientNetLiteModel, clip.model.vision_model)  # split_tower checked its blocks
    start = len(vision.blocks) - unlock_blocks
    return (
        torch.cat(
            [vision.features_from(activations[i : i + 64].float(), start) for i in range(0, len(activations), 64)]
        )
        .cpu()
        .numpy()
    )


def plain_activations(clip: towers.Clip, data, unlock_blocks: int) -> torch.Tensor:
    """Kept activations of every labeled row's image as it is (no augmentation)."""
    clip.model.eval()
    return keep_activations(split_tower(clip, unlock_blocks), data.pixels, clip.device)


def _kept_views(
    clip: towers.Clip,
    tower: Tower,
    data,
    config,
    train_idx: np.ndarray,
    generator: torch.Generator,
    plain: torch.Tensor | None,
    started: float,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(kept activations of every row's plain image, of the training views, the row of each view):
    the plain image of each training row, then ``config.views - 1`` augmented views of each."""
    kept_plain = plain_activations(clip, data, config.unlock_blocks) if plain is None else plain
    # Augmented views only train, so they may take the faster arithmetic; the plain activations,
    # which validation and calibration see, are computed as the audit computes them.
    fast = towers.native_bf16(clip.device)
    augmented = [
        keep_activations(tower, augment_views(data.pixels[train_idx], generator), clip.device, bf16=fast)
        for _ in range(config.views - 1)
    ]
    kept_train = torch.cat([kept_plain[train_idx], *augmented])
    log.info(
        "kept image-tower activations of %d images and %d augmented views in %.1f min",
        len(kept_plain),
        len(kept_train) - len(train_idx),
        (time.monotonic() - started) / 60,
    )
    return kept_plain, kept_train, np.tile(train_idx, config.views)


def _optimizer(clip: towers.Clip, tower: Tower, config) -> torch.optim.Optimizer:
    """AdamW over what trains (the text tower, both projections, the logit scale and the unlocked
    blocks, at ``image_tower_lr``); every other parameter stops requiring gradients."""
    head = [
        p
        for n, p in clip.model.named_parameters()
        if n.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale"))
    ]
    groups = [{"params": head, "lr": config.lr}]
    if tower.unlocked:
        groups.append({"params": tower.unlocked, "lr": config.image_tower_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    for p in clip.model.parameters():
        p.requires_grad_(False)
    for p in head + tower.unlocked:
        p.requires_grad_(True)
    return optimizer


def _embedder(tower: Tower, kept_plain: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
    """``embed(rows)``: the image embeddings of labeled rows from their kept activations."""

    @torch.no_grad()
    def embed(rows: np.ndarray) -> np.ndarray:
        x = kept_plain[rows]
        return torch.cat([tower.above(x[i : i + 256].float()) for i in range(0, len(x), 256)]).float().cpu().numpy()

    return embed


def fit(clip: towers.Clip, data, spec, config, splits, *, plain: torch.Tensor | None = None) -> tuple[dict, Callable]:
    """Train in place; returns (training summary, ``embed(rows)``: the image embeddings of any
    labeled rows, as the audit computes them, from the kept activations).

    ``plain`` holds ``plain_activations`` where the caller has them already.
    """
    train_idx, val_idx, _ = splits
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    clip.value_emb = None
    clip.model.eval()  # batch-norm statistics stay as pretrained; nothing below the cut trains
    tower = split_tower(clip, config.unlock_blocks)
    started = time.monotonic()
    kept_plain, kept_train, view_rows = _kept_views(clip, tower, data, config, train_idx, generator, plain, started)
    captions = towers.Captions(clip, spec)
    optimizer = _optimizer(clip, tower, config)
    view_labels = {k: v.numpy()[view_rows] for k, v in data.labels.items()}
    steps_per_epoch = max(1, len(view_rows) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: schedule(s, warmup=config.warmup_epochs * steps_per_epoch, total=config.epochs * steps_per_epoch),
    )
    rng = np.random.default_rng(config.seed)

    def loss_on(rows: np.ndarray) -> float:
        with torch.no_grad():
            truth = {k: v[rows].to(clip.device) for k, v in data.labels.items()}
            return float(batch_loss(attribute_logits(clip, tower.above(kept_plain[rows].float()), captions), truth))

    labels_on_device = {k: torch.from_numpy(v).to(clip.device) for k, v in view_labels.items()}

    def train_epoch() -> float:
        for picks in balanced_batches(
            view_labels, np.arange(len(view_rows)), batch_size=config.batch_size, steps=steps_per_epoch, rng=rng
        ):
            loss = batch_loss(
                attribute_logits(clip, tower.above(kept_train[picks].float()), captions),
                {k: v[picks] for k, v in labels_on_device.items()},
            )
            take_step(loss, optimizer, scheduler)
        return loss.item()

    best, history, stopped_by = run_epochs(
        config, train_epoch=train_epoch, val_loss=lambda: loss_on(val_idx), state=clip.model.state_dict, started=started
    )
    for p in clip.model.parameters():
        p.requires_grad_(True)
    clip.model.load_state_dict(best["state"])
    summary = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stopped_by": stopped_by,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "device": clip.device.type,
        "views": config.views,
        "unlock_blocks": config.unlock_blocks,
        "history": history,
    }
    return summary, _embedder(tower, kept_plain)
