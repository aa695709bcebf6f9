"""Fine-tuning on real product photos: the Grocery Store dataset's three category levels.

Builds a labeled catalog from the dataset (attributes: top level, coarse class, fine class) and
starts from the pretrained EfficientNet-Lite0 image tower with a new text tower
(``clipdq init-model --arch efficientnet-lite0``). Training and calibration use the dataset's
``train`` photos, split as ``clipdq finetune`` splits them (near-duplicate images grouped, so
validation holds no near-copy of a training photo); every figure is measured on its ``val``
photos, shot in other sessions and used neither for training nor for calibration. Per level it
reports accuracy and macro-F1 of the new model (chance), the prototype probe, locked fine-tuning
(three seeds) and fine-tuning with the tower's top blocks unlocked, with CPU time per mode; the
precision and recall of the audit's flags when 10% of the held-out labels are replaced and
another 10% blanked; and learning curves of locked fine-tuning.

    python benchmarks/grocery.py [--data DIR] [--output DIR] [--base-model M] [--seeds 0,1,2]
                                 [--methods probe,locked,unlocked] [--skip-curve]

The dataset is not part of the project: point --data (or CLIPDQ_GROCERY_DIR) at a copy; the
script exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from heldout import figures_table, flag_cells, flag_figures, held_out_logits, pooled

from clipdq.core import evaluation, splits
from clipdq.core.spec import Spec, parse_spec
from clipdq.core.splits import Splits
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.training import curves, locked, train
from clipdq.training.labeled import LabeledSet, labels_of, load_labeled

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CLIPDQ_GROCERY_DIR", ROOT.parent / "shared" / "datasets" / "grocery_store"))
LEVELS = ("top", "coarse", "fine")


def load_catalog(data: Path) -> pl.DataFrame:
    """One row per photo: product_id, image path, split (train / holdout) and the three levels."""
    with open(data / "classes.csv", newline="") as handle:
        classes = {
            int(r["Class ID (int)"]): (r["Coarse Class Name (str)"], r["Class Name (str)"])
            for r in csv.DictReader(handle)
        }
    rows = []
    for split, listing in (("train", "train.txt"), ("holdout", "val.txt")):
        for line in (data / listing).read_text().splitlines():
            path, fine_id, _ = (part.strip() for part in line.split(","))
            coarse, fine = classes[int(fine_id)]
            rows.append(
                {
                    "product_id": path.rsplit(".", 1)[0],
                    "image": str(data / path),
                    "split": split,
                    "top": path.split("/")[1],
                    "coarse": coarse,
                    "fine": fine,
                }
            )
    return pl.DataFrame(rows)


def catalog_images(data: Path) -> pl.DataFrame:
    """One row per product: its catalog ("iconic") studio photo, labeled like the shelf photos."""
    with open(data / "classes.csv", newline="") as handle:
        classes = list(csv.DictReader(handle))
    paths = [r["Iconic Image Path (str)"].lstrip("/") for r in classes]  # iconic-images-.../<top>/...
    return pl.DataFrame(
        {
            "product_id": [f"iconic/{r['Class Name (str)']}" for r in classes],
            "image": [str(data / p) for p in paths],
            "split": "catalog",
            "top": [p.split("/")[1] for p in paths],
            "coarse": [r["Coarse Class Name (str)"] for r in classes],
            "fine": [r["Class Name (str)"] for r in classes],
        }
    )


def spec_document(frame: pl.DataFrame, *, tree: bool = False) -> dict:
    """The spec of the three levels, as its YAML holds it: every value each level takes in ``frame``,
    or with ``tree``, every path through the three levels that ``frame`` holds, as one category tree."""
    if tree:
        paths = sorted({"/".join(row) for row in frame.select(LEVELS).iter_rows()})
        return {"target_precision": 0.9, "attributes": {"category": {"levels": list(LEVELS), "paths": paths}}}
    return {
        "target_precision": 0.9,
        "attributes": {level: {"values": sorted(frame[level].unique().to_list())} for level in LEVELS},
    }


def grocery_spec(frame: pl.DataFrame, *, tree: bool = False) -> Spec:
    return parse_spec(yaml.safe_dump(spec_document(frame, tree=tree)))


def write_spec(frame: pl.DataFrame, data: Path, path: Path, *, tree: bool = False) -> Path:
    """The spec as a YAML file the clipdq commands read, images under ``data``."""
    path.write_text(yaml.safe_dump(spec_document(frame, tree=tree) | {"image_roots": [str(data.resolve())]}))
    return path


def splits_for(frame: pl.DataFrame, features: np.ndarray, *, seed: int) -> Splits:
    """(train, validation, test) rows: the dataset's train photos split as ``clipdq finetune`` does
    (a quarter for validation, near-duplicate images grouped by their tower features), and its
    held-out photos for test.

    Photos of one class are consecutive shots of the same shelf: a random validation split of the
    train photos holds near-copies of training images, and calibration fitted on it over-trusts
    the model (measured in docs/benchmarks.md). The held-out photos come from other sessions.
    """
    on_train = np.flatnonzero(frame["split"].to_numpy() == "train")
    labels = {level: frame[level].cast(pl.Categorical).to_physical().to_numpy()[on_train] for level in LEVELS}
    groups = splits.near_duplicate_groups(features[on_train])
    fit, val, _ = splits.split_indices(labels, val_fraction=0.25, test_fraction=0.0, seed=seed, groups=groups)
    return on_train[fit], on_train[val], np.flatnonzero(frame["split"].to_numpy() != "train")


def spread(values: list[float]) -> str:
    """Mean and range over seeds (the value itself for one seed; n/a for none)."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def embedded_photos(frame: pl.DataFrame, spec: Spec, data: Path) -> tuple[LabeledSet, object, np.ndarray]:
    """(labeled photos, the locked tower's kept activations, its pooled features), decoded and
    embedded once for every seed; prints how long that took."""
    base = towers.init_model(spec, "efficientnet-lite0")
    started = time.monotonic()
    labeled = load_labeled(frame, spec, access=access_for(str(data)), pixel_spec=base.pixels)
    plain = locked.plain_activations(base, labeled, 0)
    print(f"{len(labeled.pixels)} photos decoded and embedded in {time.monotonic() - started:.0f} s", flush=True)
    return labeled, plain, locked.pooled_features(base, plain, 0)


