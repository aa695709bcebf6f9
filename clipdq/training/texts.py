"""The text tower's own training: value captions pushed apart before a new tower learns
(``spread_captions``), and the labeled rows' texts (titles, descriptions) taught to meet their
images after the attributes are learned (``fit_texts``, with the ``Titles`` loss).

Vocabulary as in ``labeled``: ``data`` a LabeledSet, ``splits`` (train, val, test) row indices;
``embed(rows)`` gives the (fixed) image embeddings of labeled rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from clipdq.core.presets import TrainConfig
from clipdq.core.splits import Splits
from clipdq.model import towers
from clipdq.training.labeled import LabeledSet

log = logging.getLogger(__name__)

TEXT_TOWER = ("text_model.", "text_projection.")  # the parameters these steps train (name prefixes)


class Titles:
    """The labeled rows' texts (titles, descriptions), each distinct one tokenized once, for a
    contrastive loss that teaches the text tower to meet the images they describe."""

    def __init__(self, clip: towers.Clip, texts: np.ndarray):
        distinct, self.index = np.unique(texts.astype(str), return_inverse=True)
        self.known = texts != ""
        self.tokens = towers.tokenize(clip, distinct.tolist())

    def loss(self, clip: towers.Clip, image_emb: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Cross-entropy of each image against the distinct texts of the batch ``rows`` (the rows
        of ``image_emb``), its own text the target; rows without a text take no part. Only the
        text tower learns from it: the image embeddings and the logit scale stay what the
        attributes make them."""
        keep = self.known[rows]
        if not keep.any():
            return image_emb.sum() * 0.0
        distinct, target = np.unique(self.index[rows[keep]], return_inverse=True)
        text_emb = towers.text_features(clip, {k: v[distinct] for k, v in self.tokens.items()})
        scale = clip.model.logit_scale.detach().exp().clamp(max=100.0)
        logits = scale * image_emb.detach()[torch.from_numpy(keep).to(image_emb.device)] @ text_emb.T
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(target).to(logits.device))


def _text_parameters(clip: towers.Clip) -> list[torch.nn.Parameter]:
    return [p for n, p in clip.model.named_parameters() if n.startswith(TEXT_TOWER)]


def spread_captions(clip: towers.Clip, captions: towers.Captions, *, steps: int, lr: float) -> float:
    """Push apart the caption embeddings of each attribute's values; returns the final max cosine.

    A text tower trained from scratch starts with near-identical embeddings for captions that
    share words ("lid", "no lid": cosine ~0.95), which stalls learning of those attributes.
    """
    optimizer = torch.optim.AdamW(_text_parameters(clip), lr=lr)
    worst = 1.0
    for _ in range(steps):
        embeddings = captions.value_embeddings(clip).values()
        sims = [emb @ emb.T - 2 * torch.eye(len(emb), device=emb.device) for emb in embeddings]
        loss = torch.stack([torch.logsumexp(10 * s.flatten(), 0) for s in sims]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        worst = max(float(s.detach().max()) for s in sims)
    return worst


def _text_epoch(
    clip: towers.Clip,
    titles: Titles,
    optimizer,
    rows: np.ndarray,
    image_emb: torch.Tensor,
    order: np.ndarray,
    batch_size: int,
) -> None:
    """One pass over ``rows`` (with their ``image_emb``) in the given ``order``."""
    for start in range(0, len(order), batch_size):
        picks = order[start : start + batch_size]
        loss = titles.loss(clip, image_emb[picks], rows[picks])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fit_texts(clip: towers.Clip, data: LabeledSet, embed, config: TrainConfig, splits: Splits) -> dict:
    """Teach the text tower the labeled rows' texts (``Titles``) against their image embeddings
    (``embed(rows)``, fixed), keeping the epoch of lowest validation loss."""
    started = time.monotonic()
    assert data.texts is not None  # train_on teaches texts only where the rows have them
    titles = Titles(clip, data.texts)
    train_rows, val_rows = (rows[titles.known[rows]] for rows in splits[:2])
    if not len(train_rows) or not len(val_rows):
        return {"epochs_run": 0, "why": "no texts in the train or validation split"}
    train_emb, val_emb = (torch.from_numpy(embed(rows)).to(clip.device) for rows in (train_rows, val_rows))
    optimizer = torch.optim.AdamW(_text_parameters(clip), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)

    def val_loss() -> float:
        with torch.no_grad():
            return float(titles.loss(clip, val_emb, val_rows))

    def text_state() -> dict:
        return {k: v.detach().clone() for k, v in clip.model.state_dict().items() if k.startswith(TEXT_TOWER)}

    best: dict[str, Any] = {"epoch": 0, "val_loss": val_loss(), "state": text_state()}
    for epoch in range(1, config.text_epochs + 1):
        _text_epoch(clip, titles, optimizer, train_rows, train_emb, rng.permutation(len(train_rows)), config.batch_size)
        if (current := val_loss()) < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": current, "state": text_state()}
    clip.model.load_state_dict(best["state"], strict=False)
    log.info("texts: best validation loss %.3f at epoch %d of %d", best["val_loss"], best["epoch"], config.text_epochs)
    return {
        "rows": len(train_rows),
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": config.text_epochs,
        "minutes": round((time.monotonic() - started) / 60, 2),
    }
