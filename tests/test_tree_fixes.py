"""A wrong path's suggested fix sets the whole path, however sure the image is of the levels below
the conflict (README, "Category trees": the levels below it get parent_conflict, and
suggested_fixes holds a row for each level so a fix sets the whole path)."""

from __future__ import annotations

import polars as pl

from clipdq.checks.compare import compare
from clipdq.checks.schemas import PREDICTIONS_SCHEMA
from clipdq.core.predict import Calibration
from clipdq.core.spec import parse_spec
from clipdq.reporting import report

PATHS = ["apparel/sleeveless", "apparel/longsleeved", "cookware/lid", "cookware/no lid"]
SPEC = parse_spec(f"""\
attributes:
  category:
    levels: [kind, part]
    paths: [{", ".join(PATHS)}]
    path_column: category
""")
CALIBRATION = {name: Calibration(temperature=1.0, gap_threshold=0.8, conflict_threshold=0.95) for name in SPEC.names}


def test_every_level_below_a_conflict_is_a_parent_conflict_and_the_fixes_give_a_path_of_the_tree():
    # the image is plainly apparel, less sure which sleeves: under the part's conflict bar, over its gap bar
    catalog = pl.DataFrame({"product_id": ["p"], "category": ["cookware/no lid"]})
    predictions = pl.DataFrame(
        [("p", "kind", "apparel", 0.999, None), ("p", "part", "longsleeved", 0.9, None)],
        schema=PREDICTIONS_SCHEMA,
        orient="row",
    )

    findings = compare(catalog, predictions, spec=SPEC, calibration=CALIBRATION)

    fixed = dict(report.suggested_fixes(findings).select("attribute", "suggested_value").rows())
    applied = [fixed.get(level, value) for level, value in zip(("kind", "part"), "cookware/no lid".split("/"))]
    assert "/".join(applied) in PATHS, f"the fixes turn the path into {'/'.join(applied)!r}"
    assert dict(findings.select("attribute", "status").rows()) == {"kind": "conflict", "part": "parent_conflict"}
