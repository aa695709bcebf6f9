"""Duplicate listings: copies of one image under other product ids are grouped, through the audit
flow; distinct products that merely look alike are not; a rerun of an unchanged catalog reuses them."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_grocery import DEFAULT_DATA as GROCERY

from clipdq.checks import duplicates
from clipdq.core.options import AuditOptions
from clipdq.core.spec import parse_spec
from clipdq.io import images
from clipdq.io.cache import digest
from clipdq.reporting import terminal
from flows.audit import audit_catalog


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _cropped(image: Image.Image, keep: float, *, centred: bool) -> Image.Image:
    """``keep`` of each side of ``image``, around its centre or from its top-left corner."""
    width, height = round(image.width * keep), round(image.height * keep)
    left, top = ((image.width - width) // 2, (image.height - height) // 2) if centred else (0, 0)
    return image.crop((left, top, left + width, top + height))


COPIES = {  # how a duplicate listing's image was made from the original's bytes
    "exact": lambda data, image: data,
    "reencoded": lambda data, image: _jpeg(image, quality=40),
    "resized": lambda data, image: _jpeg(image.resize((image.width // 2, image.height // 2))),
    "cropped": lambda data, image: _jpeg(_cropped(image, 0.9, centred=True)),
}
KEPT = {"cropped": 0.9, "centre80": 0.8, "corner85": 0.85}  # the share of each side a crop keeps
TIGHTER_CROPS = {  # on real photos, whose detail survives a 32 x 32 signature (the sample's line drawings' does not)
    "centre80": lambda data, image: _jpeg(_cropped(image, 0.8, centred=True)),
    "corner85": lambda data, image: _jpeg(_cropped(image, 0.85, centred=False)),
}


def _signature(data: bytes) -> bytes:
    return images.signature(images.decode(data, min_side=224))


@pytest.fixture(scope="module")
def planted(sample_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(a copy of the sample catalog with three copies of each of five products' images under new
    ids, {copy id: original id})."""
    folder = tmp_path_factory.mktemp("duplicates")
    shutil.copytree(sample_dir / "images", folder / "images")
    catalog = pl.read_parquet(sample_dir / "catalog.parquet")
    readable = catalog.filter(pl.col("image").map_elements(lambda ref: (folder / ref).is_file(), pl.Boolean))
    originals, rows = readable.head(5), []
    for row in originals.iter_rows(named=True):
        data = (folder / row["image"]).read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for kind, make in COPIES.items():
            copy_id = f"{row['product_id']}-{kind}"
            (folder / "images" / f"{copy_id}.jpg").write_bytes(make(data, image))
            rows.append(row | {"product_id": copy_id, "image": f"images/{copy_id}.jpg"})
    pl.concat([catalog, pl.DataFrame(rows, schema=catalog.schema)]).write_parquet(folder / "catalog.parquet")
    shutil.copy(sample_dir / "spec.yaml", folder / "spec.yaml")
    return folder, {row["product_id"]: row["product_id"].rsplit("-", 1)[0] for row in rows}


def test_an_audit_groups_each_copy_with_its_original_and_no_distinct_products(
    prefect_harness, planted, trained_model_dir, tmp_path, monkeypatch
):
    folder, original_of = planted
    run = Path(
        audit_catalog(
            str(folder / "catalog.parquet"),
            str(folder / "spec.yaml"),
            str(trained_model_dir),
            str(tmp_path),
            AuditOptions(batch_size=32),
        )
    )

    found = pl.read_parquet(run / "duplicates.parquet")
    group_of = dict(found.select("product_id", "group").rows())
    for copy_id, original in original_of.items():
        assert copy_id in group_of and group_of[copy_id] == group_of.get(original), copy_id
    members = found.group_by("group").agg("product_id")["product_id"].to_list()
    assert all(len({pid.rsplit("-", 1)[0] for pid in group}) == 1 for group in members)  # one product each
    assert sorted(found["group_size"].unique().to_list()) == [len(COPIES) + 1]
    exact = found.filter(pl.col("product_id").str.ends_with("-exact"))
    assert (exact["kind"] == "identical bytes").all() and (exact["similarity"] == 1).all()
    assert (found.filter(pl.col("kind") != "identical bytes")["similarity"] >= 0.99).all()
    cropped = found.filter(pl.col("product_id").str.ends_with("-cropped"))
    assert (cropped["kind"] == "cropped from the other").all() and (cropped["crop_area"] < 0.9).all()
    summary = json.loads((run / "summary.json").read_text())
    listed = {key: value for key, value in summary["duplicates"].items() if key != "images_key"}
    assert listed == {
        "checked": True,
        "similarity_threshold": 0.99,
        "groups": 5,
        "products": 5 * (len(COPIES) + 1),
        "groups_of_identical_bytes": 0,
        "crops": 5,
    }
    assert summary["duplicates"]["images_key"]  # what the rerun below is matched by
    html = (run / "report.html").read_text()
    assert "Duplicate listings" in html and f"{original_of[next(iter(original_of))]}-exact" in html
    assert "the crop keeps" in html
    assert f"{5 * (len(COPIES) + 1)} products in 5 groups of duplicate listings, 5 of them crops" in terminal.text(
        summary, str(run)
    )

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged catalog's duplicate listings are found again")

    monkeypatch.setattr(duplicates, "find", refuse)
    rerun = Path(
        audit_catalog(
            str(folder / "catalog.parquet"),
            str(folder / "spec.yaml"),
            str(trained_model_dir),
            str(tmp_path),
            AuditOptions(batch_size=32),
        )
    )
    assert pl.read_parquet(rerun / "duplicates.parquet").equals(found)
    assert json.loads((rerun / "summary.json").read_text())["duplicates"] == summary["duplicates"]


