"""Complete runs under an output folder, and what changed from one run to the next."""

from __future__ import annotations

import polars as pl

from clipdq.checks.schemas import FINDINGS_SCHEMA
from clipdq.reporting import report, runs


def findings(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame([(*row, None) for row in rows], schema=FINDINGS_SCHEMA, orient="row")


BEFORE = findings(
    [
        ("p1", "color", "blue", "red", 0.99, "conflict"),
        ("p2", "color", None, "red", 0.97, "gap"),
        ("p3", "color", "red", "red", 0.99, "match"),
        ("p4", "lid", "maybe", "lid", 0.6, "invalid_value"),
    ]
)
AFTER = findings(
    [
        ("p1", "color", "blue", "red", 0.99, "conflict"),  # persists
        ("p2", "color", "red", "red", 0.97, "match"),  # the gap was filled: resolved
        ("p3", "color", "blue", "red", 0.99, "conflict"),  # new
        ("p4", "lid", "maybe", "lid", 0.6, "invalid_value"),  # persists
    ]
)


def publish(output, frame: pl.DataFrame, catalog: str) -> str:
    run_id, folder = report.new_run(str(output))
    summary = report.summarize(frame, products=4, run={"run_id": run_id, "catalog": catalog}, validation={})
    report.publish_run(folder, frame, summary, "<html></html>")
    return folder


def test_changes_name_new_resolved_and_persisting_problems_per_attribute(tmp_path):
    before = publish(tmp_path, BEFORE, "c.parquet")
    changes = runs.changed(AFTER.lazy(), runs.read_problems(before))

    assert sorted(changes.rows()) == [
        ("p1", "color", "conflict", "persisting"),
        ("p2", "color", "gap", "resolved"),
        ("p3", "color", "conflict", "new"),
        ("p4", "lid", "invalid_value", "persisting"),
    ]
    counts = runs.change_counts(changes, before)
    assert counts["previous_run"] == runs.run_id_of(before)
    assert counts["totals"] == {"new": 1, "resolved": 1, "persisting": 2}
    assert counts["by_attribute"] == [
        {"attribute": "color", "new": 1, "resolved": 1, "persisting": 1},
        {"attribute": "lid", "new": 0, "resolved": 0, "persisting": 1},
    ]


def test_only_complete_runs_of_the_same_catalog_count_as_previous(tmp_path):
    first = publish(tmp_path, BEFORE, "c.parquet")
    publish(tmp_path, BEFORE, "other.parquet")
    _, unfinished = report.new_run(str(tmp_path))
    (tmp_path / unfinished.split(str(tmp_path) + "/", 1)[1]).mkdir(parents=True)  # files, but no manifest yet
    (tmp_path / "_embedding_cache").mkdir()

    assert len(runs.complete_runs(str(tmp_path))) == 2
    assert runs.previous_run(str(tmp_path), "c.parquet") == first
    assert runs.previous_run(str(tmp_path), "new.parquet") is None
    assert runs.previous_run(str(tmp_path), "c.parquet", before=first) is None  # nothing older than the first


def test_changes_since_the_previous_run_are_none_for_a_first_run_and_listed_after_it(tmp_path):
    assert runs.changes_since_previous(str(tmp_path), "c.parquet", AFTER.lazy()) == (None, None)
    before = publish(tmp_path, BEFORE, "c.parquet")

    previous, changes = runs.changes_since_previous(str(tmp_path), "c.parquet", AFTER.lazy())

    assert previous == before
    assert sorted(changes.filter(pl.col("change") == "new").rows()) == [("p3", "color", "conflict", "new")]
    assert runs.change_counts(None, None) is None


def test_an_unreadable_previous_run_gives_no_changes_and_the_audit_goes_on(tmp_path):
    before = publish(tmp_path, BEFORE, "c.parquet")
    (tmp_path / before.split(str(tmp_path) + "/", 1)[1] / "findings.parquet").write_bytes(b"not parquet")

    assert runs.changes_since_previous(str(tmp_path), "c.parquet", AFTER.lazy()) == (None, None)


def test_duplicate_listings_are_kept_only_from_a_run_of_the_same_images(tmp_path):
    listings = pl.DataFrame({"group": [0, 0], "product_id": ["p1", "p2"]})
    search = pl.DataFrame({"product_id": ["p1", "p2"], "sha256": ["a", "a"]})
    run_id, folder = report.new_run(str(tmp_path))
    summary = report.summarize(
        BEFORE,
        products=4,
        validation={},
        run={"run_id": run_id, "catalog": "c.parquet"},
        duplicates={"images_key": "k1", "similarity_threshold": 0.99},
    )
    report.publish_run(folder, BEFORE, summary, "<html></html>", duplicates=listings, duplicate_search=search)

    kept, kept_search = runs.kept_duplicates(folder, "k1", 0.99)
    assert kept is not None and kept.equals(listings) and kept_search is not None and kept_search.equals(search)
    other, other_search = runs.kept_duplicates(folder, "k2", 0.99)  # other images: the search's links are kept
    assert other is None and other_search is not None and other_search.equals(search)
    assert runs.kept_duplicates(folder, "k1", 0.98) == (None, None)  # another threshold
    assert runs.kept_duplicates(None, "k1", 0.99) == (None, None)  # a first run
    assert runs.kept_duplicates(folder, None, None) == (None, None)  # the spec asks for no listings
