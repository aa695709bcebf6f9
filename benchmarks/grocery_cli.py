"""The Grocery Store photos the way a user runs clipdq: three commands, timed from start to exit.

1. ``clipdq init-model --arch efficientnet-lite0`` for a spec of the three category levels;
2. ``clipdq finetune --base-model <that> --max-minutes 15`` on all the dataset's ``train`` photos
   (clipdq splits them itself, grouping near-duplicate photos);
3. ``clipdq audit`` of the dataset's ``val`` photos (other sessions, seen neither in training nor
   in calibration) as a catalog whose labels are 10% replaced by another value and 10% blanked
   (with ``--tree``, the levels form one category tree and whole paths are replaced or blanked).

It then scores the audit's findings against the true labels: conflict precision and recall, and
gap-suggestion accuracy and recall, per level and pooled.

    python benchmarks/grocery_cli.py [--data DIR] [--work DIR] [--seed 0] [--train-seed 0] [--mode full]
                                     [--tree] [--catalog-images] [--instances]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from grocery import DEFAULT_DATA, LEVELS, catalog_images, load_catalog, write_spec

CLIPDQ = [str(Path(sys.executable).parent / "clipdq")]  # the console script, as a user runs it


def clipdq(*args: str) -> tuple[float, str]:
    """(seconds from start to exit, last line of stdout) of one clipdq command; fails loudly."""
    started = time.monotonic()
    result = subprocess.run([*CLIPDQ, *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"clipdq {args[0]} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started, result.stdout.strip().splitlines()[-1]


def corrupted(frame: pl.DataFrame, *, share: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(catalog with a share of each level's labels replaced and another share blanked, truth)."""
    rng = np.random.default_rng(seed)
    catalog, truth = frame.select("product_id", "image"), []
    for level in LEVELS:
        values = sorted(frame[level].unique())
        true = frame[level].to_list()
        draw = rng.random(frame.height)
        planted = np.where(draw < share, "conflict", np.where(draw < 2 * share, "gap", "none"))
        existing = [
            values[(values.index(v) + int(rng.integers(1, len(values)))) % len(values)]
            if p == "conflict"
            else None
            if p == "gap"
            else v
            for v, p in zip(true, planted)
        ]
        catalog = catalog.with_columns(pl.Series(level, existing, dtype=pl.String))
        truth.append(
            pl.DataFrame(
                {"product_id": frame["product_id"], "attribute": level, "true_value": true, "planted": planted}
            )
        )
    return catalog, pl.concat(truth)