def test_a_spec_can_turn_the_check_off():
    spec = parse_spec("duplicate_similarity: null\nattributes: {color: {values: [red, blue]}}")
    assert spec.duplicate_similarity is None
    assert parse_spec("attributes: {color: {values: [red, blue]}}").duplicate_similarity == 0.99


@pytest.mark.skipif(not (GROCERY / "classes.csv").exists(), reason=f"Grocery Store dataset not found at {GROCERY}")
@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_real_catalog_images_of_look_alike_products_are_not_grouped_but_their_copies_are(search, monkeypatch):
    if search == "approximate":  # as for catalogs past APPROXIMATE_CANDIDATES_ABOVE images
        monkeypatch.setattr(duplicates, "APPROXIMATE_CANDIDATES_ABOVE", 0)
    with open(GROCERY / "classes.csv") as handle:
        paths = [GROCERY / row["Iconic Image Path (str)"].lstrip("/") for row in csv.DictReader(handle)]
    data = [path.read_bytes() for path in paths]  # 81 products, several in near-identical packaging
    ids, blobs = [f"p{i}" for i in range(len(data))], list(data)
    for i, blob in enumerate(data[:20]):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        copies = {kind: COPIES[kind] for kind in ("reencoded", "resized", "cropped")} | TIGHTER_CROPS
        ids += [f"p{i}-{kind}" for kind in copies]
        blobs += [make(blob, image) for make in copies.values()]
    signatures = np.frombuffer(b"".join(map(_signature, blobs)), np.uint8).reshape(len(blobs), -1)

    shas = [digest(blob) for blob in blobs]
    found, _ = duplicates.find(ids, shas, signatures, threshold=0.99)

    groups = found.group_by("group").agg("product_id")["product_id"].to_list()
    assert len(groups) == 20 and all(len({pid.split("-")[0] for pid in group}) == 1 for group in groups)
    assert sorted(found["product_id"]) == sorted(ids[:20] + ids[len(data) :])  # every copy, cropped ones too
    way = pl.col("product_id").str.split("-").list.get(1, null_on_oob=True)
    kinds = {row["way"]: set(row["kind"]) for row in found.group_by(way.alias("way")).agg("kind").to_dicts()}
    assert {made: kinds[made] for made in ("reencoded", "resized", "centre80", "corner85")} == {
        "reencoded": {"near-identical pixels"},
        "resized": {"near-identical pixels"},
        "centre80": {"cropped from the other"},
        "corner85": {"cropped from the other"},
    }
    assert found.filter(way.is_in(["reencoded", "resized"]))["crop_area"].null_count() == 40
    whole = ~pl.col("other_id").str.contains("-") | pl.col("other_id").str.contains("-(reencoded|resized)$")
    of_whole = found.filter(pl.col("kind") == "cropped from the other", whole)  # crop area: the share it keeps
    assert of_whole["product_id"].str.ends_with("-corner85").sum() == 20  # no other copy holds a corner crop
    for row in of_whole.to_dicts():
        assert abs(row["crop_area"] - KEPT[row["product_id"].split("-")[1]] ** 2) < 0.03, row

    # a later night: the copies arrive after a search of the originals, which keeps its links
    # (here none) and searches only the new images, against all of them: the same groups
    _, earlier = duplicates.find(ids[: len(data)], shas[: len(data)], signatures[: len(data)], threshold=0.99)
    calls = []
    real = duplicates.pair_similarity
    monkeypatch.setattr(
        duplicates, "pair_similarity", lambda s, pairs, **kw: calls.append(pairs) or real(s, pairs, **kw)
    )
    later, search_later = duplicates.find(ids, shas, signatures, threshold=0.99, searched=earlier)
    assert groups_of(later) == groups_of(found)
    assert (calls[0].max(axis=1) >= len(data)).all()  # a copy in every pair compared
    assert search_later["product_id"].to_list() == ids and search_later["links"].list.len().sum() > 0
    again, kept_whole = duplicates.find(ids, shas, signatures, threshold=0.99, searched=search_later)
    assert len(calls) == 1 and groups_of(again) == groups_of(found)  # nothing new: nothing compared
    assert kept_whole.equals(search_later)


