"""Fine-tuning methods compared on the generated sample data, same splits for every run.

- prototype probe (fast mode) against full fine-tuning;
- label-only captions ("longsleeved") against sentence captions ("a photo of a longsleeved top");
- a learning curve of full fine-tuning;
- for each run, test accuracy and macro-F1 per attribute, and the precision and recall of the
  audit's flags when 10% of the test labels are corrupted (and another 10% blanked);
- each run repeated over several seeds (split and initial weights), since 240 test products make
  one split's figures move by several points: means, the range of accuracy, flags pooled.

    python benchmarks/finetune_methods.py [--minutes 3.5] [--seeds 0,1,2] [--output DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from heldout import figures_table, flag_figures, held_out_logits, pooled

from clipdq import sample_data
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import Spec, parse_spec
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.training import curves, train
from clipdq.training.labeled import LabeledSet, default_splits, labels_of, load_labeled

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = {
    "color": "a photo of a {} product",
    "sleeve_length": "a photo of a {} top",
    "neckline": "a photo of a top with a {}",
    "has_lid": "a photo of a pot with {}",
    "has_handle": "a photo of a pot with {}",
}


def with_sentences(spec: Spec) -> Spec:
    return dataclasses.replace(
        spec, attributes=tuple(dataclasses.replace(a, prompts=(SENTENCES[a.name],)) for a in spec.attributes)
    )


def run_one(name: str, spec: Spec, data: LabeledSet, config: TrainConfig) -> tuple[dict, dict, float]:
    """(test metrics, flag figures, minutes) of one run; ``config.seed`` draws the split and the initial weights."""
    splits = default_splits(data, config)
    clip = towers.init_model(spec, "tiny", seed=config.seed)
    outcome = train.train_on(clip, data, spec, config=config, splits=splits)
    test_labels = labels_of(data, splits[2])
    flags = flag_figures(held_out_logits(clip, data, spec, splits[2]), test_labels, spec, outcome["calibration"])
    t = outcome["training"]
    print(
        f"{name}, seed {config.seed}: {t['minutes']} min, best epoch/step {t.get('best_epoch', t.get('best_step'))}; "
        f"accuracy { ({k: round(m['test_accuracy'], 3) for k, m in outcome['metrics'].items()}) }; "
        f"pooled flags {pooled(flags.values())}",
        flush=True,
    )
    return outcome["metrics"], flags, t["minutes"]


def flag_columns(figures: dict) -> dict:
    return {
        "conflict precision": figures["conflict_precision"],
        "conflict recall": figures["conflict_recall"],
        "flags / planted": f"{figures['flags']} / {figures['planted']}",
        "gap accuracy": figures["gap_accuracy"],
        "gap recall": figures["gap_recall"],
    }


def run_seeds(name: str, spec: Spec, data: LabeledSet, config: TrainConfig, seeds: list[int]) -> list[dict]:
    """Table rows: per attribute, test accuracy and macro-F1 averaged over the seeds, with the range
    of accuracy, and flags pooled over the seeds."""
    runs = [run_one(name, spec, data, dataclasses.replace(config, seed=seed)) for seed in seeds]
    minutes = round(float(np.mean([m for _, _, m in runs])), 2)
    rows = []
    for attribute in spec.names:
        accuracy = [metrics[attribute]["test_accuracy"] for metrics, _, _ in runs]
        rows.append(
            {
                "run": name,
                "attribute": attribute,
                "accuracy": float(np.mean(accuracy)),
                "accuracy range": f"{min(accuracy):.3f} to {max(accuracy):.3f}",
                "macro_f1": float(np.mean([metrics[attribute]["test_macro_f1"] for metrics, _, _ in runs])),
                **flag_columns(pooled(flags[attribute] for _, flags, _ in runs)),
                "minutes": minutes,
            }
        )
    everything = pooled(figures for _, flags, _ in runs for figures in flags.values())
    rows.append({"run": name, "attribute": "all (pooled flags)", **flag_columns(everything), "minutes": minutes})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=3.5, help="CPU budget per full fine-tuning run and per learning-curve point"
    )
    parser.add_argument(
        "--seeds",
        default="0,1,2",
        help="each seed draws its own split and initial weights; figures are means over them",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "sample")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("clipdq.training.train").setLevel(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = sample_data.generate(tmp)  # the demo's sample: 2400 labeled products
        spec = parse_spec((folder / "spec.yaml").read_text())
        frame = read_catalog(str(folder / "labeled.parquet"))
        data = load_labeled(frame, spec, access=access_for(str(folder)), pixel_spec=towers.init_model(spec).pixels)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    config = TrainConfig(seed=seeds[0], epochs=150)
    splits = default_splits(data, config)
    print(f"train {len(splits[0])}, validation {len(splits[1])}, test {len(splits[2])}; seeds {seeds}", flush=True)
    full = dataclasses.replace(config, max_minutes=args.minutes)
    rows = run_seeds("prototype probe", spec, data, dataclasses.replace(config, mode="prototype"), seeds)
    rows += run_seeds("full, label-only captions", spec, data, full, seeds)
    rows += run_seeds("full, sentence captions", with_sentences(spec), data, full, seeds)
    columns = [
        "run",
        "attribute",
        "accuracy",
        "accuracy range",
        "macro_f1",
        "conflict precision",
        "conflict recall",
        "flags / planted",
        "gap accuracy",
        "gap recall",
        "minutes",
    ]
    report = figures_table(rows, columns)
    curve = curves.learning_curve(
        lambda: towers.init_model(spec, "tiny", seed=0),
        data,
        spec,
        config=full,
        splits=splits,
        sizes=(10, 30, 100, 300),
    )
    title = f"Sample data, full fine-tuning, {args.minutes:g} min per point"
    (args.output / "curve_full.png").write_bytes(curves.plot_png(curve, title=title))
    (args.output / "curve_full.md").write_text(curves.markdown(curve))
    (args.output / "results.md").write_text(report + "\n")
    (args.output / "results.json").write_text(json.dumps({"runs": rows, "curve": curve.to_dicts()}))
    print(report)
    print(curves.markdown(curve))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
