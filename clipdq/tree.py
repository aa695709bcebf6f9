"""Predicted values per attribute, consistent with the spec's category trees (numpy only).

``pred_probs`` maps attribute -> (n, k) probabilities of its values; a choice is (value index,
its probability), each (n,).
"""

from __future__ import annotations

import numpy as np

from clipdq.spec import Spec, Tree

TINY = 1e-12  # keeps log(0) finite


def path_probabilities(pred_probs: dict[str, np.ndarray], tree: Tree) -> np.ndarray:
    """(n, paths) probability of each path through ``tree``: the product of its levels'
    probabilities, normalised over the tree's paths."""
    index = np.array(tree.path_indices())
    log_p = sum(np.log(pred_probs[level][:, index[:, depth]] + TINY) for depth, level in enumerate(tree.levels))
    log_p = log_p - log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(axis=1, keepdims=True)


def tree_choices(pred_probs: dict[str, np.ndarray], tree: Tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per level: the value on the most probable whole path, with its probability over every
    path through it (so a parent is at least as sure as its child)."""
    index = np.array(tree.path_indices())
    paths = path_probabilities(pred_probs, tree)
    best = paths.argmax(axis=1)
    choices = {}
    for depth, level in enumerate(tree.levels):
        chosen = index[best, depth]
        through = index[:, depth][None, :] == chosen[:, None]  # (n, paths): paths through the chosen value
        choices[level] = (chosen, (paths * through).sum(axis=1))
    return choices


def choose(pred_probs: dict[str, np.ndarray], spec: Spec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per attribute of ``pred_probs``: its most probable value, or for a tree's levels, the
    values of the tree's most probable path (``tree_choices``)."""
    choices = {name: (p.argmax(axis=1), p.max(axis=1)) for name, p in pred_probs.items()}
    for tree in spec.trees:
        if all(level in pred_probs for level in tree.levels):
            choices |= tree_choices(pred_probs, tree)
    return choices
