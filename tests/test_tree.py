"""Category trees: the spec's levels and paths, consistent choices, and conflicts at the highest level."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipdq.checks.compare import compare
from clipdq.checks.schemas import PREDICTIONS_SCHEMA
from clipdq.core import evaluation, predict, tree
from clipdq.core.predict import Calibration
from clipdq.core.spec import SpecError, parse_spec
from clipdq.core.values import labels as encode_labels
from clipdq.reporting import report

SPEC = parse_spec("""\
attributes:
  color: {values: [red, green]}
  category:
    levels: [top, coarse, fine]
    paths: [Fruit/Apple/Granny-Smith, Fruit/Apple/Pink-Lady, Fruit/Banana/Banana, Vegetables/Carrot/Carrot]
    path_column: category
""")
CALIBRATION = {name: Calibration(temperature=1.0, gap_threshold=0.8, conflict_threshold=0.9) for name in SPEC.names}


def test_a_tree_expands_into_one_attribute_per_level_and_reads_its_path_column():
    assert SPEC.names == ["color", "top", "coarse", "fine"]
    assert SPEC.attribute("coarse").values == ("Apple", "Banana", "Carrot")
    assert SPEC.value_columns == ["color", "category"]
    assert SPEC.trees[0].parent_indices(2) == [0, 0, 1, 2]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("levels: [top, fine]\n    paths: [A/x, B/x]", "sits under several"),
        ("levels: [top, fine]\n    paths: [A/x, B]", "one value for each"),
        ("levels: [top]\n    paths: [A, B]", "at least two distinct level names"),
    ],
)
def test_a_malformed_tree_is_refused_with_the_reason(entry, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(f"attributes:\n  category:\n    {entry}\n")


def test_the_whole_path_is_chosen_and_a_parent_is_as_sure_as_its_child():
    # Fruit's two coarse values split 0.6 between them; Vegetables' one child has 0.4.
    probs = {
        "top": np.array([[0.5, 0.5]]),
        "coarse": np.array([[0.3, 0.3, 0.4]]),
        "fine": np.array([[0.25, 0.25, 0.25, 0.25]]),
    }
    chosen = tree.choose(probs, SPEC)

    assert [SPEC.attribute(level).values[chosen[level][0][0]] for level in ("top", "coarse", "fine")] == [
        "Vegetables",
        "Carrot",
        "Carrot",
    ]
    assert chosen["top"][1][0] >= chosen["coarse"][1][0] >= chosen["fine"][1][0] > 0


def test_level_by_level_choices_can_contradict_the_tree_and_tree_choices_never_do():
    rng = np.random.default_rng(0)
    probs = {name: rng.dirichlet(np.ones(len(SPEC.attribute(name).values)), 200) for name in SPEC.names}
    paths = {tuple(p) for p in SPEC.trees[0].path_indices()}
    flat = {name: p.argmax(1) for name, p in probs.items()}
    chosen = tree.choose(probs, SPEC)

    assert any(tuple(row) not in paths for row in zip(flat["top"], flat["coarse"], flat["fine"]))
    assert all(tuple(row) in paths for row in zip(*(chosen[level][0] for level in ("top", "coarse", "fine"))))


def test_a_child_label_implies_its_parents_in_training():
    labels = encode_labels(pl.DataFrame({"category": ["//Pink-Lady", "Fruit/Apple/Granny-Smith", None]}), SPEC)

    assert labels["top"].tolist() == [0, 0, -1] and labels["coarse"].tolist() == [0, 0, -1]
    assert labels["fine"].tolist() == [1, 0, -1]


def _findings(paths: dict[str, str | None], predicted: tuple[str, str, str], confidence: float) -> pl.DataFrame:
    catalog = pl.DataFrame({"product_id": list(paths), "color": "red", "category": list(paths.values())})
    rows = [
        (pid, name, value, confidence, None) for pid in paths for name, value in zip(SPEC.names, ("red", *predicted))
    ]
    return compare(
        catalog, pl.DataFrame(rows, schema=PREDICTIONS_SCHEMA, orient="row"), spec=SPEC, calibration=CALIBRATION
    )


def test_a_conflict_is_reported_at_the_highest_level_with_the_paths_in_its_detail():
    findings = _findings(
        {
            "wrong-top": "Vegetables/Carrot/Carrot",
            "wrong-fine": "Fruit/Apple/Granny-Smith",
            "right": "Fruit/Apple/Pink-Lady",
            "no-fine": "Fruit/Apple",
        },
        ("Fruit", "Apple", "Pink-Lady"),
        0.95,
    )
    status = {(r["product_id"], r["attribute"]): r["status"] for r in findings.iter_rows(named=True)}

    assert [status[("wrong-top", level)] for level in ("top", "coarse", "fine")] == [
        "conflict",
        "parent_conflict",
        "parent_conflict",
    ]
    assert [status[("wrong-fine", level)] for level in ("top", "coarse", "fine")] == ["match", "match", "conflict"]
    assert [status[("right", level)] for level in ("top", "coarse", "fine")] == ["match"] * 3
    assert status[("no-fine", "fine")] == "gap"
    top = findings.filter((pl.col("product_id") == "wrong-top") & (pl.col("attribute") == "top")).row(0, named=True)
    assert "Vegetables/Carrot/Carrot" in top["detail"] and "Fruit/Apple/Pink-Lady" in top["detail"]
    fixes = report.suggested_fixes(findings).filter(pl.col("product_id") == "wrong-top")
    assert sorted(fixes["suggested_value"]) == ["Apple", "Fruit", "Pink-Lady"]  # the fix sets the whole path


def test_calibration_measures_the_values_the_audit_chooses():
    rng = np.random.default_rng(1)
    n = 400
    leaf = rng.integers(0, 4, n)
    paths = np.array(SPEC.trees[0].path_indices())
    labels = {"color": rng.integers(0, 2, n)} | {
        level: paths[leaf, d] for d, level in enumerate(("top", "coarse", "fine"))
    }
    logits = {name: rng.normal(size=(n, len(SPEC.attribute(name).values))) for name in SPEC.names}
    for name in SPEC.names:
        logits[name][np.arange(n), labels[name]] += 3.0
    calibration, metrics = evaluation.calibrate(logits, labels, SPEC)
    chosen = evaluation.choices(logits, SPEC, {k: v.temperature for k, v in calibration.items()})

    rates = tree.conflict_error_rates(SPEC)
    for level in ("top", "coarse", "fine"):
        values, confidence = chosen[level]
        assert metrics[level]["val_accuracy"] == pytest.approx(np.mean(values == labels[level]))
        expected = predict.thresholds_for(
            confidence,
            values == labels[level],
            k=len(SPEC.attribute(level).values),
            temperature=calibration[level].temperature,
            target_precision=0.9,
            error_rate=rates[level],
        )
        assert calibration[level] == expected


def test_each_level_s_conflict_bar_allows_for_the_errors_left_where_the_levels_above_agree():
    rates = tree.conflict_error_rates(SPEC)
    assert rates["color"] == SPEC.expected_error_rate  # not in a tree
    # a catalog whose wrong paths are random other paths, as the rates assume
    rng = np.random.default_rng(0)
    paths = np.array(SPEC.trees[0].path_indices())
    true = rng.integers(len(paths), size=200_000)
    shown = true.copy()
    wrong = rng.random(len(true)) < SPEC.expected_error_rate
    shown[wrong] = (true[wrong] + rng.integers(1, len(paths), size=wrong.sum())) % len(paths)
    for depth, level in enumerate(SPEC.trees[0].levels):
        above_right = (paths[shown, :depth] == paths[true, :depth]).all(axis=1)
        wrong_here = paths[shown, depth] != paths[true, depth]
        assert wrong_here[above_right].mean() == pytest.approx(rates[level], rel=0.05)
    assert rates[SPEC.trees[0].levels[0]] < SPEC.expected_error_rate
