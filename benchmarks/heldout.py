"""Shared by the fine-tuning benchmarks: held-out figures of a trained model, flags included.

``flag_figures`` plants errors in held-out labels (a share replaced by another value, another
share blanked) and runs the audit's own ``compare`` with the model's calibration, so the
precision and recall it reports are those of the flags a data steward would see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import polars as pl

from clipdq import model, predict, train
from clipdq.compare import PREDICTIONS_SCHEMA, compare
from clipdq.predict import Calibration
from clipdq.spec import Spec


def held_out_logits(clip: model.Clip, data: train.LabeledSet, spec: Spec, rows: np.ndarray) -> dict[str, np.ndarray]:
    return train.row_logits(clip, data, rows, model.Captions(clip, spec))


def _share(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def flag_figures(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: Spec, calibration: dict[str, dict],
    *, share: float = 0.1, repeats: int = 10,
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
            "conflict_precision": _share(flagged.filter(pl.col("planted") == "conflict").height, flagged.height),
            "conflict_recall": _share(planted.filter(pl.col("status") == "conflict").height, planted.height),
            "flags": flagged.height, "planted": planted.height,
            "gap_accuracy": _share(suggested.filter(pl.col("predicted_value") == pl.col("true_value")).height,
                                   suggested.height),
            "gap_recall": _share(suggested.height, gaps.height), "suggestions": suggested.height, "gaps": gaps.height,
        }
    return out


def _planted_audit(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: Spec, calibration: dict[str, dict],
    *, share: float, seed: int,
) -> pl.DataFrame:
    """Findings joined with what was planted, for one random planting of errors and gaps."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(labels.values())))
    ids = [f"{seed}-{i}" for i in range(n)]
    columns, predictions, truth = {spec.id_column: ids}, [], []
    for attribute in spec.attributes:
        y, k, values = labels[attribute.name], len(attribute.values), np.array(attribute.values, dtype=object)
        draw, other = rng.random(n), (y + rng.integers(1, k, n)) % k
        planted = np.where(y < 0, "unlabeled", np.where(draw < share, "conflict",
                                                          np.where(draw < 2 * share, "gap", "none")))
        existing = np.where(planted == "conflict", values[other], values[y.clip(0)])
        existing[(planted == "gap") | (planted == "unlabeled")] = None
        columns[attribute.name] = list(existing)
        probs = predict.softmax(logits[attribute.name], temperature=calibration[attribute.name]["temperature"])
        predictions.append(pl.DataFrame({"product_id": ids, "attribute": attribute.name,
                                         "predicted_value": list(values[probs.argmax(1)]),
                                         "confidence": probs.max(1), "image_error": None}, schema=PREDICTIONS_SCHEMA))
        truth.append(pl.DataFrame({"product_id": ids, "attribute": attribute.name, "planted": planted,
                                   "true_value": list(values[y.clip(0)])}))
    findings = compare(pl.DataFrame(columns), pl.concat(predictions), spec=spec,
                       calibration={k: Calibration(**v) for k, v in calibration.items()})
    return findings.join(pl.concat(truth), on=["product_id", "attribute"])


def pooled(figures: Iterable[dict]) -> dict[str, float]:
    """Precision and recall of several per-attribute figures of ``flag_figures`` together: the
    attributes of one run, or one attribute over several runs."""
    figures = list(figures)
    total = {key: sum(f[key] for f in figures) for key in ("flags", "planted", "suggestions", "gaps")}
    right_flags = sum(f["conflict_precision"] * f["flags"] for f in figures if f["flags"])
    found = sum(f["conflict_recall"] * f["planted"] for f in figures if f["planted"])
    right_gaps = sum(f["gap_accuracy"] * f["suggestions"] for f in figures if f["suggestions"])
    return {"conflict_precision": _share(right_flags, total["flags"]), "conflict_recall": _share(found, total["planted"]),
            "gap_accuracy": _share(right_gaps, total["suggestions"]), "gap_recall": _share(total["suggestions"], total["gaps"]),
            **total}


def figures_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of dicts, floats to three decimals."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
