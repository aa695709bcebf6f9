"""Prototype mode: learn each attribute's value embeddings on frozen image embeddings.

A cosine prototype classifier: the image tower stays as it is; each value's embedding starts
from its caption embedding and is trained with cross-entropy on the labeled rows, keeping the
step with the lowest validation loss. Seconds on a CPU, since images are embedded only once.

``fit`` works on embeddings alone; ``fit_model`` on a model and its labeled set (vocabulary as in
``labeled``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec
from clipdq.core.splits import Splits
from clipdq.model import towers
from clipdq.training.labeled import LabeledSet, label_arrays

log = logging.getLogger(__name__)


def fit(
    image_emb: np.ndarray,
    labels: dict[str, np.ndarray],
    init: dict[str, np.ndarray],
    *,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    scale: float,
    steps: int = 3000,
    patience: int = 100,
    lr: float = 0.01,
    weight_decay: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict]:
    """(value embeddings per attribute, each (k, d) and L2-normalised; training summary).

    Full-batch AdamW for at most ``steps``, stopping ``patience`` steps after the best validation loss.
    ``image_emb`` is (n, d) normalised; ``labels`` hold value indices with -1 where unknown.
    """
    x = torch.from_numpy(image_emb).float()
    weights = {name: torch.nn.Parameter(torch.from_numpy(emb).float().clone()) for name, emb in init.items()}
    optimizer = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=weight_decay)
    y = {name: torch.from_numpy(values) for name, values in labels.items()}

    def loss_on(rows: np.ndarray) -> torch.Tensor:
        losses = []
        for name, w in weights.items():
            known = rows[y[name][rows].numpy() >= 0]
            if len(known):
                logits = scale * x[known] @ F.normalize(w, dim=-1).T
                losses.append(F.cross_entropy(logits, y[name][known]))
        return torch.stack(losses).mean()

    best: dict[str, Any] = {"val_loss": float("inf"), "step": -1, "weights": None}
    for step in range(steps):
        if step - best["step"] > patience:
            break
        loss = loss_on(train_idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = float(loss_on(val_idx))
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "step": step,
                "weights": {k: F.normalize(w.detach(), dim=-1).numpy().copy() for k, w in weights.items()},
            }
    return best["weights"], {"best_step": best["step"], "best_val_loss": best["val_loss"], "steps_run": step + 1}


def fit_model(clip: towers.Clip, data: LabeledSet, spec: Spec, config: TrainConfig, splits: Splits) -> dict:
    """Learn value embeddings on the model's frozen image embeddings; sets ``clip.value_emb``."""
    started = time.monotonic()
    train_idx, val_idx, _ = splits
    torch.manual_seed(config.seed)
    clip.value_emb, result = fit(
        towers.embed_images(clip, data.pixels.numpy()),
        label_arrays(data),
        towers.embed_captions(clip, spec),
        train_idx=train_idx,
        val_idx=val_idx,
        scale=towers.logit_scale(clip),
    )
    log.info("prototypes: best validation loss %.3f at step %d", result["best_val_loss"], result["best_step"])
    return result | {"minutes": round((time.monotonic() - started) / 60, 2), "device": clip.device.type}
