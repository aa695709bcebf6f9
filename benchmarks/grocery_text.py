"""Image and text agreement on real product photos: Grocery Store photos under their product titles.

Each photo of the dataset is listed under its product's title (the ``Title:`` line of the
product's information text, such as "Asparagus Green Class 1"), with the coarse class as the
text category. The EfficientNet-Lite0 dual encoder trains in locked mode on the ``train`` photos
(three category levels), then its text tower learns the titles against the trained image
embeddings, and the agreement threshold is calibrated on the validation rows. Measured on the
``val`` photos (other photo sessions, used neither for training nor calibration), per seed, with
10% of the photos given the title of another product (10 plantings), each planting judged as an
audit of those photos judges it
(``audit.judge_texts``: against the audited photos' own typical agreement):

- precision and recall of the "image may not show this product" flags, pooled and by whether the
  wrong title names a product of the same coarse class (say, another apple) or of another one;
- accuracy per level (the titles are learned after the attributes, which they leave as they
  are), and the CPU time of the whole training and of the titles' part.

    python benchmarks/grocery_text.py [--data DIR] [--seeds 0,1,2] [--views 2] [--output DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from grocery import DEFAULT_DATA, LEVELS, ROOT, embedded_photos, load_catalog, splits_for, spread
from heldout import figures_table, held_out_logits

from clipdq.checks.schemas import TEXTS_SCHEMA
from clipdq.core import evaluation, text
from clipdq.core.spec import Spec, parse_spec
from clipdq.model import towers
from clipdq.pipeline import audit
from clipdq.training import train
from clipdq.training.labeled import LabeledSet, labels_of

PLANTED_SHARE, PLANTINGS = 0.1, 10


def titles(data: Path) -> dict[str, str]:
    """Fine class -> product title, from its information text (the class name where there is none)."""
    out = {}
    with open(data / "classes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            fine = row["Class Name (str)"]
            info = data / row["Product Description Path (str)"].lstrip("/").replace(
                "_Description.txt", "_Information.txt"
            )
            lines = info.read_text(errors="replace").splitlines() if info.exists() else []
            title = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Title:")), "")
            out[fine] = title or fine.replace("-", " ")
    return out


def text_spec(frame: pl.DataFrame) -> Spec:
    attributes = {level: {"values": sorted(frame[level].unique().to_list())} for level in LEVELS}
    return parse_spec(
        yaml.safe_dump(
            {"target_precision": 0.9, "text_column": "title", "text_category": "coarse", "attributes": attributes}
        )
    )


def plant(rows: np.ndarray, data: LabeledSet, rng: np.random.Generator) -> np.ndarray:
    """Per row, the row whose title it is shown with: its own, or for PLANTED_SHARE of them another
    product's (another title)."""
    shown = rows.copy()
    for i in rng.choice(len(rows), size=round(PLANTED_SHARE * len(rows)), replace=False):
        shown[i] = rng.choice(rows[data.texts[rows] != data.texts[rows[i]]])
    return shown


def flag_figures(
    clip: towers.Clip, data: LabeledSet, rows: np.ndarray, calibration: text.TextCalibration, spec: Spec, seed: int
) -> dict:
    """Counts of flags and planted mismatches over PLANTINGS plantings on ``rows``."""
    image_emb = towers.embed_images(clip, data.pixels[rows].numpy())
    text_emb = dict(zip(np.unique(data.texts), towers.embed_texts(clip, np.unique(data.texts).tolist())))
    rng, counts = (
        np.random.default_rng(seed),
        dict.fromkeys(("flags", "planted", "found", "planted_same", "found_same"), 0),
    )
    for _ in range(PLANTINGS):
        shown = plant(rows, data, rng)
        wrong = shown != rows
        same = wrong & (data.text_categories[shown] == data.text_categories[rows])
        agreement = text.row_agreement(image_emb, np.stack([text_emb[t] for t in data.texts[shown]]))
        texts = pl.DataFrame(
            {
                "product_id": rows.astype(str),
                "text": data.texts[shown],
                "category": data.text_categories[shown],
                "score": calibration.scores(agreement, data.text_categories[shown]),
                "image_error": None,
            },
            schema=TEXTS_SCHEMA,
        )
        findings, _ = audit.judge_texts(texts, calibration, spec)  # as the audit judges them
        flagged = findings["status"].to_numpy() == "conflict"
        counts["flags"] += int(flagged.sum())
        counts["planted"] += int(wrong.sum())
        counts["found"] += int((flagged & wrong).sum())
        counts["planted_same"] += int(same.sum())
        counts["found_same"] += int((flagged & same).sum())
    return counts


