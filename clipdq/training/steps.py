"""What the trainers share (``full`` on pixels, ``locked`` on kept activations): balanced
batches, augmented views of photos, the logits and the loss, mixed precision, the learning-rate
schedule and when to stop.

``labels`` map attribute -> (n,) value indices with -1 where unknown; ``logits`` attribute -> (n, k).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipdq import progress_log
from clipdq.model import towers

log = logging.getLogger(__name__)

EVAL_BATCH = 32  # images per forward pass when validating: twice as fast on CPU as 256 at 224 px


def balanced_batches(
    labels: dict[str, np.ndarray], rows: np.ndarray, *, batch_size: int, steps: int, rng: np.random.Generator
):
    """Batches that cover every value of every attribute evenly: picks rotate over the
    (attribute, value) pools of the given rows, each pick drawn at random from its pool."""
    pools = [
        rows[labels[name][rows] == value] for name in labels for value in np.unique(labels[name][rows]) if value >= 0
    ]
    offset = 0
    for _ in range(steps):
        yield np.array([rng.choice(pools[(offset + i) % len(pools)]) for i in range(batch_size)])
        offset += batch_size


def augment_views(
    pixels: torch.Tensor, generator: torch.Generator, *, size: int | None = None, min_area: float = 0.55
) -> torch.Tensor:
    """Shelf-photo augmentation of normalised pixels: a random crop of ``min_area`` to 100% of the
    area (aspect 3:4 to 4:3) resized to ``size`` (default: the input's), a horizontal flip, and
    brightness, contrast and saturation jitter of up to 20%."""
    n, _, h, w = pixels.shape
    size = size or h
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    area, aspect = min_area + (1 - min_area) * rand(n), torch.exp((rand(n) - 0.5) * 0.575)
    crop_h = (h * torch.sqrt(area / aspect)).clamp(max=h).long()
    crop_w = (w * torch.sqrt(area * aspect)).clamp(max=w).long()
    patches: list[torch.Tensor] = []
    for i in range(n):
        top = int(rand(1) * (h - crop_h[i] + 1))
        left = int(rand(1) * (w - crop_w[i] + 1))
        patch = pixels[i : i + 1, :, top : top + crop_h[i], left : left + crop_w[i]]
        patches.append(
            F.interpolate(
                patch, size=(size, size), mode="bilinear", align_corners=False, antialias=bool(crop_h[i] > size)
            )
        )  # no aliasing where the crop shrinks
    out = torch.cat(patches)
    flip = rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    jitter = lambda: 1 + 0.4 * (rand(n, 1, 1, 1) - 0.5)  # noqa: E731
    grey = out.mean(dim=1, keepdim=True)
    out = grey + (out - grey) * jitter()  # saturation
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * jitter() + mean * jitter()).clamp(-3, 3)  # contrast, brightness


def attribute_logits(clip: towers.Clip, image_emb: torch.Tensor, captions: towers.Captions) -> dict[str, torch.Tensor]:
    """Per attribute, (n, k) scaled similarities of images to the value captions; differentiable."""
    scale = clip.model.logit_scale.exp().clamp(max=100.0)
    return {name: scale * image_emb @ emb.T for name, emb in captions.value_embeddings(clip).items()}


def batch_loss(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], *, smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over attributes of the cross-entropy (with ``smoothing`` of the labels) on rows whose
    value is known."""
    losses = [
        F.cross_entropy(logits[k][labels[k] >= 0], labels[k][labels[k] >= 0], label_smoothing=smoothing)
        for k in logits
        if (labels[k] >= 0).any()
    ]
    return torch.stack(losses).mean()


def autocast(clip: towers.Clip, *, inference: bool = False):
    """bf16 mixed precision on CUDA, and for inference on CPUs that compute bf16 natively (validation
    runs about 3x faster there; training steps stay fp32 on CPU: their backward pass gains nothing)."""
    fast = clip.device.type == "cuda" or inference and towers.native_bf16(clip.device)
    return torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=fast)


def schedule(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def stop_reason(config, *, epoch: int, best_epoch: int, minutes: float) -> str:
    """Why training stops after ``epoch``: "patience", "time cap" (logged: the result then depends
    on the machine), or "epochs" to go on (and when the epochs run out)."""
    if epoch - best_epoch >= config.patience:
        return "patience"
    if config.max_minutes and minutes >= config.max_minutes:
        log.warning(
            "training stopped by the %g-minute safety cap after %d epochs: the result depends on "
            "how fast this machine ran",
            config.max_minutes,
            epoch + 1,
        )
        return "time cap"
    return "epochs"


def take_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def run_epochs(
    config,
    *,
    train_epoch: Callable[[], float],
    val_loss: Callable[[], float],
    state: Callable[[], dict],
    started: float,
) -> tuple[dict, list[dict], str]:
    """The epoch loop of every trainer: ``train_epoch`` (returns its last loss), then ``val_loss``;
    keeps a copy of ``state()`` at the lowest validation loss, stops on patience, the epoch budget
    or the safety cap. Returns (best: val_loss, epoch, state; history; why it stopped)."""
    best: dict[str, Any] = {"val_loss": float("inf"), "epoch": -1, "state": None}
    history, stopped_by = [], "epochs"
    for epoch in range(config.epochs):
        train_loss, loss = train_epoch(), val_loss()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": loss})
        minutes = (time.monotonic() - started) / 60
        progress_log.info(
            "epoch %d: train loss %.3f, val loss %.3f (%.1f min)",
            epoch,
            train_loss,
            loss,
            minutes,
            extra={"progress": (epoch + 1, config.epochs)},
        )
        if loss < best["val_loss"]:
            best = {"val_loss": loss, "epoch": epoch, "state": copy.deepcopy(state())}
        stopped_by = stop_reason(config, epoch=epoch, best_epoch=best["epoch"], minutes=minutes)
        if stopped_by != "epochs":
            break
    return best, history, stopped_by
