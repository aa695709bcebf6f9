"""Shared by the fine-tuning benchmarks: held-out figures of a trained model, flags included.

``flag_figures`` plants errors in held-out labels (a share replaced by another value, another
share blanked; for a category tree, the whole path replaced by another path or blanked) and
runs the audit's own ``compare`` with the model's calibration and the audit's choice of values,
so the precision and recall it reports are those of the flags a data steward would see. A flag
is right when the catalog's value is wrong; a tree's planted error is to be found at the highest
level where the planted path differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import polars as pl

from clipdq.checks.compare import compare
from clipdq.core import evaluation
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec
from clipdq.model import towers
from clipdq.pipeline import audit
from clipdq.training.calibration import logits_from
from clipdq.training.labeled import LabeledSet


def held_out_logits(clip: towers.Clip, data: LabeledSet, spec: Spec, rows: np.ndarray) -> dict[str, np.ndarray]:
    value_emb = clip.value_emb if clip.value_emb is not None else towers.embed_captions(clip, spec)
    return logits_from(towers.embed_images(clip, data.pixels[rows].numpy()), value_emb, clip)


def _share(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def flag_figures(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    spec: Spec,
    calibration: dict[str, Calibration],
    *,
    share: float = 0.1,
    repeats: int = 10,
) -> dict[str, dict]:
    """Per attribute: conflict precision and recall, gap-suggestion accuracy and recall, with counts,
    pooled over ``repeats`` independent plantings in the same held-out rows."""
    spec = dataclasses.replace(spec, attributes=tuple(dataclasses.replace(a, applies_to={}) for a in spec.attributes))
    plantings = [_planted_audit(logits, labels, spec, calibration, share=share, seed=s) for s in range(repeats)]
    joined = pl.concat(plantings).filter(pl.col("planted") != "unlabeled")  # no truth to score against
    out = {}
    for (name,), rows in joined.group_by("attribute", maintain_order=True):
        flagged, planted = rows.filter(pl.col("status") == "conflict"), rows.filter(pl.col("planted") == "conflict")
        suggested, gaps = rows.filter(pl.col("status") == "gap"), rows.filter(pl.col("planted") == "gap")
        out[name] = {
            "conflict_precision": _share(
                flagged.filter(pl.col("existing_value") != pl.col("true_value")).height, flagged.height
            ),
            "conflict_recall": _share(planted.filter(pl.col("status") == "conflict").height, planted.height),
            "flags": flagged.height,
            "planted": planted.height,
            "gap_accuracy": _share(
                suggested.filter(pl.col("predicted_value") == pl.col("true_value")).height, suggested.height
            ),
            "gap_recall": _share(suggested.height, gaps.height),
            "suggestions": suggested.height,
            "gaps": gaps.height,
        }
    return out


def _planted_audit(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    spec: Spec,
    calibration: dict[str, Calibration],
    *,
    share: float,
    seed: int,
) -> pl.DataFrame:
    """Findings joined with what was planted, for one random planting of errors and gaps."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(labels.values())))
    ids = [f"{seed}-{i}" for i in range(n)]
    columns, truth = {spec.id_column: ids}, []
    planted = {}
    for attribute in spec.attributes:
        if spec.tree_of(attribute.name) is None:
            columns[attribute.name], planted[attribute.name] = _plant_value(
                labels[attribute.name], attribute.values, rng, share
            )
    for tree in spec.trees:
        for level, (existing, kind) in _plant_path(labels, tree, rng, share).items():
            columns[level], planted[level] = existing, kind
    for attribute in spec.attributes:
        values = np.array(attribute.values, dtype=object)
        truth.append(
            pl.DataFrame(
                {
                    "product_id": ids,
                    "attribute": attribute.name,
                    "planted": planted[attribute.name],
                    "true_value": list(values[labels[attribute.name].clip(0)]),
                }
            )
        )
    temperatures = {name: fitted.temperature for name, fitted in calibration.items()}
    predictions = audit.predictions_of(ids, evaluation.choices(logits, spec, temperatures), spec)
    findings = compare(pl.DataFrame(columns), predictions, spec=spec, calibration=calibration)
    return findings.join(pl.concat(truth), on=["product_id", "attribute"])