def level_rows(name: str, runs: list[dict], spec: Spec) -> list[dict]:
    """Per level: mean accuracy and macro-F1 over the runs (with their range), flags pooled over the runs."""
    rows = []
    for level in LEVELS:
        accuracy = [r["metrics"][level]["test_accuracy"] for r in runs]
        f = pooled(r["flags"][level] for r in runs)
        spread = f" ({min(accuracy):.3f} to {max(accuracy):.3f})" if len(runs) > 1 else ""
        rows.append(
            {
                "model": f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''}, "
                f"{np.mean([r['cpu_minutes'] for r in runs]):.1f} CPU min)",
                "level": level,
                "values": len(spec.attribute(level).values),
                "accuracy": f"{np.mean(accuracy):.3f}{spread}",
                "macro_f1": float(np.mean([r["metrics"][level]["test_macro_f1"] for r in runs])),
            }
            | flag_cells(f)
        )
    pooled_all = pooled(r["flags"][level] for r in runs for level in LEVELS)
    rows.append({"model": "", "level": "pooled"} | flag_cells(pooled_all))
    return rows


METHODS = {  # key for --methods: name, training options, seeds (all of --seeds or the first)
    "probe": ("prototype probe", {"mode": "prototype"}, "first"),
    "locked": ("locked (4 views)", {"mode": "locked"}, "all"),
    "unlocked": (
        "top 3 blocks unlocked, 2 views",
        {"mode": "locked", "unlock_blocks": 3, "views": 2, "epochs": 12, "patience": 4},
        "first",
    ),
}


