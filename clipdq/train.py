"""Fine-tune CLIP on labeled products: cross-entropy of image embeddings against the
embeddings of each attribute's value captions, best checkpoint by validation loss, then a
per-attribute calibration fitted on the validation split.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from clipdq import images, model, predict
from clipdq.spec import Spec

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 100  # upper bound; early stopping or max_minutes may end sooner
    batch_size: int = 32
    lr: float = 1e-3  # AdamW peak learning rate for models trained from scratch; ~1e-5 for pretrained
    weight_decay: float = 0.05
    warmup_epochs: int = 2  # linear warm-up, then cosine decay
    val_fraction: float = 0.2  # share of labeled products held out for checkpointing and calibration
    patience: int = 15  # epochs without a better validation loss before stopping
    max_minutes: float | None = None  # wall-clock budget; the best checkpoint so far is kept
    spread_steps: int = 100  # text-only steps pushing each attribute's value captions apart (new models)
    augment: bool = True  # random crop, flip and brightness on training images
    seed: int = 0


@dataclass
class LabeledSet:
    pixels: torch.Tensor  # (n, 3, h, w) float32
    labels: dict[str, torch.Tensor]  # attribute -> (n,) value index, -1 where unknown
    dropped: int  # labeled rows without a readable image


def encode_labels(frame: pl.DataFrame, spec: Spec) -> dict[str, np.ndarray]:
    """Value indices per attribute; missing, not applicable or unknown values become -1."""
    labels = {}
    for attribute in spec.attributes:
        index = {v: i for i, v in enumerate(attribute.values)}
        lookup = attribute.lookup()
        column = frame[attribute.name].to_list() if attribute.name in frame.columns else [None] * frame.height
        labels[attribute.name] = np.array(
            [index.get(lookup.get(" ".join(str(v).lower().split()), ""), -1) if v is not None else -1
             for v in column],
            dtype=np.int64,
        )
    return labels


def load_labeled(frame: pl.DataFrame, spec: Spec, *, base: str, pixel_spec: images.PixelSpec) -> LabeledSet:
    loaded = images.load_images(frame[spec.image_column].to_list(), base, pixel_spec)
    if not loaded.ok.any():
        raise ValueError("no labeled image could be read")
    labels = {k: torch.from_numpy(v[loaded.ok]) for k, v in encode_labels(frame, spec).items()}
    return LabeledSet(torch.from_numpy(loaded.pixels), labels, int((~loaded.ok).sum()))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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


def attribute_logits(clip: model.Clip, image_emb: torch.Tensor, captions: model.Captions) -> dict[str, torch.Tensor]:
    """Per attribute, (n, k) scaled similarities of images to the value captions."""
    scale = clip.model.logit_scale.exp().clamp(max=100.0)
    return {name: scale * image_emb @ emb.T for name, emb in captions.value_embeddings(clip).items()}


def batch_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over attributes of the cross-entropy on rows whose value is known."""
    losses = [F.cross_entropy(logits[k][labels[k] >= 0], labels[k][labels[k] >= 0])
              for k in logits if (labels[k] >= 0).any()]
    return torch.stack(losses).mean()


@torch.inference_mode()
def evaluate(clip: model.Clip, data: LabeledSet, idx: np.ndarray, captions: model.Captions) -> tuple[float, dict[str, np.ndarray]]:
    """(validation loss, per-attribute logits) over the given rows."""
    clip.model.eval()
    pixels = data.pixels[idx].to(clip.device)
    chunks = [model.image_features(clip.model, pixels[i : i + 256]) for i in range(0, len(pixels), 256)]
    logits = attribute_logits(clip, torch.cat(chunks), captions)
    labels = {k: v[idx].to(clip.device) for k, v in data.labels.items()}
    return float(batch_loss(logits, labels)), {k: v.float().cpu().numpy() for k, v in logits.items()}