def _plant_value(y: np.ndarray, vocabulary, rng: np.random.Generator, share: float) -> tuple[list, np.ndarray]:
    """(catalog values, what was planted per row): a ``share`` replaced by another value, another blanked."""
    k, values = len(vocabulary), np.array(vocabulary, dtype=object)
    draw, other = rng.random(len(y)), (y + rng.integers(1, k, len(y))) % k
    planted = np.where(
        y < 0, "unlabeled", np.where(draw < share, "conflict", np.where(draw < 2 * share, "gap", "none"))
    )
    existing = np.where(planted == "conflict", values[other], values[y.clip(0)])
    existing[(planted == "gap") | (planted == "unlabeled")] = None
    return list(existing), planted


def _plant_path(labels: dict[str, np.ndarray], tree, rng: np.random.Generator, share: float) -> dict[str, tuple]:
    """Per level, (catalog values, what was planted): a ``share`` of products get another whole
    path (planted ``conflict`` at the highest level where it differs, ``parent`` below it),
    another share none. Rows without a leaf label are ``unlabeled``."""
    paths = np.array(tree.path_indices())
    leaf = labels[tree.levels[-1]]
    path_of_leaf = {path[-1]: i for i, path in enumerate(paths)}
    true_path = np.array([path_of_leaf.get(v, -1) for v in leaf])
    draw = rng.random(len(leaf))
    other = rng.integers(0, len(paths) - 1, len(leaf))
    other += other >= true_path  # any path but the true one
    given = np.where(draw < share, other, true_path.clip(0))
    differs = paths[given] != paths[true_path.clip(0)]  # (n, levels)
    first = np.where(differs.any(axis=1), differs.argmax(axis=1), len(tree.levels))
    out = {}
    for depth, level in enumerate(tree.levels):
        kind = np.where(depth == first, "conflict", np.where(depth > first, "parent", "none"))
        kind = np.where(true_path < 0, "unlabeled", np.where((draw >= share) & (draw < 2 * share), "gap", kind))
        existing = np.array(tree.values_at(depth), dtype=object)[paths[given, depth]]
        existing[(kind == "gap") | (kind == "unlabeled")] = None
        out[level] = (list(existing), kind)
    return out


def pooled(figures: Iterable[dict]) -> dict[str, float]:
    """Precision and recall of several per-attribute figures of ``flag_figures`` together: the
    attributes of one run, or one attribute over several runs."""
    figures = list(figures)
    total = {key: sum(f[key] for f in figures) for key in ("flags", "planted", "suggestions", "gaps")}
    right_flags = sum(f["conflict_precision"] * f["flags"] for f in figures if f["flags"])
    found = sum(f["conflict_recall"] * f["planted"] for f in figures if f["planted"])
    right_gaps = sum(f["gap_accuracy"] * f["suggestions"] for f in figures if f["suggestions"])
    return {
        "conflict_precision": _share(right_flags, total["flags"]),
        "conflict_recall": _share(found, total["planted"]),
        "gap_accuracy": _share(right_gaps, total["suggestions"]),
        "gap_recall": _share(total["suggestions"], total["gaps"]),
        **total,
    }


def flag_cells(figures: dict) -> dict:
    """The table cells of one set of flag figures (``flag_figures`` or ``pooled``)."""
    return {
        "conflict precision": figures["conflict_precision"],
        "conflict recall": figures["conflict_recall"],
        "flags / planted": f"{figures['flags']} / {figures['planted']}",
        "gap accuracy": figures["gap_accuracy"],
        "gap recall": figures["gap_recall"],
    }


def figures_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of dicts, floats to three decimals."""

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
