"""Product matching: the exact blockwise top-k against brute force, and `clipdq match` end to end
on photos that are altered copies of catalog images, with planted byte-for-byte copies and a
broken photo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageEnhance

from clipdq.checks import match, neighbours
from clipdq.core import values
from clipdq.core.options import MatchOptions
from clipdq.core.spec import Spec
from clipdq.io import catalog, sources
from clipdq.model import scorer, towers
from clipdq.pipeline import matching

K = 5


def brute_force(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = neighbours.normalised(queries) @ neighbours.normalised(references).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("blocks", [(1024, 16384), (7, 13), (64, 1)])
def test_top_k_equals_brute_force_whatever_the_blocks(blocks: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(150, 24)), rng.normal(size=(400, 24))
    found = neighbours.top_k(queries, references, k=K, query_block=blocks[0], reference_block=blocks[1])
    indices, scores = brute_force(queries, references, K)
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_allclose(found.scores, scores, atol=1e-5)
    assert not found.excluded.any()


def test_a_reference_with_the_querys_own_bytes_is_never_its_match() -> None:
    rng = np.random.default_rng(1)
    references = rng.normal(size=(50, 8))
    digests = [f"sha-{i}" for i in range(50)]
    digests[7] = digests[3]  # two references hold the same bytes
    queries = references[:10]  # the first ten references themselves, as queries
    found = neighbours.top_k(queries, references, k=3, query_keys=digests[:10] + [], reference_keys=digests)
    assert found.excluded.tolist() == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    for q in range(10):
        assert not {q, 3 if q in (3, 7) else q} & set(found.indices[q]), q
    unkeyed = neighbours.top_k(queries, references, k=1, query_keys=[None] * 10, reference_keys=digests)
    assert unkeyed.indices[:, 0].tolist() == list(range(10))  # no key: nothing is left out


def agreement_of(rng: np.random.Generator, references: int, d: int, weight: float = 1.0) -> neighbours.ValueAgreement:
    """Two attributes of 3 and 5 values; a third of the references without a catalog value."""
    value_emb = [neighbours.normalised(rng.normal(size=(k, d))) for k in (3, 5)]
    codes = [np.where(rng.random(references) < 1 / 3, -1, rng.integers(0, k, references)) for k in (3, 5)]
    return neighbours.ValueAgreement(["a", "b"], value_emb, [10.0, 5.0], codes, weight)


def brute_force_agreement(
    queries: np.ndarray, references: np.ndarray, agreement: neighbours.ValueAgreement
) -> np.ndarray:
    """Cosine plus the agreement, written out in numpy: the definition top_k must meet."""
    q, r = neighbours.normalised(queries), neighbours.normalised(references)
    scores = q @ r.T
    for value_emb, scale, codes in zip(agreement.value_emb, agreement.scales, agreement.codes):

        def probs(x, scale=scale, value_emb=value_emb):
            e = np.exp(scale * x @ value_emb.T - (scale * x @ value_emb.T).max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        reference_probs = probs(r)
        known = codes >= 0
        reference_probs[known] = (1 - agreement.error_rate) * np.eye(len(value_emb))[
            codes[known]
        ] + agreement.error_rate * reference_probs[known]
        scores += agreement.weight * np.log(np.maximum(probs(q) @ reference_probs.T, neighbours.AGREEMENT_FLOOR))
    return scores


@pytest.mark.parametrize("blocks", [(1024, 16384), (7, 13)])
def test_top_k_with_agreement_equals_its_definition_whatever_the_blocks(blocks: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    queries, references = rng.normal(size=(40, 16)), rng.normal(size=(90, 16))
    agreement = agreement_of(rng, 90, 16)
    found = neighbours.top_k(
        queries, references, k=K, agreement=agreement, query_block=blocks[0], reference_block=blocks[1]
    )
    scores = brute_force_agreement(queries, references, agreement)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(found.indices, order)
    np.testing.assert_allclose(found.scores, np.take_along_axis(scores, order, 1), rtol=1e-4, atol=1e-4)


def test_agreement_puts_the_reference_showing_the_querys_value_first() -> None:
    """The nearest image holds another catalog value than the query plainly shows: with the
    agreement the reference of the query's value wins; without it, the nearest image does."""
    value_emb = [np.eye(3)[:2]]  # attribute of two values, read off the first two dimensions
    query = np.array([[1.0, 0.0, 0.3]])
    references = np.array([[0.9, 0.0, 0.5], [0.5, 0.0, 1.0]])  # the first is nearer
    agreement = neighbours.ValueAgreement(["a"], value_emb, [20.0], [np.array([1, 0])])  # but its catalog says value 1
    assert neighbours.top_k(query, references, k=1).indices[0, 0] == 0
    assert neighbours.top_k(query, references, k=1, agreement=agreement).indices[0, 0] == 1
    unknown = neighbours.ValueAgreement(
        ["a"], value_emb, [20.0], [np.array([-1, -1])]
    )  # no catalog values: the image's
    assert neighbours.top_k(query, references, k=1, agreement=unknown).indices[0, 0] == 0


