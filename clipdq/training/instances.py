"""Instance similarity in full mode: rows that show one product (``TrainConfig.instance_column``)
are pulled towards their product's *anchor*, its catalog image (a train-only row) where it has one,
else its first training row, so that a product's photos and its catalog image meet in the image
space and matching by image alone finds the one from the other.

``AnchorBank`` keeps every product's anchor embedding, refreshed whenever the anchor is embedded:
each training step embeds, beside its rows, the anchors of up to ``ANCHORS_PER_STEP`` of their
products, and adds the cross-entropy of each row's similarities to all the anchors against its own
product's (the anchors embedded in the step take part with their gradients).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ANCHORS_PER_STEP = 8  # anchors embedded beside a step's rows: a quarter more images per step at batch 32
TEMPERATURE = 0.1  # of the similarities to the anchors


class AnchorBank:
    """The training rows' products (``product_of``: row -> product, -1 where none), their anchor rows
    and the anchors' latest embeddings (``embeddings``, set by ``fill``)."""

    def __init__(self, instances: np.ndarray, train_only: np.ndarray | None, train_idx: np.ndarray):
        rows = train_idx[instances[train_idx] >= 0]
        _, inverse, counts = np.unique(instances[rows], return_inverse=True, return_counts=True)
        kept = counts[inverse] >= 2  # a product seen once has nothing to pull together
        rows, inverse = rows[kept], np.unique(inverse[kept], return_inverse=True)[1]
        self.product_of = np.full(len(instances), -1)
        self.product_of[rows] = inverse
        first = rows if train_only is None else rows[np.argsort(~train_only[rows], kind="stable")]
        # each product's first row in that order: a train-only row where it has one
        _, at = np.unique(self.product_of[first], return_index=True)
        self.anchor_rows = first[at]  # np.unique sorts: in product order
        self.is_anchor = np.zeros(len(instances), bool)
        self.is_anchor[self.anchor_rows] = True
        self.embeddings = torch.empty(0)

    @property
    def products(self) -> int:
        return len(self.anchor_rows)

    def fill(self, embeddings: torch.Tensor) -> None:
        """Set every anchor's embedding, (products, d) in product order."""
        self.embeddings = embeddings.detach().float()

    def anchors_for(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Anchor rows to embed beside ``rows``: those of up to ANCHORS_PER_STEP of their products
        whose anchor is not among them already."""
        products = np.unique(self.product_of[rows[~self.is_anchor[rows]]])
        products = np.setdiff1d(products[products >= 0], self.product_of[rows[self.is_anchor[rows]]])
        picked = rng.choice(products, size=min(ANCHORS_PER_STEP, len(products)), replace=False)
        return self.anchor_rows[np.sort(picked)]

    def loss(self, rows: np.ndarray, embeddings: torch.Tensor) -> torch.Tensor | None:
        """The step's instance loss over ``rows`` and their L2-normalised ``embeddings`` (anchors
        among them, which also refresh the bank); None where no row has an anchor to meet."""
        products = torch.from_numpy(self.product_of[rows]).to(embeddings.device)
        anchors = torch.from_numpy(self.is_anchor[rows]).to(embeddings.device)
        bank = self.embeddings.to(embeddings.device).index_put((products[anchors],), embeddings[anchors])
        self.embeddings = bank.detach()
        queries = (products >= 0) & ~anchors
        if not queries.any():
            return None
        return F.cross_entropy(embeddings[queries] @ bank.T / TEMPERATURE, products[queries])


def anchor_bank(
    instances: np.ndarray | None, train_only: np.ndarray | None, train_idx: np.ndarray
) -> AnchorBank | None:
    """The bank of the training rows' products, None where no product has two training rows."""
    if instances is None:
        return None
    bank = AnchorBank(instances, train_only, train_idx)
    return bank if bank.products else None
