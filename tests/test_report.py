"""Summary counts, the HTML report and the published run folder."""

from __future__ import annotations

import json

import polars as pl

from clipdq.checks.schemas import FINDINGS_SCHEMA, STATUSES, TEXTS_SCHEMA
from clipdq.core.spec import parse_spec
from clipdq.core.text import TextCalibration
from clipdq.pipeline import audit
from clipdq.reporting import report, terminal


def findings(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=FINDINGS_SCHEMA, orient="row")


FINDINGS = findings(
    [
        ("p1", "color", "red", "red", 0.99, "match", None),
        ("p2", "color", "blue", "red", 0.999, "conflict", "catalog says 'blue'"),
        ("p3", "color", "blue", "red", 0.998, "conflict", "catalog says 'blue'"),
        ("p1", "lid", "lid", "no lid", 0.95, "conflict", "catalog says 'lid'"),
        ("p2", "lid", None, "lid", 0.97, "gap", "missing"),
        ("<script>alert(1)</script>", "lid", "maybe", "lid", 0.6, "invalid_value", "'maybe' is not known"),
    ]
)


def test_counts_have_every_status_per_attribute_zeros_included():
    counts = report.counts(FINDINGS)

    assert counts.columns == ["attribute", *STATUSES]
    assert counts.filter(pl.col("attribute") == "color").row(0) == ("color", 1, 2, 0, 0, 0, 0, 0)
    assert counts.filter(pl.col("attribute") == "lid").row(0) == ("lid", 0, 1, 1, 0, 1, 0, 0)


def test_top_findings_take_attributes_in_turn():
    top = report.top_findings(FINDINGS, "conflict", n=2)

    assert top["attribute"].to_list() == ["color", "lid"]  # not the two color conflicts, though more confident


def test_report_html_escapes_catalog_text_and_shows_counts():
    summary = report.summarize(FINDINGS, products=3, run={"run_id": "r1"}, validation={})
    html = report.render_html(FINDINGS, summary, thumbnails={})

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
    assert "3 conflicts" in html and "1 gaps" in html


def test_publish_run_writes_every_file_and_the_manifest_last(tmp_path):
    summary = report.summarize(FINDINGS, products=3, run={"run_id": "r1"}, validation={})
    _, folder = report.new_run(str(tmp_path))

    manifest = report.publish_run(folder, FINDINGS, summary, "<html></html>")

    written = json.loads(open(manifest).read())
    assert set(written["files"]) == {
        "findings.parquet",
        "summary.json",
        "report.html",
        "validation.json",
        "suggested_fixes.csv",
        "suggested_fixes.parquet",
    }
    assert written["rows"] == FINDINGS.height
    assert pl.read_parquet(f"{folder}/findings.parquet").equals(FINDINGS)
    assert (
        pl.read_csv(f"{folder}/suggested_fixes.csv").height
        == pl.read_parquet(f"{folder}/suggested_fixes.parquet").height
        == 4
    )


def test_suggested_fixes_hold_each_gap_and_conflict_with_the_value_to_use():
    fixes = report.suggested_fixes(FINDINGS)

    assert fixes.columns == ["product_id", "attribute", "current_value", "suggested_value", "confidence", "status"]
    assert fixes.rows() == [
        ("p2", "color", "blue", "red", 0.999, "conflict"),
        ("p3", "color", "blue", "red", 0.998, "conflict"),
        ("p1", "lid", "lid", "no lid", 0.95, "conflict"),
        ("p2", "lid", None, "lid", 0.97, "gap"),
    ]


def test_report_html_holds_every_problem_thresholds_and_catalog_checks():
    summary = report.summarize(
        FINDINGS,
        products=3,
        run={
            "run_id": "r1",
            "calibration": [
                {"color": {"gap_threshold": 0.8, "conflict_threshold": 0.9, "gap_rows": 40, "conflict_rows": 134}}
            ],
        },
        validation={
            "expectations": [
                {
                    "expectation": "expect_column_values_to_be_unique",
                    "column": "sku",
                    "success": True,
                    "unexpected_count": 0,
                    "examples": [],
                }
            ]
        },
    )
    html = report.render_html(FINDINGS, summary, thumbnails={"p2": b"jpeg"})

    table = json.loads(html.split('id="problem-data">', 1)[1].split("</script>", 1)[0])
    assert len(table["rows"]) == 5  # three conflicts, a gap, an invalid value; not the match
    assert table["rows"][0][:3] == ["p2", "color", "conflict"]  # the most confident first
    assert '0.900 <span class="muted">(134 rows)' in html  # the conflict threshold and its support
    assert "expect_column_values_to_be_unique" in html and "<svg" in html
    assert "\\u003cscript>alert(1)\\u003c/script>" in html  # escaped inside the table's JSON