def test_the_agreement_is_on_by_default_only_where_the_references_carry_attribute_columns(
    sample_dir: Path, spec: Spec, flagging_model_dir: Path, pretrained_dir: Path, tmp_path: Path
) -> None:
    rows = pl.read_parquet(sample_dir / "catalog.parquet")
    references = embedded(np.zeros((rows.height, 4)), "r")
    bare = tmp_path / "bare.parquet"
    rows.select(spec.id_column, spec.image_column).write_parquet(bare)
    carried = f"the references carry {', '.join(spec.value_columns)}"
    cases = {  # (references, model, attribute_weight): (why, the weight the score holds; None: image alone)
        (sample_dir / "catalog.parquet", flagging_model_dir, None): (carried, matching.DEFAULT_ATTRIBUTE_WEIGHT),
        (bare, flagging_model_dir, None): ("the references carry no attribute column", None),
        (bare, flagging_model_dir, 0.5): ("attribute_weight as given", 0.5),
        (sample_dir / "catalog.parquet", flagging_model_dir, 0.0): ("attribute_weight as given", None),
        (sample_dir / "catalog.parquet", pretrained_dir, None): ("the model was not fine-tuned on the spec", None),
    }
    for (path, model, weight), (why, held) in cases.items():
        agreement, said = matching.agreement_for(
            catalog.CatalogFile(str(path)), references, spec, model_uri=str(model), text_folder=None, weight=weight
        )
        assert said == why and (agreement.weight if agreement else None) == held


def embedded(embeddings: np.ndarray, prefix: str, ids: list[str] | None = None) -> match.Embedded:
    """A catalog of one image per row (``ids``, default one product per row) and its embeddings."""
    n = len(embeddings)
    return match.Embedded(
        ids=ids or [f"{prefix}{i}" for i in range(n)],
        images=[f"{prefix}-image-{i}.jpg" for i in range(n)],
        sha256=[f"{prefix}-sha-{i}" for i in range(n)],
        errors=[None] * n,
        embeddings=embeddings,
    )


# one attribute of two values, read off the first two dimensions; the model reads value 0 in the query
VALUE_EMB = [np.eye(4)[:2]]
QUERY = np.array([[1.0, 0.0, 0.4, 0.0]])


def test_the_agreement_never_outranks_the_querys_own_photo() -> None:
    """Reference 0 is the query's own photo (near-identical pixels) whose catalog holds the wrong
    value; reference 1 shows the query's value on another image. The values alone would rank the
    wrong product first; the copy is scored by its image alone and stays first."""
    references = embedded(np.array([[0.9, 0.05, 0.4, 0.0], [0.5, 0.0, 0.0, 1.0]]), "r")
    queries = embedded(QUERY, "q")
    agreement = neighbours.ValueAgreement(["a"], VALUE_EMB, [20.0], [np.array([1, 0])])  # reference 0 says value 1
    copies = []

    def near_copies(query_rows: np.ndarray, reference_rows: np.ndarray) -> np.ndarray:
        copies.append(list(zip(query_rows, reference_rows)))
        return reference_rows == 0

    by_values, summary = match.match_embedded(references, queries, k=2, agreement=agreement)
    assert by_values["reference_id"].to_list() == ["r1", "r0"] and "scored_by_image_alone" not in summary["score"]
    ranked, summary = match.match_embedded(references, queries, k=2, agreement=agreement, near_copies=near_copies)
    assert ranked["reference_id"].to_list() == ["r0", "r1"]
    cosine = neighbours.normalised(QUERY) @ neighbours.normalised(references.embeddings).T
    assert ranked["score"][0] == pytest.approx(cosine[0, 0])  # by image alone
    assert ranked["score"][1] == pytest.approx(by_values["score"][0])  # the other keeps its score with the values
    assert summary["score"]["scored_by_image_alone"] == 1
    assert sorted(copies[0]) == [(0, 0), (0, 1)]  # both nearest by image were checked
    alone, _ = match.match_embedded(references, queries, k=2, near_copies=near_copies)
    assert alone["reference_id"].to_list() == ["r0", "r1"] and len(copies) == 1  # without the values: not needed


