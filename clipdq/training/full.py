"""Full mode: both towers fine-tuned on pixels, the best epoch by validation loss kept, optionally
on random crops (then the audit's view is chosen, ``views``) and with a moving average of the
weights (``MovingAverage``) as what validation judges and training keeps.

Vocabulary as in ``labeled``: ``data`` a LabeledSet, ``splits`` (train, val, test) row indices.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Generic, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits
from clipdq.model import efficientnet, towers
from clipdq.training.instances import AnchorBank, anchor_bank
from clipdq.training.labeled import LabeledSet, label_arrays
from clipdq.training.steps import (
    EVAL_BATCH,
    attribute_logits,
    augment_views,
    autocast,
    balanced_batches,
    batch_loss,
    run_epochs,
    schedule,
    take_step,
)
from clipdq.training.texts import spread_captions
from clipdq.training.views import choose_audit_view

log = logging.getLogger(__name__)

TOWER_CROP_AREA = 0.25  # full mode's crops at ``train_size`` keep 25 to 100% of a photo's area
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (pad 1/8 and crop), horizontal flip and brightness, batch-wise per image."""
    n, _, h, w = pixels.shape
    pad = h // 8
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5))


def augmented(pixels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A training batch as full mode sees it: random crops at ``config.train_size`` where set, else
    shifted and flipped at the model's size."""
    if config.train_size:
        return augment_views(pixels, generator, size=config.train_size, min_area=TOWER_CROP_AREA)
    return augment(pixels, generator)


def parameter_groups(clip: towers.Clip, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the image tower at ``image_tower_lr``, the rest at ``lr``."""
    named = list(clip.model.named_parameters())
    return [
        {"params": [p for n, p in named if n.startswith("vision_model.")], "lr": config.image_tower_lr},
        {"params": [p for n, p in named if not n.startswith("vision_model.")], "lr": config.lr},
    ]


def freeze_below(clip: towers.Clip, blocks: int) -> None:
    """Keep the stem and the lowest ``blocks`` blocks of an EfficientNet image tower as they are, and
    compute them in bf16 while training where the device does so natively."""
    vision = clip.model.vision_model
    if not 0 < blocks <= len(getattr(vision, "blocks", ())):
        raise ValueError(f"frozen_blocks={blocks} needs an EfficientNet image tower with that many blocks")
    tower = cast(efficientnet.EfficientNetLiteModel, vision)  # only EfficientNet towers have blocks
    tower.freeze_below(blocks, dtype=torch.bfloat16 if towers.native_bf16(clip.device) else None)


class MovingAverage(Generic[ModuleT]):
    """An exponential moving average of a module's weights and batch-norm statistics, in a copy of
    it (``module``), updated after each training step. Integer buffers (batch counts) are copied,
    not averaged, and those outside the state dict (position ids) keep their values. The decay
    warms up as (1 + step) / (10 + step) until it reaches ``decay``, so the average forgets the
    untrained start (at a fixed 0.998, 9% of the average after 1,184 steps was still the new
    text tower's random weights, and its validation loss lagged the weights' own)."""

    def __init__(self, source: ModuleT, decay: float):
        self.module, self.decay, self.steps = copy.deepcopy(source), decay, 0
        # training changes the source's tensors in place: pair them with their averages once
        self._pairs = list(zip(self.module.state_dict().values(), source.state_dict().values(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, self.steps / (self.steps + 9))
        for average, current in self._pairs:
            if average.is_floating_point():
                average.lerp_(current, 1 - decay)
            else:
                average.copy_(current)


@torch.inference_mode()
def evaluate(
    clip: towers.Clip, data: LabeledSet, idx: np.ndarray, captions: towers.Captions
) -> tuple[float, dict[str, np.ndarray]]:
    """(validation loss, per-attribute logits) over the given rows."""
    clip.model.eval()
    pixels = data.pixels[idx].to(clip.device)
    with autocast(clip, inference=True):
        chunks = [towers.image_embeddings(clip, pixels[i : i + EVAL_BATCH]) for i in range(0, len(pixels), EVAL_BATCH)]
        logits = {k: v.float() for k, v in attribute_logits(clip, torch.cat(chunks), captions).items()}
    labels = {k: v[idx].to(clip.device) for k, v in data.labels.items()}
    return float(batch_loss(logits, labels)), {k: v.cpu().numpy() for k, v in logits.items()}


def _epoch_batches(labels, train_idx, config: TrainConfig, steps: int, rng: np.random.Generator):
    if config.balanced:
        return balanced_batches(labels, train_idx, batch_size=config.batch_size, steps=steps, rng=rng)
    order = rng.permutation(train_idx)
    return (order[s * config.batch_size : (s + 1) * config.batch_size] for s in range(steps))


def _prepare(clip: towers.Clip, spec: Spec, config: TrainConfig) -> towers.Captions:
    """The towers made ready to train: the lowest blocks frozen, validation's view set, the captions
    spread apart (new text towers); returns the captions, tokenized."""
    clip.value_emb = None  # both towers are trained: captions give the value embeddings
    if config.frozen_blocks:
        freeze_below(clip, config.frozen_blocks)
    if config.train_size:  # until the audit's view is chosen, validation sees photos at the tower's own size
        clip.meta.image_sizes = [towers.tower_size(clip)]
    captions = towers.Captions(clip, spec)
    if config.spread_steps:
        cosine = spread_captions(clip, captions, steps=config.spread_steps, lr=config.lr)
        log.info("value captions spread apart: max cosine within an attribute %.2f", cosine)
    return captions


@torch.no_grad()
def _anchors(clip: towers.Clip, data: LabeledSet, config: TrainConfig, train_idx: np.ndarray) -> AnchorBank | None:
    """The bank of the training rows' products (``instances``), filled with their anchors'
    embeddings at the training size; None without products to pull together."""
    bank = anchor_bank(data.instances, data.train_only, train_idx)
    if bank is not None:
        clip.model.eval()
        pixels = towers.resized(data.pixels[bank.anchor_rows], config.train_size or towers.tower_size(clip))
        with autocast(clip, inference=True):
            chunks = [towers.image_features(clip.model, chunk.to(clip.device)) for chunk in pixels.split(EVAL_BATCH)]
        bank.fill(torch.cat(chunks))
        log.info("instance similarity: %d products, each pulled towards its anchor", bank.products)
    return bank


def _step_loss(
    clip: towers.Clip,
    data: LabeledSet,
    rows: np.ndarray,
    config: TrainConfig,
    captions: towers.Captions,
    generator: torch.Generator,
    bank: AnchorBank | None,
) -> torch.Tensor:
    """A training step's loss on ``rows``: the attributes' cross-entropy, plus the instance loss
    where there is a bank (the rows' anchors embedded beside them)."""
    pixels = augmented(data.pixels[rows], config, generator) if config.augment else data.pixels[rows]
    with autocast(clip):
        image_emb = towers.image_features(clip.model, pixels.to(clip.device))
        logits = attribute_logits(clip, image_emb, captions)
    loss = batch_loss(
        {k: v.float() for k, v in logits.items()},
        {k: v[rows].to(clip.device) for k, v in data.labels.items()},
        smoothing=config.label_smoothing,
    )
    instance = bank.loss(rows, image_emb.float()) if bank is not None else None
    return loss if instance is None else loss + instance


def fit(clip: towers.Clip, data: LabeledSet, spec: Spec, config: TrainConfig, splits: Splits) -> dict:
    """Train in place; restores the lowest-validation-loss weights and returns training metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    captions = _prepare(clip, spec, config)
    labels, (train_idx, val_idx, _) = label_arrays(data), splits
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    optimizer = torch.optim.AdamW(parameter_groups(clip, config), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: schedule(s, warmup=config.warmup_epochs * steps_per_epoch, total=config.epochs * steps_per_epoch),
    )

    averaged = MovingAverage(clip.model, config.weight_average_decay) if config.weight_average_decay else None
    judged = replace(clip, model=averaged.module) if averaged is not None else clip  # what validation judges and keeps

    bank = _anchors(clip, data, config, train_idx)

    def train_epoch() -> float:
        clip.model.train()
        for picked in _epoch_batches(labels, train_idx, config, steps_per_epoch, rng):
            rows = picked if bank is None else np.concatenate([picked, bank.anchors_for(picked, rng)])
            loss = _step_loss(clip, data, rows, config, captions, generator, bank)
            take_step(loss, optimizer, scheduler)
            if averaged is not None:
                averaged.update()
        return loss.item()

    started = time.monotonic()
    best, history, stopped_by = run_epochs(
        config,
        train_epoch=train_epoch,
        state=judged.model.state_dict,
        val_loss=lambda: evaluate(judged, data, val_idx, captions)[0],
        started=started,
    )
    if best["state"] is None:
        raise ValueError("validation loss was never finite: check the labels and lower the learning rate")
    clip.model.load_state_dict(best["state"] if config.keep_best else judged.model.state_dict())
    clip.model.eval()
    view = {}
    if config.train_size:
        chosen, val_embeddings = choose_audit_view(clip, data, val_idx, captions)
        view = {"audit_view": chosen, "val_embeddings": val_embeddings}
    return {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stopped_by": stopped_by,
        "instance_products": bank.products if bank is not None else 0,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "device": clip.device.type,
        "history": history,
    } | view
