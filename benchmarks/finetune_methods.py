"""Fine-tuning methods compared on the generated sample data, same splits for every run.

- prototype probe (fast mode) against full fine-tuning;
- label-only captions ("longsleeved") against sentence captions ("a photo of a longsleeved top");
- a learning curve of full fine-tuning;
- for each run, test accuracy and macro-F1 per attribute, and the precision and recall of the
  audit's flags when 10% of the test labels are corrupted (and another 10% blanked).

    python benchmarks/finetune_methods.py [--minutes 3.5] [--curve-minutes 1.5] [--output DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

from clipdq import curves, model, sample_data, train
from clipdq.catalog import read_catalog
from clipdq.spec import Spec, parse_spec
from heldout import figures_table, flag_figures, held_out_logits, pooled

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = {
    "color": "a photo of a {} product",
    "sleeve_length": "a photo of a {} top",
    "neckline": "a photo of a top with a {}",
    "has_lid": "a photo of a pot with {}",
    "has_handle": "a photo of a pot with {}",
}


def with_sentences(spec: Spec) -> Spec:
    return dataclasses.replace(spec, attributes=tuple(
        dataclasses.replace(a, prompts=(SENTENCES[a.name],)) for a in spec.attributes))


def run_one(name: str, spec: Spec, data: train.LabeledSet, splits: train.Splits, config: train.TrainConfig) -> list[dict]:
    clip = model.init_model(spec, "tiny", seed=0)
    outcome = train.train_on(clip, data, spec, config=config, splits=splits)
    test_labels = train.labels_of(data, splits[2])
    flags = flag_figures(held_out_logits(clip, data, spec, splits[2]), test_labels, spec, outcome["calibration"])
    t = outcome["training"]
    print(f"{name}: {t['minutes']} min, best epoch/step {t.get('best_epoch', t.get('best_step'))}; "
          f"pooled flags {pooled(flags)}", flush=True)
    rows = []
    for attribute, m in outcome["metrics"].items():
        f = flags[attribute]
        rows.append({"run": name, "attribute": attribute, "accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"],
                     "conflict precision": f["conflict_precision"], "conflict recall": f["conflict_recall"],
                     "flags / planted": f"{f['flags']} / {f['planted']}", "gap accuracy": f["gap_accuracy"],
                     "gap recall": f["gap_recall"], "minutes": t["minutes"]})
    p = pooled(flags)
    rows.append({"run": name, "attribute": "all (pooled flags)", "conflict precision": p["conflict_precision"],
                 "conflict recall": p["conflict_recall"], "flags / planted": f"{p['flags']} / {p['planted']}",
                 "gap accuracy": p["gap_accuracy"], "gap recall": p["gap_recall"], "minutes": t["minutes"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.5, help="CPU budget per full fine-tuning run")
    parser.add_argument("--curve-minutes", type=float, default=1.5, help="budget per learning-curve point")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "sample")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("clipdq.train").setLevel(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = sample_data.generate(tmp)  # the demo's sample: 1200 labeled products
        spec = parse_spec((folder / "spec.yaml").read_text())
        frame = read_catalog(str(folder / "labeled.parquet"))
        data = train.load_labeled(frame, spec, base=str(folder), pixel_spec=model.init_model(spec).pixels)
    config = train.TrainConfig(seed=0, epochs=150)
    splits = train.default_splits(data, config)
    print(f"train {len(splits[0])}, validation {len(splits[1])}, test {len(splits[2])}", flush=True)
    full = dataclasses.replace(config, max_minutes=args.minutes)
    rows = run_one("prototype probe", spec, data, splits, dataclasses.replace(config, mode="prototype"))
    rows += run_one("full, label-only captions", spec, data, splits, full)
    rows += run_one("full, sentence captions", with_sentences(spec), data, splits, full)
    columns = ["run", "attribute", "accuracy", "macro_f1", "conflict precision", "conflict recall", "flags / planted",
               "gap accuracy", "gap recall", "minutes"]
    report = figures_table(rows, columns)
    curve = curves.learning_curve(lambda: model.init_model(spec, "tiny", seed=0), data, spec,
                                  config=dataclasses.replace(config, max_minutes=args.curve_minutes), splits=splits,
                                  sizes=(10, 30, 100, 300))
    title = f"Sample data, full fine-tuning, {args.curve_minutes:g} min per point"
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