def run(args: argparse.Namespace) -> dict:
    frame = load_catalog(args.data)
    spec = grocery_spec(frame)

    def make_model() -> towers.Clip:
        return towers.load_model(args.base_model) if args.base_model else towers.init_model(spec, "efficientnet-lite0")

    base = make_model()
    started = time.monotonic()
    data = load_labeled(frame, spec, access=access_for(str(args.data)), pixel_spec=base.pixels)
    plain = locked.plain_activations(base, data, 0)  # the frozen tower's features of every photo, once
    features = locked.pooled_features(base, plain, 0)
    print(f"{len(data.pixels)} photos decoded and embedded in {time.monotonic() - started:.0f} s", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    split_of = {seed: splits_for(frame, features, seed=seed) for seed in seeds}
    rows = {name: len(part) for name, part in zip(("train", "val", "test"), split_of[seeds[0]])}
    print(f"rows per split: {rows}", flush=True)
    test_rows = split_of[seeds[0]][2]
    test_labels = labels_of(data, test_rows)
    results: dict = {"rows": rows, "tables": {}}

    untrained = evaluation.held_out_metrics(held_out_logits(base, data, spec, test_rows), test_labels, spec)
    majority = {level: float(np.bincount(test_labels[level]).max() / len(test_labels[level])) for level in LEVELS}
    first_row = f"zero-shot {args.base_model}" if args.base_model else "new text tower (chance)"
    table = [
        {
            "model": first_row,
            "level": level,
            "values": len(spec.attribute(level).values),
            "accuracy": untrained[level]["test_accuracy"],
            "macro_f1": untrained[level]["test_macro_f1"],
            "chance": 1 / len(spec.attribute(level).values),
            "majority": majority[level],
        }
        for level in LEVELS
    ]

    for name, options, which in (METHODS[key] for key in args.methods.split(",")):
        runs = []
        for seed in seeds if which == "all" else seeds[:1]:
            clip = make_model()
            config = train.config_for(clip, seed=seed, **options)
            cpu, wall = time.process_time(), time.monotonic()
            kept = plain if config.mode == "locked" and not config.unlock_blocks else None
            outcome = train.train_on(clip, data, spec, config=config, splits=split_of[seed], plain=kept)
            cpu, wall = (time.process_time() - cpu) / 60, (time.monotonic() - wall) / 60
            flags = flag_figures(
                held_out_logits(clip, data, spec, test_rows), test_labels, spec, outcome["calibration"]
            )
            runs.append(
                {
                    "seed": seed,
                    "cpu_minutes": round(cpu, 2),
                    "wall_minutes": round(wall, 2),
                    "training": {k: v for k, v in outcome["training"].items() if k != "history"},
                    "metrics": outcome["metrics"],
                    "flags": flags,
                    "calibration": {k: v.to_dict() for k, v in outcome["calibration"].items()},
                    "pooled_flags": pooled(flags.values()),
                }
            )
            print(
                f"{name}, seed {seed}: {cpu:.1f} CPU min ({wall:.1f} min wall), "
                f"accuracy {[round(outcome['metrics'][lv]['test_accuracy'], 3) for lv in LEVELS]}, "
                f"pooled flags {runs[-1]['pooled_flags']}",
                flush=True,
            )
        results[name] = runs
        table += level_rows(name, runs, spec)

    results["tables"]["levels"] = table
    if args.skip_curve:
        return results
    curve_config = train.config_for(base, mode="locked", seed=seeds[0])
    curve = curves.learning_curve(
        make_model, data, spec, config=curve_config, splits=split_of[seeds[0]], sizes=(3, 10, 30)
    )
    title = "Grocery Store, locked fine-tuning of the EfficientNet-Lite0 dual encoder"
    (args.output / "curve_locked.png").write_bytes(curves.plot_png(curve, title=title))
    (args.output / "curve_locked.md").write_text(curves.markdown(curve))
    results["curve_locked"] = curve.to_dicts()
    print(curves.markdown(curve), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the locked runs (the first for the others)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "grocery")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"which to train, of {', '.join(METHODS)}")
    parser.add_argument("--skip-curve", action="store_true", help="no learning curve")
    parser.add_argument(
        "--base-model",
        help="start from this model (hub id, folder, s3://) instead of a new EfficientNet-Lite0 dual encoder",
    )
    args = parser.parse_args()
    if not (args.data / "train.txt").exists():
        print(f"Grocery Store dataset not found at {args.data}; pass --data or set CLIPDQ_GROCERY_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("clipdq.training.train", "clipdq.training.locked"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-epoch lines drown the figures
    args.output.mkdir(parents=True, exist_ok=True)
    results = run(args)
    columns = [
        "model",
        "level",
        "values",
        "accuracy",
        "macro_f1",
        "chance",
        "majority",
        "conflict precision",
        "conflict recall",
        "flags / planted",
        "gap accuracy",
        "gap recall",
    ]
    report = figures_table(results["tables"]["levels"], columns)
    (args.output / "results.md").write_text(report + "\n")
    (args.output / "results.json").write_text(json.dumps(results, default=float))
    print(report)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