def test_the_agreement_breaks_a_tie_between_look_alike_packages() -> None:
    """Two references with one image (look-alike packages of two products): the query's value decides."""
    image = [0.6, 0.6, 1.0, 0.0]
    references = embedded(np.array([image, image, [0.0, 0.0, 0.3, 1.0]]), "r")
    for value, expected in ((0, "r1"), (1, "r0")):
        query = np.array([[1.0, 0.0, 0.4, 0.0]]) if value == 0 else np.array([[0.0, 1.0, 0.4, 0.0]])
        agreement = neighbours.ValueAgreement(["a"], VALUE_EMB, [20.0], [np.array([1, 0, 0])])
        ranked, _ = match.match_embedded(
            references, embedded(query, "q"), k=3, agreement=agreement, near_copies=lambda q, r: r < 0
        )
        assert ranked["reference_id"][0] == expected


def test_a_product_with_several_images_is_matched_once_at_its_best_image() -> None:
    """A gallery: rows of one reference id. Its best image scores for it, and it takes one rank."""
    references = embedded(
        np.array([[0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]),
        "r",
        ids=["A", "A", "B", "A", "C"],
    )
    queries = embedded(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), "q")
    for agreement in (None, neighbours.ValueAgreement(["a"], [np.eye(3)[:2]], [1.0], [np.zeros(5, np.int64)])):
        ranked, summary = match.match_embedded(references, queries, k=3, agreement=agreement)
        first = ranked.filter(pl.col("query_id") == "q0")
        assert first["reference_id"].to_list() == ["A", "B", "C"]
        assert first["reference_image"][0] == "r-image-1.jpg"  # A's nearest image
        second = ranked.filter(pl.col("query_id") == "q1")
        assert second["reference_id"].to_list() == ["C", "A", "B"] and second["reference_image"][1] == "r-image-3.jpg"
        assert summary["references"] == 5 and summary["reference_products"] == 3
    few, _ = match.match_embedded(references, queries, k=5)  # five asked of three products: each once
    counts = few.group_by("query_id").agg(products=pl.col("reference_id").n_unique(), rows=pl.len())
    assert counts["products"].to_list() == counts["rows"].to_list() == [3, 3]


def test_only_a_model_trained_on_the_spec_adds_its_reading_of_values(
    spec: Spec, pretrained_dir: Path, flagging_model_dir: Path
) -> None:
    codes = {name: np.zeros(3, np.int64) for name in spec.names}
    assert matching.value_agreement(scorer.of_files(str(pretrained_dir), spec), codes, weight=1.0) is None
    trained = scorer.of_files(str(flagging_model_dir), spec)
    assert matching.value_agreement(trained, codes, weight=0.0) is None
    agreement = matching.value_agreement(trained, codes, weight=1.0)
    assert agreement.attributes == spec.names
    assert agreement.scales == [trained.scale / trained.calibration[n].temperature for n in spec.names]


def test_references_values_read_synonyms_and_spellings_as_the_audit_reads_them(spec: Spec, tmp_path: Path) -> None:
    """Matching trusts a reference's catalog value through the one value encoder: a synonym or another
    spelling of a value is that value (before, only exact strings were: "rood" counted as no value)."""
    colors = spec.attribute("color").values
    written = pl.DataFrame(
        {
            spec.id_column: ["a", "b", "c", "d"],
            spec.image_column: ["a.png"] * 4,
            "color": ["red", "rood", " Crimson ", "mauve"],
        }
    )
    written.write_parquet(tmp_path / "references.parquet")
    source = catalog.CatalogFile(str(tmp_path / "references.parquet"))

    labels = matching.reference_labels(source, spec, np.array([True, True, True, True]))

    assert labels["color"].tolist() == [colors.index("red")] * 3 + [-1]
    assert labels["neckline"].tolist() == [-1] * 4  # no column: no value to trust
    usable = matching.reference_labels(source, spec, np.array([False, True, False, True]))
    assert usable["color"].tolist() == [colors.index("red"), -1]