def _schedule(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def spread_captions(clip: model.Clip, captions: model.Captions, *, steps: int, lr: float) -> float:
    """Push apart the caption embeddings of each attribute's values; returns the final max cosine.

    A text tower trained from scratch starts with near-identical embeddings for captions that
    share words ("lid", "no lid": cosine ~0.95), which stalls learning of those attributes.
    """
    text = [p for n, p in clip.model.named_parameters() if n.startswith(("text_model.", "text_projection."))]
    optimizer = torch.optim.AdamW(text, lr=lr)
    worst = 1.0
    for _ in range(steps):
        sims = [emb @ emb.T - 2 * torch.eye(len(emb)) for emb in captions.value_embeddings(clip).values()]
        loss = torch.stack([torch.logsumexp(10 * s.flatten(), 0) for s in sims]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        worst = max(float(s.detach().max()) for s in sims)
    return worst


def fit(clip: model.Clip, data: LabeledSet, spec: Spec, config: TrainConfig) -> dict:
    """Train in place; restores the lowest-validation-loss weights and returns training metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    captions = model.Captions(clip, spec)
    train_idx, val_idx = split_indices(len(data.pixels), config.val_fraction, config.seed)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    if config.spread_steps:
        cosine = spread_captions(clip, captions, steps=config.spread_steps, lr=config.lr)
        log.info("value captions spread apart: max cosine within an attribute %.2f", cosine)
    optimizer = torch.optim.AdamW(clip.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(
        s, warmup=config.warmup_epochs * steps_per_epoch, total=config.epochs * steps_per_epoch))
    best = {"val_loss": float("inf"), "epoch": -1, "state": None}
    started, history = time.monotonic(), []
    for epoch in range(config.epochs):
        clip.model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            pixels = data.pixels[rows]
            pixels = augment(pixels, generator) if config.augment else pixels
            logits = attribute_logits(clip, model.image_features(clip.model, pixels.to(clip.device)), captions)
            loss = batch_loss(logits, {k: v[rows].to(clip.device) for k, v in data.labels.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        val_loss, _ = evaluate(clip, data, val_idx, captions)
        history.append({"epoch": epoch, "train_loss": loss.item(), "val_loss": val_loss})
        minutes = (time.monotonic() - started) / 60
        log.info("epoch %d: train loss %.3f, val loss %.3f (%.1f min)", epoch, loss.item(), val_loss, minutes)
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch, "state": copy.deepcopy(clip.model.state_dict())}
        if epoch - best["epoch"] >= config.patience or (config.max_minutes and minutes >= config.max_minutes):
            break
    clip.model.load_state_dict(best["state"])
    clip.model.eval()
    return {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "epochs_run": len(history),
            "minutes": round((time.monotonic() - started) / 60, 2), "train_rows": len(train_idx),
            "val_rows": len(val_idx), "history": history, "val_idx": val_idx}


def calibrate(clip: model.Clip, data: LabeledSet, val_idx: np.ndarray, spec: Spec) -> tuple[dict, dict]:
    """(calibration, validation metrics) per attribute, from the validation split."""
    _, logits = evaluate(clip, data, val_idx, model.Captions(clip, spec))
    calibration, metrics = {}, {}
    for name, attr_logits in logits.items():
        labels = data.labels[name][val_idx].numpy()
        known = labels >= 0
        if known.sum() < 2:
            continue
        fitted = predict.calibrate(attr_logits[known], labels[known], target_precision=spec.target_precision,
                                   error_rate=spec.expected_error_rate)
        probs = predict.softmax(attr_logits[known], temperature=fitted.temperature)
        calibration[name] = fitted.to_dict()
        metrics[name] = {
            "val_rows": int(known.sum()),
            "val_accuracy": float((probs.argmax(1) == labels[known]).mean()),
            "ece_before": predict.expected_calibration_error(predict.softmax(attr_logits[known]), labels[known]),
            "ece_after": predict.expected_calibration_error(probs, labels[known]),
        }
    return calibration, metrics


def finetune(clip: model.Clip, frame: pl.DataFrame, spec: Spec, *, base: str, config: TrainConfig) -> model.Clip:
    """Fine-tune on labeled rows and record metrics and calibration in the model's metadata."""
    data = load_labeled(frame, spec, base=base, pixel_spec=clip.pixels)
    log.info("training on %d labeled products (%d without a readable image)", len(data.pixels), data.dropped)
    result = fit(clip, data, spec, config)
    calibration, metrics = calibrate(clip, data, result.pop("val_idx"), spec)
    clip.meta.update({
        "trained": True,
        "spec_fingerprint": spec.fingerprint(),
        "train_config": asdict(config),
        "training": result | {"labeled_rows": frame.height, "unreadable_images": data.dropped},
        "metrics": metrics,
        "calibration": calibration,
    })
    return clip
