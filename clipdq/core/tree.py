"""Predicted values per attribute, consistent with the spec's category trees (numpy only).

``pred_probs`` maps attribute -> (n, k) probabilities of its values; a choice is (value index,
its probability), each (n,).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from clipdq.core.spec import Spec, Tree

TINY = 1e-12  # keeps log(0) finite


def path_probabilities(pred_probs: dict[str, np.ndarray], tree: Tree) -> np.ndarray:
    """(n, paths) probability of each path through ``tree``: the product of its levels'
    probabilities, normalised over the tree's paths."""
    index = np.array(tree.path_indices())
    log_p = np.sum(
        [np.log(pred_probs[level][:, index[:, depth]] + TINY) for depth, level in enumerate(tree.levels)], axis=0
    )
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


def _agreeing_pairs(tree: Tree, depth: int) -> float:
    """Share of ordered pairs of distinct paths that agree on the levels above ``depth``."""
    n = len(tree.paths)
    if depth == 0 or n < 2:
        return 1.0
    groups = Counter(path[:depth] for path in tree.paths).values()
    return sum(g * (g - 1) for g in groups) / (n * (n - 1))


def conflict_error_rates(spec: Spec) -> dict[str, float]:
    """Per attribute, the share of wrong catalog values among the rows where a conflict is reported
    at it, which sets its conflict bar: the spec's ``expected_error_rate``, except at a tree's levels.

    A tree's conflict is reported at the highest level where the catalog's path departs from the
    image's, so a level is judged only where the levels above agree. Reading the error rate ``e``
    as the share of wrong paths, each another path of the tree at random, a level ``d`` is wrong
    while the levels above are right for a share e * D / (1 - e + e * A) of those rows, where A is
    the share of pairs of distinct paths that agree above ``d`` and D the share that also differ at it.
    """
    e = spec.expected_error_rate
    rates = {name: e for name in spec.names}
    for tree in spec.trees:
        for depth, level in enumerate(tree.levels):
            above, through = _agreeing_pairs(tree, depth), _agreeing_pairs(tree, depth + 1)
            rates[level] = e * (above - through) / (1 - e + e * above)
    return rates