def test_a_synonym_in_the_references_matches_as_its_value_does(spec: Spec, flagging_model_dir: Path) -> None:
    """The same references, once with canonical values and once with synonyms, give the same
    agreement term, so the same matches."""
    trained = scorer.of_files(str(flagging_model_dir), spec)
    rng = np.random.default_rng(0)
    d = trained.value_emb["color"].shape[1]
    queries, references = rng.normal(size=(6, d)), rng.normal(size=(8, d))
    colors = spec.attribute("color").values
    canonical = pl.DataFrame({"color": [colors[i % len(colors)] for i in range(8)]})
    synonyms = {value: others[0] for value, others in spec.attribute("color").synonyms.items()}
    respelled = canonical.with_columns(pl.col("color").replace(synonyms))
    assert (respelled["color"] != canonical["color"]).all()
    found = [
        neighbours.top_k(
            queries,
            references,
            k=3,
            agreement=matching.value_agreement(trained, values.labels(frame, spec), weight=1.0),
        )
        for frame in (canonical, respelled)
    ]
    np.testing.assert_array_equal(found[0].indices, found[1].indices)
    np.testing.assert_allclose(found[0].scores, found[1].scores)


def test_fewer_references_than_k_leave_empty_ranks() -> None:
    found = neighbours.top_k(np.eye(3), np.eye(3)[:2], k=4)
    assert found.indices[0].tolist() == [0, 1, -1, -1]
    assert np.isneginf(found.scores[:, 2:]).all()


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory, spec: Spec) -> Path:
    """The pretrained EfficientNet-Lite0 tower as `clipdq init-model` makes it: its features see photos."""
    folder = tmp_path_factory.mktemp("pretrained")
    towers.save_model(towers.init_model(spec, "efficientnet-lite0"), str(folder))
    return folder


def altered(source: Path, dest: Path, rng: np.random.Generator) -> None:
    """Another photo of the same product: cropped, resized, brighter or darker, re-encoded."""
    with Image.open(source) as image:
        w, h = image.size
        cut = int(w * rng.uniform(0.04, 0.1))
        image = image.crop((cut, cut, w - cut, h - cut)).resize((w + 40, h + 40))
        ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15)).save(dest, format="JPEG", quality=75)


