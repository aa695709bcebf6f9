"""How well an audit of the sample catalog finds the planted problems.

Compares a run's findings.parquet with sample_data/ground_truth.parquet and prints precision
and recall of conflict flags and of the flags on titles of other products, accuracy of gap
suggestions, and coverage of invalid values and image errors, each next to its target.

    python benchmarks/sample_quality.py [--run RUN_FOLDER] [--ground-truth PATH]

Without --run it takes the newest complete run (one with a manifest) under reports/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

TARGETS = {
    "conflict_precision": 0.95,
    "conflict_recall": 0.85,
    "gap_suggestion_accuracy": 0.95,
    "title_mismatch_precision": 0.9,
    "invalid_value_found": 1.0,
    "image_error_found": 1.0,
}


def newest_run(reports: Path) -> Path:
    runs = sorted(p.parent for p in reports.glob("run_date=*/run_id=*/manifest.json"))
    if not runs:
        sys.exit(f"no complete run under {reports}; run `clipdq demo` first")
    return runs[-1]


def _share(frame: pl.DataFrame, condition: pl.Expr) -> tuple[float, int]:
    return (frame.select(condition.mean()).item() if frame.height else float("nan")), frame.height


def score(findings: pl.DataFrame, truth: pl.DataFrame) -> dict[str, tuple[float, int]]:
    """Each figure as (value, rows it is computed over)."""
    joined = truth.join(findings, on=["product_id", "attribute"], how="full", coalesce=True)
    planted, status, is_title = pl.col("planted"), pl.col("status"), pl.col("attribute") == "title"
    values, titles = joined.filter(~is_title), joined.filter(is_title)
    return {
        "conflict_precision": _share(values.filter(status == "conflict"), planted == "conflict"),
        "conflict_recall": _share(values.filter(planted == "conflict"), status == "conflict"),
        "gap_suggestion_accuracy": _share(
            joined.filter(status == "gap"), pl.col("predicted_value") == pl.col("true_value")
        ),
        "gap_recall": _share(joined.filter(planted == "gap"), status == "gap"),
        "invalid_value_found": _share(joined.filter(planted == "invalid_value"), status == "invalid_value"),
        "image_error_found": _share(joined.filter(planted == "image_error"), status == "image_error"),
        "title_mismatch_precision": _share(titles.filter(status == "conflict"), planted == "mismatch"),
        "title_mismatch_recall": _share(titles.filter(planted == "mismatch"), status == "conflict"),
        "false_flags_on_clean_rows": _share(joined.filter(planted == "none"), status.is_in(["conflict", "gap"])),
        "rows_accounted_for": _share(joined, status.is_not_null() & planted.is_not_null()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run folder; default: newest under reports/")
    parser.add_argument("--ground-truth", type=Path, default=Path("sample_data/ground_truth.parquet"))
    args = parser.parse_args()
    run = args.run or newest_run(Path("reports"))
    figures = score(pl.read_parquet(run / "findings.parquet"), pl.read_parquet(args.ground_truth))
    print(f"run: {run}")
    print(f"{'figure':<28}{'value':>8}{'rows':>7}{'target':>9}  ok")
    failed = 0
    for name, (value, rows) in figures.items():
        target = TARGETS.get(name)
        ok = "" if target is None else ("yes" if value >= target else "NO")
        failed += ok == "NO"
        print(f"{name:<28}{value:>8.3f}{rows:>7}{'' if target is None else f'>= {target}':>9}  {ok}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
