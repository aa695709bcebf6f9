"""Fine-tuning on real product photos: the Grocery Store dataset's three category levels.

Builds a labeled catalog from the dataset (attributes: top level, coarse class, fine class),
trains on its ``train`` photos and validates and tests on its ``val`` photos (shot apart from the
training photos; first half of each class for validation, second half for test). Per
level it reports accuracy and macro-F1 of the untrained model (chance), the prototype probe on
frozen embeddings, and full fine-tuning within a CPU time budget; learning curves for both; and
the precision and recall of the audit's flags when 10% of the held-out labels are corrupted.

    python benchmarks/grocery.py [--data DIR] [--minutes 15] [--curve-minutes 2] [--output DIR] [--base-model M]

The dataset is not part of the project: point --data (or CLIPDQ_GROCERY_DIR) at a copy; the
script exits with a message when it is absent. Without --base-model every model is a tiny CLIP
built from scratch, so the untrained model is at chance and the probe's frozen embeddings are
random features; with a pretrained CLIP the first row is its zero-shot accuracy.
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

from clipdq import curves, evaluation, model, train
from clipdq.spec import Spec, parse_spec
from heldout import figures_table, flag_figures, held_out_logits, pooled

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CLIPDQ_GROCERY_DIR", ROOT.parent / "shared" / "datasets" / "grocery_store"))
LEVELS = ("top", "coarse", "fine")


def load_catalog(data: Path) -> pl.DataFrame:
    """One row per photo: product_id, image path, split (train / holdout) and the three levels."""
    with open(data / "classes.csv", newline="") as handle:
        classes = {int(r["Class ID (int)"]): (r["Coarse Class Name (str)"], r["Class Name (str)"])
                   for r in csv.DictReader(handle)}
    rows = []
    for split, listing in (("train", "train.txt"), ("holdout", "val.txt")):
        for line in (data / listing).read_text().splitlines():
            path, fine_id, _ = (part.strip() for part in line.split(","))
            coarse, fine = classes[int(fine_id)]
            rows.append({"product_id": path.rsplit(".", 1)[0], "image": str(data / path), "split": split,
                         "top": path.split("/")[1], "coarse": coarse, "fine": fine})
    return pl.DataFrame(rows)


def grocery_spec(frame: pl.DataFrame) -> Spec:
    attributes = {level: {"values": sorted(frame[level].unique().to_list())} for level in LEVELS}
    return parse_spec(yaml.safe_dump({"target_precision": 0.9, "attributes": attributes}))


def splits_for(frame: pl.DataFrame) -> train.Splits:
    """Train on the dataset's train photos; validate and test on its other photos, split per class
    by photo number (first half validation, second half test).

    Photos of one class are consecutive shots of the same shelf, so a random validation split of
    the train photos holds near-duplicates of training images: validation accuracy then says
    little about new photos, and calibration fitted on it over-trusts the model (measured in
    docs/benchmarks.md). The held-out photos come from other shots than any training photo.
    """
    number = pl.col("product_id").str.extract(r"_(\d+)$").cast(pl.Int64)
    rank = number.rank("ordinal").over("split", "fine")
    half = (rank <= pl.len().over("split", "fine") / 2)
    part = frame.select(pl.when(pl.col("split") == "train").then(0).when(half).then(1).otherwise(2)).to_series()
    return tuple(np.flatnonzero(part.to_numpy() == s) for s in (0, 1, 2))


def level_rows(name: str, outcome: dict, flags: dict | None, spec: Spec) -> list[dict]:
    rows = []
    for level in LEVELS:
        m = outcome["metrics"][level]
        row = {"model": name, "level": level, "values": len(spec.attribute(level).values),
               "accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"]}
        if flags:
            f = flags[level]
            row |= {"conflict precision": f["conflict_precision"], "conflict recall": f["conflict_recall"],
                    "flags / planted": f"{f['flags']} / {f['planted']}", "gap accuracy": f["gap_accuracy"],
                    "gap recall": f["gap_recall"]}
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    frame = load_catalog(args.data)
    spec = grocery_spec(frame)

    def make_model() -> model.Clip:
        return model.load_model(args.base_model) if args.base_model else model.init_model(spec, "tiny", seed=0)

    base = make_model()
    started = time.monotonic()
    data = train.load_labeled(frame, spec, base=str(args.data), pixel_spec=base.pixels)
    print(f"{len(data.pixels)} photos decoded in {time.monotonic() - started:.0f} s "
          f"({data.dropped} unreadable)", flush=True)
    splits = splits_for(frame)
    test_labels = train.labels_of(data, splits[2])
    print(f"train {len(splits[0])}, validation {len(splits[1])}, test {len(splits[2])}", flush=True)
    results: dict = {"rows": {"train": len(splits[0]), "val": len(splits[1]), "test": len(splits[2])}, "tables": {}}

    untrained = evaluation.held_out_metrics(held_out_logits(base, data, spec, splits[2]), test_labels, spec)
    majority = {level: float(np.bincount(test_labels[level]).max() / len(test_labels[level])) for level in LEVELS}
    results["untrained"] = {level: untrained[level] | {"chance": 1 / len(spec.attribute(level).values),
                                                      "majority": majority[level]} for level in LEVELS}
    first_row = f"zero-shot {args.base_model}" if args.base_model else "untrained (chance)"
    table = [{"model": first_row, "level": level, "values": len(spec.attribute(level).values),
              "accuracy": untrained[level]["test_accuracy"], "macro_f1": untrained[level]["test_macro_f1"],
              "chance": 1 / len(spec.attribute(level).values), "majority": majority[level]} for level in LEVELS]

    for name, options in (("prototype probe", {"mode": "prototype"}),
                          (f"full fine-tuning ({args.minutes:g} min)", {"max_minutes": args.minutes, "epochs": 1000})):
        clip = make_model()
        outcome = train.train_on(clip, data, spec, config=train.config_for(clip, seed=0, **options), splits=splits)
        flags = flag_figures(held_out_logits(clip, data, spec, splits[2]), test_labels, spec, outcome["calibration"])
        overall = pooled(flags.values())
        print(f"{name}: {outcome['training']['minutes']} min, pooled flags {overall}", flush=True)
        results[name] = {"training": {k: v for k, v in outcome["training"].items() if k != "history"},
                         "metrics": outcome["metrics"], "calibration": outcome["calibration"], "flags": flags,
                         "pooled_flags": overall}
        table += level_rows(name, outcome, flags, spec)
    results["tables"]["levels"] = table

    for mode, sizes, minutes in (("prototype", (3, 10, 30, 100, 300), None), ("full", (3, 10, 30), args.curve_minutes)):
        config = train.config_for(base, seed=0, mode=mode, max_minutes=minutes, epochs=1000)
        curve = curves.learning_curve(make_model, data, spec, config=config, splits=splits, sizes=sizes)
        title = f"Grocery Store, {mode} training" + (f", {minutes:g} min per point" if minutes else "")
        (args.output / f"curve_{mode}.png").write_bytes(curves.plot_png(curve, title=title))
        (args.output / f"curve_{mode}.md").write_text(curves.markdown(curve))
        results[f"curve_{mode}"] = curve.to_dicts()
        print(curves.markdown(curve), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--minutes", type=float, default=15.0, help="CPU budget for full fine-tuning")
    parser.add_argument("--curve-minutes", type=float, default=2.0, help="budget per full learning-curve point")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "grocery")
    parser.add_argument("--base-model", help="start from this CLIP (hub id, folder, s3://) instead of a new tiny one")
    args = parser.parse_args()
    if not (args.data / "train.txt").exists():
        print(f"Grocery Store dataset not found at {args.data}; pass --data or set CLIPDQ_GROCERY_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("clipdq.train").setLevel(logging.WARNING)  # per-epoch lines drown the figures
    args.output.mkdir(parents=True, exist_ok=True)
    results = run(args)
    columns = ["model", "level", "values", "accuracy", "macro_f1", "chance", "majority", "conflict precision",
               "conflict recall", "flags / planted", "gap accuracy", "gap recall"]
    report = figures_table(results["tables"]["levels"], columns)
    (args.output / "results.md").write_text(report + "\n")
    (args.output / "results.json").write_text(json.dumps(results, default=float))
    print(report)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