def run_seed(spec: Spec, data: LabeledSet, plain, split, seed: int, views: int) -> dict:
    clip = towers.init_model(spec, "efficientnet-lite0")
    config = train.config_for(clip, mode="locked", seed=seed, views=views)
    cpu = time.process_time()
    outcome = train.train_on(clip, data, spec, config=config, splits=split, plain=plain)
    temperatures = {k: v.temperature for k, v in outcome["calibration"].items()}
    test = split[2]
    accuracy = {
        level: figures["test_accuracy"]
        for level, figures in evaluation.held_out_metrics(
            held_out_logits(clip, data, spec, test), labels_of(data, test), spec, temperatures=temperatures
        ).items()
    }
    calibration = outcome["text_calibration"]
    result = {
        "seed": seed,
        "cpu_minutes": round((time.process_time() - cpu) / 60, 2),
        "text_minutes": outcome["training"]["texts"]["minutes"],
        "accuracy": accuracy,
        "threshold": calibration.threshold,
        "flags": flag_figures(clip, data, test, calibration, spec, seed),
    }
    print(f"seed {seed}: {result}", flush=True)
    return result


def table(runs: list[dict]) -> list[dict]:

    def share(hits: int, total: int) -> float:
        return hits / total if total else float("nan")

    rows = []
    for run in [*runs, None]:
        per = runs if run is None else [run]
        f = {key: sum(p["flags"][key] for p in per) for key in per[0]["flags"]}
        rows.append(
            {
                "seed": "pooled" if run is None else str(run["seed"]),
                **{level: spread([p["accuracy"][level] for p in per]) for level in LEVELS},
                "text flag precision": f"{share(f['found'], f['flags']):.3f}",
                "recall": f"{share(f['found'], f['planted']):.3f}",
                "recall, same coarse class": f"{share(f['found_same'], f['planted_same']):.3f}",
                "recall, other coarse class": format(
                    share(f["found"] - f["found_same"], f["planted"] - f["planted_same"]), ".3f"
                ),
                "flags / planted": f"{f['flags']} / {f['planted']}",
                "CPU min (texts)": spread([p["cpu_minutes"] for p in per])
                + " ("
                + spread([p["text_minutes"] for p in per])
                + ")",
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--views", type=int, default=2, help="augmented views per training photo")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "grocery_text")
    args = parser.parse_args()
    if not (args.data / "train.txt").exists():
        print(f"Grocery Store dataset not found at {args.data}; pass --data or set CLIPDQ_GROCERY_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    frame = load_catalog(args.data)
    frame = frame.with_columns(pl.col("fine").replace_strict(titles(args.data)).alias("title"))
    spec = text_spec(frame)
    data, plain, features = embedded_photos(frame, spec, args.data)
    runs = [
        run_seed(spec, data, plain, splits_for(frame, features, seed=seed), seed, args.views)
        for seed in (int(s) for s in args.seeds.split(","))
    ]
    columns = [
        "seed",
        *LEVELS,
        "text flag precision",
        "recall",
        "recall, same coarse class",
        "recall, other coarse class",
        "flags / planted",
        "CPU min (texts)",
    ]
    report = figures_table(table(runs), columns)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(report + "\n")
    (args.output / "results.json").write_text(json.dumps(runs, default=float))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
