"""Category trees on real product photos: the Grocery Store dataset's three levels as one tree.

Trains the EfficientNet-Lite0 dual encoder (locked mode) on the dataset's ``train`` photos, with
the spec's levels ``top``, ``coarse`` and ``fine`` declared as one category tree, and measures on
its ``val`` photos (other photo sessions, used neither for training nor calibration), per seed:

- accuracy per level of the values chosen level by level (each level's most probable value, as
  without a tree) and of the values of the most probable whole path (as the audit chooses them
  with the tree), from the same model;
- the share of photos whose level-by-level values form no path of the tree;
- the audit's flags with the tree, when 10% of the photos' paths are replaced by another path and
  another 10% blanked: conflict precision and recall per level (a planted error is to be found at
  the highest level where the paths differ) and gap-suggestion accuracy.

    python benchmarks/grocery_tree.py [--data DIR] [--seeds 0,1,2] [--views 2] [--output DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from grocery import DEFAULT_DATA, LEVELS, ROOT, embedded_photos, grocery_spec, load_catalog, splits_for, spread
from heldout import figures_table, flag_cells, flag_figures, held_out_logits, pooled

from clipdq.core import evaluation
from clipdq.core.spec import Spec
from clipdq.model import towers
from clipdq.training import train
from clipdq.training.labeled import LabeledSet, labels_of


def inconsistent_share(chosen: dict[str, tuple[np.ndarray, np.ndarray]], spec: Spec) -> float:
    """Share of rows whose chosen values, level by level, are no path of the spec's tree."""
    tree = spec.trees[0]
    paths = {tuple(path) for path in tree.path_indices()}
    rows = zip(*(chosen[level][0] for level in tree.levels))
    return float(np.mean([tuple(int(v) for v in row) not in paths for row in rows]))


def run_seed(spec: Spec, data: LabeledSet, plain, split, seed: int, views: int) -> dict:
    clip = towers.init_model(spec, "efficientnet-lite0")
    config = train.config_for(clip, mode="locked", seed=seed, views=views)
    cpu = time.process_time()
    outcome = train.train_on(clip, data, spec, config=config, splits=split, plain=plain)
    cpu = (time.process_time() - cpu) / 60
    val_rows, test_rows = split[1], split[2]
    flat = dataclasses.replace(spec, trees=())
    val_logits, test_logits = (held_out_logits(clip, data, spec, rows) for rows in (val_rows, test_rows))
    test_labels = labels_of(data, test_rows)
    flat_calibration, _ = evaluation.calibrate(val_logits, labels_of(data, val_rows), flat)
    temperatures = {
        "flat": {k: v.temperature for k, v in flat_calibration.items()},
        "tree": {k: v.temperature for k, v in outcome["calibration"].items()},
    }
    accuracy = {
        kind: {
            level: figures["test_accuracy"]
            for level, figures in evaluation.held_out_metrics(
                test_logits, test_labels, kind_spec, temperatures=temperatures[kind]
            ).items()
        }
        for kind, kind_spec in (("flat", flat), ("tree", spec))
    }
    flags = flag_figures(test_logits, test_labels, spec, outcome["calibration"])
    result = {
        "seed": seed,
        "cpu_minutes": round(cpu, 2),
        "accuracy": accuracy,
        "flags": flags,
        "pooled_flags": pooled(flags.values()),
        "inconsistent_flat": inconsistent_share(evaluation.choices(test_logits, flat, temperatures["flat"]), spec),
        "inconsistent_tree": inconsistent_share(evaluation.choices(test_logits, spec, temperatures["tree"]), spec),
    }
    print(
        f"seed {seed}: {cpu:.1f} CPU min, accuracy {accuracy}, inconsistent paths level by level "
        f"{result['inconsistent_flat']:.3f}, with the tree {result['inconsistent_tree']:.3f}; "
        f"pooled flags {result['pooled_flags']}",
        flush=True,
    )
    return result


def table(runs: list[dict]) -> list[dict]:

    rows = []
    for level in LEVELS:
        f = pooled(r["flags"][level] for r in runs)
        rows.append(
            {
                "level": level,
                "level by level": spread([r["accuracy"]["flat"][level] for r in runs]),
                "whole path": spread([r["accuracy"]["tree"][level] for r in runs]),
            }
            | flag_cells(f)
        )
    f = pooled(r["flags"][level] for r in runs for level in LEVELS)
    rows.append(
        {
            "level": "pooled",
            "level by level": "inconsistent paths: " + spread([r["inconsistent_flat"] for r in runs]),
            "whole path": "inconsistent paths: " + spread([r["inconsistent_tree"] for r in runs]),
        }
        | flag_cells(f)
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--views", type=int, default=2, help="augmented views per training photo")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "grocery_tree")
    args = parser.parse_args()
    if not (args.data / "train.txt").exists():
        print(f"Grocery Store dataset not found at {args.data}; pass --data or set CLIPDQ_GROCERY_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    frame = load_catalog(args.data)
    spec = grocery_spec(frame, tree=True)
    data, plain, features = embedded_photos(frame, spec, args.data)
    runs = [
        run_seed(spec, data, plain, splits_for(frame, features, seed=seed), seed, args.views)
        for seed in (int(s) for s in args.seeds.split(","))
    ]
    columns = [
        "level",
        "level by level",
        "whole path",
        "conflict precision",
        "conflict recall",
        "flags / planted",
        "gap accuracy",
        "gap recall",
    ]
    report = figures_table(table(runs), columns)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(report + "\n")
    (args.output / "results.json").write_text(json.dumps(runs, default=float))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