def test_report_shows_each_fold_models_thresholds_under_cross_fitting():
    folds = [
        {"color": {"gap_threshold": 0.8, "conflict_threshold": 0.9, "gap_rows": 40, "conflict_rows": 134}},
        {"color": {"gap_threshold": 0.7, "conflict_threshold": None, "gap_rows": 31, "conflict_rows": 0}},
    ]
    summary = report.summarize(
        FINDINGS, products=3, run={"run_id": "r1", "cross_fit": 2, "calibration": folds}, validation={}
    )

    html = report.render_html(FINDINGS, summary, thumbnails={})

    row = html.split("<td>color</td>", 1)[1].split("</tr>", 1)[0]
    assert '0.800 <span class="muted">(40 rows)</span> / 0.700 <span class="muted">(31 rows)</span>' in row
    assert '0.900 <span class="muted">(134 rows)</span> / never' in row
    assert "one threshold per fold model" in html


def test_summary_counts_products_without_any_applicable_attribute_apart():
    unplaced = findings(
        [(pid, None, None, None, None, "not_applicable", "no attribute applies") for pid in ("p5", "p6")]
    )
    summary = report.summarize(
        pl.concat([FINDINGS, unplaced]), products=6, run={"run_id": "r1"}, validation={"warnings": []}
    )

    assert summary["products_reported"] == 6
    assert summary["totals"]["not_applicable"] == 2
    assert any("2 products have no attribute" in w for w in summary["warnings"])
    assert [row["attribute"] for row in summary["by_attribute"]] == ["color", "lid"]


def test_summary_warns_when_products_are_missing_from_the_findings():
    summary = report.summarize(FINDINGS, products=6, run={"run_id": "r1"}, validation={"warnings": []})

    assert any("2 products are missing from the findings" in w for w in summary["warnings"])


def test_the_report_table_keeps_the_most_confident_problems_and_says_how_many_there_are(monkeypatch):
    monkeypatch.setattr(report, "TABLE_ROWS", 2)
    summary = report.summarize(FINDINGS, products=3, run={"run_id": "r1"}, validation={})
    html = report.render_html(FINDINGS, summary, thumbnails={})

    table = json.loads(html.split('id="problem-data">', 1)[1].split("</script>", 1)[0])
    assert [row[0] for row in table["rows"]] == ["p2", "p3"] and table["total"] == 5


def test_a_catalog_with_too_few_texts_says_they_were_judged_against_validation():
    spec = parse_spec("attributes: {color: {values: [red, blue]}}\ntext_column: title\n")
    calibration = TextCalibration("title", 0.8, 0.05, {}, threshold=-2.0, rows=200, planted_rows=600)
    texts = pl.DataFrame(
        {
            "product_id": ["p1", "p2"],
            "text": ["Red top", "Blue top"],
            "category": ["", ""],
            "score": [0.1, -4.0],
            "image_error": [None, None],
        },
        schema=TEXTS_SCHEMA,
    )
    text_findings, judged = audit.judge_texts(texts, calibration, spec)
    summary = report.summarize(
        pl.concat([FINDINGS, text_findings]),
        products=3,
        run={"run_id": "r1", "started_at": "now", "catalog": "c.parquet"},
        validation={},
        text=report.text_summary(spec, calibration, judged),
    )

    assert summary["text_agreement"]["flagged"] == 1 and summary["text_agreement"]["against"] == "validation"
    assert "2 scored rows are too few to judge this catalog's" in report.render_html(FINDINGS, summary, thumbnails={})
    assert "judged against validation's typical agreement, 2 scored rows" in terminal.text(summary, "out")