@pytest.fixture(scope="module")
def queries(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Queries of 30 catalog products: 26 altered photos, 3 byte-for-byte copies, one broken file."""
    references = pl.read_parquet(sample_dir / "catalog.parquet")
    usable = [
        row
        for row in references.iter_rows(named=True)
        if (sample_dir / row["image"]).exists() and _decodes(sample_dir / row["image"])
    ][:30]
    folder = tmp_path_factory.mktemp("queries")
    (folder / "images").mkdir()
    rng, rows = np.random.default_rng(0), []
    for i, row in enumerate(usable):
        image = f"images/q{i}.jpg"
        if i < 3:
            shutil.copyfile(sample_dir / row["image"], folder / image)
        elif i == 3:
            (folder / image).write_bytes(b"not a photo")
        else:
            altered(sample_dir / row["image"], folder / image, rng)
        rows.append({"product_id": f"Q{i}", "image": image, "expected_id": row["product_id"]})
    pl.DataFrame(rows).write_parquet(folder / "queries.parquet")
    return folder / "queries.parquet", {r["product_id"]: r["expected_id"] for r in rows}


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except OSError:
        return False


def test_a_gallery_is_matched_per_product_and_its_own_photo_found_among_its_images(
    sample_dir: Path, spec: Spec, pretrained_dir: Path, tmp_path: Path
) -> None:
    """References: ten products, each with its catalog image and a second, turned a quarter (two
    rows of one id, the catalog image first). A query that re-encodes a product's catalog image is
    matched with that product, once, at that image, and marked as its own photo."""
    rows = pl.read_parquet(sample_dir / "catalog.parquet")
    rows = rows.filter(pl.Series([_decodes(sample_dir / image) for image in rows["image"]]))[:10]
    (tmp_path / "images").mkdir()
    second = [str(tmp_path / "images" / f"{product}-2.png") for product in rows["product_id"]]
    for image, turned in zip(rows["image"], second):
        with Image.open(sample_dir / image) as original:
            original.transpose(Image.Transpose.ROTATE_90).save(turned)
    first = rows.with_columns(pl.col("image").map_elements(lambda image: str(sample_dir / image), pl.String))
    pl.concat([first, rows.with_columns(image=pl.Series(second))]).write_parquet(tmp_path / "references.parquet")
    with Image.open(first["image"][4]) as image:
        image.save(tmp_path / "query.png")  # the fifth product's catalog image, re-encoded
    pl.DataFrame({"product_id": ["Q"], "image": [str(tmp_path / "query.png")]}).write_parquet(
        tmp_path / "queries.parquet"
    )
    reading, access = scorer.of_files(str(pretrained_dir), spec), sources.access_for(str(tmp_path), [str(sample_dir)])
    references, queries = (
        matching.embed_catalog(catalog.CatalogFile(str(tmp_path / name)), scorer=reading, access=access)
        for name in ("references.parquet", "queries.parquet")
    )
    matches, found = matching.ranked(references, queries, spec, options=MatchOptions(k=K), agreement=None, cache=None)
    assert found["references"] == 20 and found["reference_products"] == 10
    assert matches["reference_id"].n_unique() == K == matches.height  # each product once
    top = matches.row(0, named=True)
    assert (top["reference_id"], top["reference_image"]) == (rows["product_id"][4], first["image"][4])
    assert top["detail"].startswith("near-identical pixels") and found["near_identical_pixels"]["pairs"] == 1


@pytest.mark.subprocess
def test_clipdq_match_finds_the_product_of_altered_photos_and_leaves_out_copies(
    sample_dir: Path, pretrained_dir: Path, queries: tuple[Path, dict], tmp_path: Path
) -> None:
    queries_file, expected = queries
    command = [
        sys.executable,
        "-m",
        "clipdq.cli",
        "match",
        "--references",
        str(sample_dir / "catalog.parquet"),
        "--queries",
        str(queries_file),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--model",
        str(pretrained_dir),
        "--output",
        str(tmp_path / "out"),
        "--label-column",
        "expected_id",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert (folder / "manifest.json").exists()
    matches = pl.read_parquet(folder / "matches.parquet")
    summary = json.loads((folder / "summary.json").read_text())

    assert set(matches["query_id"]) == set(expected)  # every query accounted for
    broken = matches.filter(pl.col("query_id") == "Q3")
    assert broken.height == 1 and broken["rank"][0] is None and broken["detail"][0]
    ranked = matches.filter(pl.col("rank").is_not_null())
    assert ranked.group_by("query_id").len()["len"].to_list() == [K] * 29
    assert (ranked.group_by("query_id").agg(pl.col("score").diff().max())["score"].fill_null(0) <= 1e-6).all()

    top = dict(ranked.filter(pl.col("rank") == 1).select("query_id", "reference_id").iter_rows())
    copies = [f"Q{i}" for i in range(3)]
    assert all(top[q] != expected[q] for q in copies)  # its own bytes are not a match
    assert summary["same_image_excluded"]["queries"] == 3
    altered_right = sum(top[q] == expected[q] for q in top if q not in copies)
    # chance is 26 / 100; the untrained projection of the pretrained tower's features gets 21
    assert altered_right >= 18, f"{altered_right} of 26 altered photos matched first"
    near = ranked.filter(pl.col("detail").str.starts_with("near-identical pixels"))
    assert near.height and all(expected[q] == r for q, r in near.select("query_id", "reference_id").iter_rows())
    assert summary["near_identical_pixels"] == {
        "threshold": 0.99,
        "pairs": near.height,
        "queries": near["query_id"].n_unique(),
    }
    assert summary["score"]["attributes"] == {}  # an untrained text tower's reading of values is not used
    assert summary["query_image_errors"] == 1
    assert summary["accuracy"]["labeled_queries"] == 29
    assert summary["accuracy"]["top_1"] == pytest.approx(altered_right / 29)


@pytest.mark.subprocess
def test_a_trained_model_matches_by_image_with_catalog_values_or_through_the_index(
    sample_dir: Path, spec: Spec, flagging_model_dir: Path, queries: tuple[Path, dict], tmp_path: Path
) -> None:
    queries_file, _ = queries
    common = [
        "--references",
        str(sample_dir / "catalog.parquet"),
        "--queries",
        str(queries_file),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--model",
        str(flagging_model_dir),
        "--label-column",
        "expected_id",
    ]
    runs = {}  # one output: the later runs take the images' embeddings from the first run's cache
    for name, flags in {
        "0": ["--attribute-weight", "0"],
        "1": [],  # the default: the references carry the spec's attribute columns
        "index": ["--search", "approximate"],
    }.items():
        command = [sys.executable, "-m", "clipdq.cli", "match", *common, "--output", str(tmp_path), *flags]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        folder = Path(result.stdout.strip().splitlines()[-1])
        runs[name] = (pl.read_parquet(folder / "matches.parquet"), json.loads((folder / "summary.json").read_text()))
    assert runs["0"][1]["score"]["attributes"] == {}
    assert runs["1"][1]["options"]["attribute_weight"] is None
    # these queries are near-copies of the references (altered copies): with the values by default, no worse than
    # by image alone (before near-copies were scored by image alone, weight 1 took top-1 from 20 to 12 of 29)
    assert runs["1"][1]["accuracy"]["top_1"] >= runs["0"][1]["accuracy"]["top_1"]
    assert runs["1"][1]["score"]["formula"].startswith("cosine similarity + 1 x")
    assert runs["1"][1]["score"]["why"] == f"the references carry {', '.join(spec.value_columns)}"
    # a query's own photo (near-identical pixels) is scored by its image alone: first, whatever its values say
    copies = runs["1"][0].filter(pl.col("detail").str.starts_with("near-identical pixels"))
    assert copies.height and (copies["rank"] == 1).all()
    assert runs["1"][1]["score"]["scored_by_image_alone"] >= copies.height
    by_image = copies.join(runs["0"][0], on=["query_id", "reference_id"], suffix="_image")
    assert by_image.height == copies.height and (by_image["score"] - by_image["score_image"]).abs().max() < 1e-5
    assert [runs[name][1]["search"] for name in runs] == ["exact", "exact", "approximate"]
    # a few hundred references make a handful of cells, all searched: the index's candidates, rescored with the
    # agreement, give the exact search's matches
    first = {
        name: runs[name][0].filter(pl.col("rank") == 1).sort("query_id")["reference_id"] for name in ("1", "index")
    }
    assert (first["1"] == first["index"]).mean() >= 0.9
    assert runs["index"][1]["same_image_excluded"] == runs["1"][1]["same_image_excluded"]
    assert runs["index"][1]["approximate_index"] == {"read_from_an_earlier_run": False, "candidates_rescored": 64}
    assert len(list(tmp_path.glob("_embedding_cache/*/approximate_index/*.faiss"))) == 1  # kept for the next run
    references = pl.read_parquet(sample_dir / "catalog.parquet")
    references = references.filter(
        pl.Series([(sample_dir / image).exists() and _decodes(sample_dir / image) for image in references["image"]])
    )  # a usable image
    labels = values.labels(references, spec)  # synonyms and other spellings count as their values
    valid = {name: int((labels[name] >= 0).sum()) for name in spec.names}
    assert valid["color"] > references["color"].is_in(spec.attribute("color").values).sum()  # the sample has synonyms
    assert runs["1"][1]["score"]["attributes"] == {
        name: {"references_with_a_catalog_value": count} for name, count in valid.items()
    }
    # the agreement is a log-probability: it lowers every pair's score, and reorders some queries' matches
    both = runs["1"][0].join(runs["0"][0], on=["query_id", "reference_id"], suffix="_image").drop_nulls("rank")
    assert both.height and (both["score"] <= both["score_image"] + 1e-5).all()
    assert (both["score"] < both["score_image"] - 0.01).any()
    assert (
        not runs["1"][0]
        .filter(pl.col("rank") == 1)
        .sort("query_id")
        .equals(runs["0"][0].filter(pl.col("rank") == 1).sort("query_id"))
    )