def corrupted_paths(frame: pl.DataFrame, *, share: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(catalog with a share of its whole paths replaced by another path of the tree and another
    share blanked, truth). A replaced path's error is to be found at the highest level where the
    paths differ ("conflict"); the deeper levels that differ follow from it ("below")."""
    rng = np.random.default_rng(seed)
    true = frame.select(LEVELS).rows()
    paths = sorted(set(true))
    draw = rng.random(frame.height)
    existing = [
        paths[(paths.index(path) + int(rng.integers(1, len(paths)))) % len(paths)]
        if d < share
        else (None,) * len(LEVELS)
        if d < 2 * share
        else path
        for path, d in zip(true, draw)
    ]
    catalog, truth = frame.select("product_id", "image"), []
    for depth, level in enumerate(LEVELS):
        catalog = catalog.with_columns(pl.Series(level, [path[depth] for path in existing], dtype=pl.String))
        planted = [
            "gap"
            if share <= d < 2 * share
            else "none"
            if right[depth] == given[depth]
            else "conflict"
            if right[:depth] == given[:depth]
            else "below"
            for right, given, d in zip(true, existing, draw)
        ]
        truth.append(
            pl.DataFrame(
                {
                    "product_id": frame["product_id"],
                    "attribute": level,
                    "true_value": [path[depth] for path in true],
                    "planted": planted,
                }
            )
        )
    return catalog, pl.concat(truth)


def scores(findings: pl.DataFrame, truth: pl.DataFrame) -> dict[str, dict]:
    joined = findings.join(truth, on=["product_id", "attribute"])
    out = {}
    for name, rows in [*((level, joined.filter(pl.col("attribute") == level)) for level in LEVELS), ("pooled", joined)]:
        flagged, planted = rows.filter(pl.col("status") == "conflict"), rows.filter(pl.col("planted") == "conflict")
        suggested, gaps = rows.filter(pl.col("status") == "gap"), rows.filter(pl.col("planted") == "gap")
        known = rows.filter(pl.col("predicted_value").is_not_null())
        out[name] = {
            "accuracy": (known["predicted_value"] == known["true_value"]).mean(),
            "conflict_precision": (flagged["existing_value"] != flagged["true_value"]).mean()
            if flagged.height
            else None,  # the catalog's value is wrong where it is flagged
            "conflict_recall": (planted["status"] == "conflict").mean(),
            "flags": flagged.height,
            "gap_accuracy": (suggested["predicted_value"] == suggested["true_value"]).mean()
            if suggested.height
            else None,
            "gap_recall": (gaps["status"] == "gap").mean(),
            "suggestions": suggested.height,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--work", type=Path, help="where the catalogs, models and reports go (default: temporary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted errors")
    parser.add_argument("--train-seed", type=int, default=0, help="clipdq finetune --seed (its split and training)")
    parser.add_argument("--mode", choices=("locked", "full"), help="clipdq finetune --mode (default: the model's)")
    parser.add_argument(
        "--tree",
        action="store_true",
        help="declare the three levels one category tree (values chosen by whole path, conflicts "
        "reported at the highest level), and plant whole wrong paths",
    )
    parser.add_argument(
        "--catalog-images",
        action="store_true",
        help="fine-tune on each product's catalog image too, beside the train photos (training only)",
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        help="pull each photo towards its product's catalog image, or its first photo without them "
        "(clipdq finetune --instance-column fine: each fine class is one product)",
    )
    args = parser.parse_args()
    if not (args.data / "train.txt").exists():
        print(f"Grocery Store dataset not found at {args.data}; pass --data or set CLIPDQ_GROCERY_DIR", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="clipdq-grocery-"))
    work.mkdir(parents=True, exist_ok=True)
    frame = load_catalog(args.data)
    spec_path = str(write_spec(frame, args.data, work / "spec.yaml", tree=args.tree))
    labeled = frame.filter(pl.col("split") == "train")
    if args.catalog_images:  # training only: calibration judges the model on shelf photos, like the audited ones
        labeled = pl.concat(
            [labeled.with_columns(catalog_image=False), catalog_images(args.data).with_columns(catalog_image=True)]
        )
    labeled.drop("split").write_parquet(work / "labeled.parquet")
    catalog, truth = (corrupted_paths if args.tree else corrupted)(
        frame.filter(pl.col("split") == "holdout"), share=0.1, seed=args.seed
    )
    catalog.write_parquet(work / "catalog.parquet")

    timings = {
        "init-model": clipdq(
            "init-model", "--spec", spec_path, "--arch", "efficientnet-lite0", "--output", str(work / "init")
        )[0]
    }
    timings["finetune"], _ = clipdq(
        "finetune",
        "--catalog",
        str(work / "labeled.parquet"),
        "--spec",
        spec_path,
        "--base-model",
        str(work / "init"),
        "--output",
        str(work / "model"),
        "--max-minutes",
        "15",
        "--seed",
        str(args.train_seed),
        *(["--mode", args.mode] if args.mode else []),
        *(["--train-only-column", "catalog_image"] if args.catalog_images else []),
        *(["--instance-column", "fine"] if args.instances else []),
    )
    timings["audit"], run = clipdq(
        "audit",
        "--catalog",
        str(work / "catalog.parquet"),
        "--spec",
        spec_path,
        "--model",
        str(work / "model"),
        "--output",
        str(work / "reports"),
    )
    figures = scores(pl.read_parquet(Path(run) / "findings.parquet"), truth)
    meta = json.loads((work / "model" / "clipdq.json").read_text())
    print(f"work folder: {work}")
    print("seconds from start to exit: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(
        f"training: {meta['training']['epochs_run']} epochs, stopped by {meta['training']['stopped_by']}; "
        f"calibration on {meta['calibration_basis']['rows']} validation photos in "
        f"{meta['calibration_basis']['val_groups']} groups"
    )
    print("| level | accuracy | conflict precision | conflict recall | flags | gap accuracy | gap recall |")
    print("|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        cells = [
            f["accuracy"],
            f["conflict_precision"],
            f["conflict_recall"],
            f["flags"],
            f["gap_accuracy"],
            f["gap_recall"],
        ]
        print(
            f"| {name} | "
            + " | ".join("nan" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    (work / "scores.json").write_text(json.dumps({"timings": timings, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