def groups_of(listings: pl.DataFrame) -> set[frozenset[str]]:
    return {frozenset(group) for group in listings.group_by("group").agg("product_id")["product_id"].to_list()}


def _smooth_images(count: int, seed: int) -> list[Image.Image]:
    """``count`` distinct smooth random 96 x 96 images: 6 x 6 colour noise upsampled."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.Resampling.BICUBIC)
        for _ in range(count)
    ]


def test_the_search_in_blocks_and_from_a_file_finds_what_it_finds_at_once(tmp_path, monkeypatch):
    originals = _smooth_images(150, seed=3)
    blobs = [_jpeg(image, quality=95) for image in originals]
    ids = [f"p{i}" for i in range(len(blobs))]
    for i in range(0, 150, 5):  # a copy of every fifth: re-encoded, or cropped from its corner
        image, kind = originals[i], ("reencoded", "corner85")[i % 2]
        blobs.append(_jpeg(image, quality=40) if kind == "reencoded" else _jpeg(_cropped(image, 0.85, centred=False)))
        ids.append(f"p{i}-{kind}")
    shas = [digest(blob) for blob in blobs]
    signatures = np.frombuffer(b"".join(map(_signature, blobs)), np.uint8).reshape(len(blobs), -1)
    at_once, search = duplicates.find(ids, shas, signatures, threshold=0.99)
    assert {frozenset({pid, pid.split("-")[0]}) for pid in ids if "-" in pid} <= groups_of(at_once)

    (tmp_path / "signatures").write_bytes(signatures.tobytes())
    stored = images.SignatureFile(str(tmp_path / "signatures"), len(blobs))
    assert len(stored) == len(blobs) and (stored[[3, 1]] == signatures[[3, 1]]).all()
    assert (stored[10:20] == signatures[10:20]).all()
    monkeypatch.setattr(duplicates, "QUERY_ROWS", 17)  # ten blocks: pairs across blocks, scored each way in its own
    in_blocks, search_in_blocks = duplicates.find(pl.Series(ids), pl.Series(shas), stored, threshold=0.99)
    assert in_blocks.equals(at_once) and search_in_blocks.equals(search)

    # a later night: only the copies are new, searched against all in blocks; the same listings
    _, earlier = duplicates.find(ids[:150], shas[:150], signatures[:150], threshold=0.99)
    later, _ = duplicates.find(ids, shas, stored, threshold=0.99, searched=earlier)
    assert later.equals(at_once)


def test_alignment_stops_pairs_that_cannot_reach_the_threshold_and_finds_crops_as_before(monkeypatch):
    originals = _smooth_images(40, seed=5)
    blobs = [_jpeg(image, quality=95) for image in originals[:20]]
    blobs += [_jpeg(_cropped(image, 0.75, centred=True)) for image in originals[:10]]  # crops of the first ten
    blobs += [_jpeg(image, quality=95) for image in originals[20:30]]  # distinct images
    signatures = np.frombuffer(b"".join(map(_signature, blobs)), np.uint8).reshape(len(blobs), -1)
    pairs = np.array([(i, 20 + i) for i in range(10)] + [(i, 30 + i) for i in range(10)])
    monkeypatch.setattr(duplicates, "ALIGN_FROM", -1.0)  # every pair aligned
    scored = []
    real = duplicates._correlations
    monkeypatch.setattr(
        duplicates, "_correlations", lambda images, *rest: scored.append(len(images)) or real(images, *rest)
    )
    every, _ = duplicates.pair_similarity(signatures, pairs)
    moves_every, scored[:] = sum(scored), []
    early, _ = duplicates.pair_similarity(signatures, pairs, threshold=0.99)
    crops = every[:10] >= 0.99
    assert crops.sum() >= 8 and (every[10:] < 0.9).all()  # the crops are found, the distinct images are not
    assert (early[:10][crops] == every[:10][crops]).all()  # a pair that reaches the threshold scores the same
    assert (early[10:] <= every[10:]).all()  # the rest stop early: their similarity is a lower bound
    assert sum(scored) < moves_every
