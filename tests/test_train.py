"""Fine-tuning: labels, splits, best-checkpoint selection, metrics and calibration."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from clipdq.core import evaluation, predict, presets, splits
from clipdq.core.options import FinetuneOptions
from clipdq.core.presets import TrainConfig
from clipdq.core.spec import parse_spec
from clipdq.core.text import TextCalibration
from clipdq.io.catalog import read_catalog
from clipdq.io.sources import access_for
from clipdq.model import scorer, towers
from clipdq.model.card import model_card
from clipdq.model.meta import ModelMeta
from clipdq.training import full, prototypes, train
from clipdq.training import instances as instances_module
from clipdq.training.labeled import LabeledSet, default_splits, load_labeled
from clipdq.training.steps import augment_views, balanced_batches, batch_loss


@pytest.fixture(scope="module")
def trained_meta(trained_model_dir: Path) -> dict:
    return json.loads((trained_model_dir / towers.META_FILE).read_text())


def _labels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"color": rng.integers(0, 3, n), "lid": np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), -1)}


@pytest.mark.parametrize(("n", "val", "test"), [(600, 0.2, 0.1), (7, 0.2, 0.0), (2, 0.5, 0.0), (100, 0.01, 0.3)])
def test_split_indices_are_disjoint_cover_every_row_and_keep_proportions(n, val, test):
    parts = splits.split_indices(_labels(n), val_fraction=val, test_fraction=test, seed=0)

    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert len(parts[1]) >= 1
    for part, fraction in zip(parts[1:], (val, test)):
        assert abs(len(part) - n * fraction) <= max(1, 0.02 * n)


def test_split_indices_stratify_on_label_combinations():
    labels = _labels(3000)
    train_idx, val_idx, test_idx = splits.split_indices(labels, val_fraction=0.2, test_fraction=0.1, seed=3)
    combos = np.stack([labels["color"], labels["lid"]], axis=1)
    for combo in np.unique(combos, axis=0):
        rows = np.flatnonzero((combos == combo).all(axis=1))
        assert abs(np.isin(rows, val_idx).mean() - 0.2) < 0.03
        assert abs(np.isin(rows, test_idx).mean() - 0.1) < 0.03


def test_split_indices_depend_on_the_seed_only():
    first, again, other = (
        splits.split_indices(_labels(50), val_fraction=0.2, test_fraction=0.1, seed=s) for s in (1, 1, 2)
    )

    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_balanced_batches_cover_rare_values_evenly():
    rng = np.random.default_rng(0)
    labels = {"color": np.array([0] * 95 + [1] * 5), "lid": np.array([-1] * 50 + [0] * 45 + [1] * 5)}
    rows = np.arange(100)
    batches = list(balanced_batches(labels, rows, batch_size=40, steps=10, rng=rng))

    picked = np.concatenate(batches)
    assert all(len(b) == 40 for b in batches)
    for name in labels:  # 4 (attribute, value) pools: each value is in at least a quarter of the picks
        for value in (0, 1):
            assert np.mean(labels[name][picked] == value) >= 0.25
    assert np.mean(labels["color"][rows] == 1) == 0.05  # versus 5% of the rows, as plain shuffling gives


def test_macro_f1_weights_every_value_equally():
    labels = np.array([0, 0, 0, 0, 1])
    assert evaluation.macro_f1(labels, np.array([0, 0, 0, 0, 0]), 2) == pytest.approx((8 / 9 + 0) / 2)
    assert evaluation.macro_f1(labels, labels, 2) == 1.0


def test_load_labeled_reads_every_sample_image(labeled, sample_dir, spec):
    rows = pl.read_parquet(sample_dir / "labeled.parquet").height

    assert labeled.dropped == 0
    assert labeled.pixels.shape[0] == rows
    assert set(labeled.labels) == set(spec.names)
    assert all(len(v) == rows for v in labeled.labels.values())


def test_two_epoch_fit_keeps_the_best_validation_epoch(trained_meta):
    training = trained_meta["training"]
    losses = [epoch["val_loss"] for epoch in training["history"]]

    assert trained_meta["trained"] is True
    assert training["epochs_run"] == len(losses) == 2
    assert training["best_epoch"] == int(np.argmin(losses))
    assert training["best_val_loss"] == pytest.approx(min(losses))
    assert training["train_rows"] + training["val_rows"] + training["test_rows"] == training["labeled_rows"]


def clean_rows_to_show(bar: float) -> int:
    """Validation rows, every one right, whose one-sided 90% Wilson lower bound reaches ``bar``:
    with n rows all right the bound is 1 / (1 + z^2 / n)."""
    z = statistics.NormalDist().inv_cdf(0.9)
    return math.ceil(z**2 * bar / (1 - bar))


def test_fit_writes_metrics_and_calibration_for_every_attribute(trained_meta, spec):
    """The tiny model's dozen validation rows cannot show any bar: it sets no threshold at all
    (thresholds that are set: test_thresholds_lie_between_the_bars_the_spec_sets_and_certainty)."""
    assert min(m["val_rows"] for m in trained_meta["metrics"].values()) < clean_rows_to_show(spec.target_precision)
    assert set(trained_meta["metrics"]) == set(spec.names)
    assert set(trained_meta["calibration"]) == set(spec.names)
    conflict_bar = predict.required_accuracy(spec.target_precision, spec.expected_error_rate)
    for name in spec.names:
        metrics, calibration = trained_meta["metrics"][name], trained_meta["calibration"][name]
        assert metrics["val_rows"] >= 2
        assert 0.0 <= metrics["val_accuracy"] <= 1.0
        assert 0.0 <= metrics["ece_before"] <= 1.0 and 0.0 <= metrics["ece_after"] <= 1.0
        assert predict.TEMPERATURES[0] <= calibration["temperature"] <= predict.TEMPERATURES[-1]
        for key, bar in (("gap_threshold", spec.target_precision), ("conflict_threshold", conflict_bar)):
            if metrics["val_rows"] < clean_rows_to_show(bar):  # too few rows to show the bar: it declines to flag
                assert calibration[key] is None, (name, key)
        k = len(spec.attribute(name).values)
        assert np.array(metrics["confusion"]).shape == (k, k)
        assert np.array(metrics["confusion"]).sum() == metrics["test_rows"]
        assert np.trace(metrics["confusion"]) / metrics["test_rows"] == pytest.approx(metrics["test_accuracy"])
    assert trained_meta["spec_fingerprint"] == spec.fingerprint()


def test_thresholds_lie_between_the_bars_the_spec_sets_and_certainty(flagging_model_dir, spec):
    """On 200 validation rows the flagging model sets thresholds: a gap bar where suggestions are
    right target_precision of the time, a conflict bar where flags are, given expected_error_rate."""
    calibration = json.loads((flagging_model_dir / "clipdq.json").read_text())["calibration"]
    p, e = spec.target_precision, spec.expected_error_rate
    bars = {"gap_threshold": p, "conflict_threshold": p * (1 - e) / (p * (1 - e) + e * (1 - p))}

    thresholds = {
        (name, key): calibration[name][key] for name in spec.names for key in bars if calibration[name][key] is not None
    }

    assert {("color", "gap_threshold"), ("color", "conflict_threshold")} <= set(thresholds)
    for (name, key), threshold in thresholds.items():
        assert bars[key] <= threshold <= 1.0, (name, key, threshold)
        assert calibration[name][key.replace("threshold", "rows")] >= 1, (name, key)


def test_the_model_card_lists_every_attribute(trained_model_dir, spec):
    card = (trained_model_dir / "README.md").read_text()

    assert all(f"| {name} |" in card for name in spec.names)
    color = spec.attribute("color")
    header = "| | " + " | ".join(color.values) + " |"
    assert header in card
    rows = card.split(header)[1].strip().splitlines()[1 : 1 + len(color.values)]
    counts = [[int(c) for c in row.strip("| ").split(" | ")[1:]] for row in rows]
    assert counts == json.loads((trained_model_dir / towers.META_FILE).read_text())["metrics"]["color"]["confusion"]


def test_the_audit_uses_a_models_calibration_only_for_its_own_spec(trained_model_dir, spec):
    clip = towers.load_model(str(trained_model_dir), device="cpu")
    other_spec = parse_spec("attributes:\n  color:\n    values: [red, blue, green, yellow, black, white, grey]\n")

    own = scorer.calibration_for(clip, spec)
    other = scorer.calibration_for(clip, other_spec)

    assert own == clip.meta.calibration
    default = predict.default_calibration(other_spec.target_precision, other_spec.expected_error_rate)
    assert other == {"color": default}


@pytest.fixture(scope="module")
def noisy_fits(labeled, spec) -> list[dict]:
    """Short fits with a learning rate far too high, so validation loss jumps around between epochs.

    Each result also holds the validation loss of the weights fit() left in the towers.
    """
    config = TrainConfig(epochs=5, lr=0.1, warmup_epochs=1, patience=2)
    results = []
    for seed in range(4):
        clip = towers.init_model(spec, seed=seed)
        seeded = dataclasses.replace(config, seed=seed)
        splits = default_splits(labeled, seeded)
        result = full.fit(clip, labeled, spec, seeded, splits)
        result["restored_loss"], _ = full.evaluate(clip, labeled, splits[1], towers.Captions(clip, spec))
        result["config"] = dataclasses.replace(config, seed=seed)
        results.append(result)
    return results


def test_fit_restores_the_weights_of_the_best_epoch(noisy_fits):
    for result in noisy_fits:
        losses = [epoch["val_loss"] for epoch in result["history"]]
        assert result["best_epoch"] == int(np.argmin(losses))
        assert result["restored_loss"] == pytest.approx(losses[result["best_epoch"]], rel=1e-4)
    assert any(r["restored_loss"] != pytest.approx(r["history"][-1]["val_loss"], rel=1e-4) for r in noisy_fits), (
        "setup: in some fit the last epoch should be worse than the best"
    )


def test_fit_stops_after_patience_epochs_without_improvement(noisy_fits):
    for result in noisy_fits:
        config = result["config"]
        assert result["epochs_run"] == min(config.epochs, result["best_epoch"] + 1 + config.patience)
        assert len(result["history"]) == result["epochs_run"]
    assert any(r["epochs_run"] < r["config"].epochs for r in noisy_fits), "setup: some fit should stop early"


def test_weight_averaging_is_what_validation_judges_and_fit_keeps_and_leaves_the_steps_alone(labeled, spec):
    config = TrainConfig(epochs=2, warmup_epochs=1, keep_best=False)  # keeps the last (averaged) weights
    parts = default_splits(labeled, config)
    fits = {}
    for decay in (0.0, 0.9, 1e-12):
        clip = towers.init_model(spec, seed=0)
        result = full.fit(clip, labeled, spec, dataclasses.replace(config, weight_average_decay=decay), parts)
        kept_loss, _ = full.evaluate(clip, labeled, parts[1], towers.Captions(clip, spec))
        fits[decay] = (result["history"], kept_loss, clip.model.state_dict())
    (plain, plain_loss, plain_weights), (averaged, averaged_loss, _), (_, _, nearly_plain) = fits.values()

    assert [e["train_loss"] for e in averaged] == [e["train_loss"] for e in plain]  # the same steps
    assert averaged_loss == pytest.approx(averaged[-1]["val_loss"], rel=1e-4)  # kept what validation judged
    assert averaged_loss != pytest.approx(plain_loss, rel=1e-3)  # which is not the last step's weights
    for name, weights in plain_weights.items():  # a decay of almost 0 averages nothing
        torch.testing.assert_close(nearly_plain[name], weights)


def test_the_moving_average_forgets_the_untrained_start_then_decays_as_told():
    layer = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(layer.weight)
    averaged = full.MovingAverage(layer, decay=0.75)  # reached at the 27th step: 27 / (27 + 9)
    seen = []
    for _ in range(40):
        with torch.no_grad():
            layer.weight.fill_(1.0)  # the trained weights move away from the start (0) and stay
        averaged.update()
        seen.append(float(averaged.module.weight))

    # warm-up: decay 1/10 after the first step, then 2/11, 3/12, ...: the start's share is their product
    assert seen[0] == pytest.approx(0.9) and seen[2] == pytest.approx(1 - 1 / 10 * 2 / 11 * 3 / 12)
    start_share = [1 - value for value in seen]
    assert start_share[-1] == pytest.approx(start_share[-2] * 0.75)  # then at most the decay asked for
    assert start_share[-1] < 1e-6 < 0.75**40  # a fixed 0.75 from the start would keep more of it


def test_label_smoothing_spreads_a_share_of_the_target_over_every_value_of_known_rows():
    logits = {"color": torch.tensor([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), "size": torch.tensor([[1.0, 0.0]] * 2)}
    labels = {"color": torch.tensor([0, -1]), "size": torch.tensor([0, 0])}  # -1: unknown, not counted

    log_p = {k: torch.log_softmax(v, dim=1) for k, v in logits.items()}
    smoothed = {
        k: -(0.9 * log_p[k][rows, labels[k][rows]] + 0.1 * log_p[k][rows].mean(dim=1)).mean()
        for k, rows in (("color", [0]), ("size", [0, 1]))
    }

    assert float(batch_loss(logits, labels, smoothing=0.1)) == pytest.approx(float(sum(smoothed.values()) / 2))
    # right and sure: smoothing costs
    assert float(batch_loss(logits, labels)) < float(batch_loss(logits, labels, smoothing=0.1))


def test_prototypes_learn_value_embeddings_that_separate_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    labels = rng.integers(0, 3, 300)
    image_emb = centers[labels] + 0.3 * rng.normal(size=(300, 16))
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    init = rng.normal(size=(3, 16))  # unrelated starting embeddings, as a caption tower might give
    init /= np.linalg.norm(init, axis=1, keepdims=True)
    train_idx, val_idx = np.arange(200), np.arange(200, 300)

    learned, summary = prototypes.fit(
        image_emb.astype(np.float32),
        {"a": labels},
        {"a": init.astype(np.float32)},
        train_idx=train_idx,
        val_idx=val_idx,
        scale=20.0,
    )

    def accuracy(emb):
        return ((image_emb[val_idx] @ emb.T).argmax(1) == labels[val_idx]).mean()

    assert accuracy(init) < 0.7
    assert accuracy(learned["a"]) > 0.95
    np.testing.assert_allclose(np.linalg.norm(learned["a"], axis=1), 1.0, rtol=1e-5)
    assert 0 <= summary["best_step"] < summary["steps_run"]


def test_prototype_mode_trains_saves_and_is_used_by_the_audit(labeled, spec, tmp_path):
    clip = towers.init_model(spec, seed=0)
    config = TrainConfig(mode="prototype")
    outcome = train.train_on(clip, labeled, spec, config=config, splits=default_splits(labeled, config))
    clip.meta.spec_fingerprint = spec.fingerprint()
    towers.save_model(clip, str(tmp_path / "m"))

    loaded = towers.load_model(str(tmp_path / "m"), device="cpu")

    sizes = outcome["training"]
    assert sizes["train_rows"] + sizes["val_rows"] + sizes["test_rows"] == len(labeled.pixels)
    assert set(outcome["calibration"]) == set(spec.names)
    assert set(loaded.value_emb) == set(spec.names)
    for name, emb in clip.value_emb.items():
        np.testing.assert_array_equal(loaded.value_emb[name], emb)
    assert scorer.value_embeddings_for(loaded, spec) is loaded.value_emb
    other = parse_spec("attributes:\n  color:\n    values: [red, blue]\n")
    assert set(scorer.value_embeddings_for(loaded, other)) == {"color"}  # another spec: captions again


@pytest.mark.parametrize(
    "options",
    [
        {"val_fraction": 0.0},
        {"val_fraction": 0.8, "test_fraction": 0.2},
        {"test_fraction": -0.1},
        {"label_noise": 0.5},
        {"mode": "probe"},
        {"mode": "locked", "frozen_blocks": 2},
        {"mode": "locked", "instance_column": "product"},
        {"frozen_blocks": -1},
    ],
)
def test_train_config_rejects_settings_that_cannot_work(options):
    with pytest.raises(ValueError):
        TrainConfig(**options)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epochs", 0),
        ("max_minutes", 0.0),
        ("val_fraction", 1.0),
        ("test_fraction", -0.1),
        ("label_noise", 0.5),
        ("unlock_blocks", -1),
        ("views", 0),
    ],
)
def test_the_options_and_the_config_reject_the_same_settings(name, value):
    assert name in presets.BOUNDS
    with pytest.raises(ValueError):
        FinetuneOptions(**{name: value})
    with pytest.raises(ValueError):
        TrainConfig(**{name: value})


def test_the_options_help_gives_the_presets_defaults():
    help_of = {name: field.description for name, field in FinetuneOptions.model_fields.items()}
    lite_full, lite_locked = (presets.PRESETS["pretrained image tower", mode] for mode in ("full", "locked"))

    assert (
        f"{lite_full['epochs']} in full mode and {lite_locked['epochs']} in locked mode from a pretrained image "
        f"tower with a new text tower; else {TrainConfig.epochs}"
    ) in help_of["epochs"]
    assert f"{lite_locked['views']} in locked mode" in help_of["views"]
    assert f"else {TrainConfig.views}" in help_of["views"]
    assert f"else {TrainConfig.val_fraction}" in help_of["val_fraction"]
    assert set(FinetuneOptions().config_options()) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_model_metadata_is_typed_in_memory_and_written_as_it_was_read(trained_meta):
    raw = trained_meta | {"image_size": 208, "added_later": {"x": 1}}  # an older field and a newer one

    meta = ModelMeta.from_json(raw)

    assert isinstance(meta.calibration["color"], predict.Calibration) and isinstance(
        meta.text_calibration, TextCalibration
    )
    assert meta.other == {"added_later": {"x": 1}} and meta.view_sizes() == [208]
    assert meta.starting_point == "pretrained" and ModelMeta().starting_point == "pretrained"  # a plain checkpoint
    assert json.dumps(meta.to_json(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_config_for_trains_new_models_fast_and_pretrained_ones_gently(spec, trained_model_dir):
    new = train.config_for(towers.init_model(spec), epochs=3)
    pretrained = train.config_for(towers.load_model(str(trained_model_dir), device="cpu"))
    chosen = train.config_for(towers.load_model(str(trained_model_dir), device="cpu"), lr=3e-4)

    assert (new.lr, new.spread_steps, new.epochs) == (1e-3, 100, 3)
    assert (pretrained.lr, pretrained.spread_steps) == (1e-5, 0)
    assert chosen.lr == 3e-4


def test_a_pretrained_image_tower_trains_whole_on_crops_unless_told_to_stay_locked(spec):
    tower = towers.init_model(spec, "efficientnet-lite0")
    whole, locked_tower = train.config_for(tower), train.config_for(tower, mode="locked")
    new = train.config_for(towers.init_model(spec))

    assert (whole.mode, whole.epochs, whole.train_size, whole.image_tower_lr) == ("full", 17, 160, 3e-4)
    assert (whole.frozen_blocks, whole.val_fraction, whole.test_fraction) == (5, 0.1, 0.0)  # every photo counts
    assert (whole.label_smoothing, whole.weight_average_decay) == (0.1, 0.998)
    assert train.config_for(tower, val_fraction=0.3).val_fraction == 0.3  # unless told otherwise
    assert (locked_tower.mode, locked_tower.epochs, locked_tower.views, locked_tower.image_tower_lr) == (
        "locked",
        40,
        4,
        1e-4,
    )
    assert (new.mode, new.train_size, new.image_tower_lr) == ("full", None, new.lr)  # one rate for a new CLIP


def test_groups_stay_on_one_side_of_every_split_and_fold():
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 60, 500).astype(str)  # e.g. photo sessions, several images each
    labels = {"color": rng.integers(0, 3, 500)}

    parts = splits.split_indices(labels, val_fraction=0.2, test_fraction=0.1, seed=0, groups=groups)
    folds = splits.fold_of(labels, k=4, seed=0, groups=groups)

    sides = [set(groups[rows]) for rows in parts]
    assert sum(len(rows) for rows in parts) == 500
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert all(len(rows) for rows in parts)
    for group in set(groups):
        assert len(set(folds[groups == group])) == 1
    ungrouped = splits.split_indices(labels, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert set(groups[ungrouped[0]]) & set(groups[ungrouped[1]])  # without groups they would mix


def test_train_only_rows_and_their_groups_only_train_and_the_shares_apply_to_the_rest():
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 80, 600).astype(str)
    labels = {"color": rng.integers(0, 3, 600)}
    train_only = rng.random(600) < 0.1

    train_rows, val_rows, test_rows = splits.split_indices(
        labels, val_fraction=0.2, test_fraction=0.1, seed=0, groups=groups, train_only=train_only
    )

    forced = np.isin(groups, groups[train_only])  # a near-copy of a train-only image trains too
    assert forced[train_rows].sum() == forced.sum() and not forced[np.concatenate([val_rows, test_rows])].any()
    assert len(train_rows) + len(val_rows) + len(test_rows) == 600
    assert abs(len(val_rows) / (~forced).sum() - 0.2) < 0.05  # shares of the rows that may validate
    unforced = splits.split_indices(labels, val_fraction=0.2, test_fraction=0.1, seed=0, groups=groups)
    assert forced[unforced[1]].any()  # without the column some of them would validate
    with pytest.raises(ValueError, match="every labeled row is train-only"):
        splits.split_indices(labels, val_fraction=0.2, test_fraction=0.1, seed=0, train_only=np.ones(600, bool))


def test_finetune_keeps_train_only_rows_out_of_calibration_and_says_so(sample_dir, spec):
    frame = read_catalog(str(sample_dir / "labeled.parquet"))
    frame = frame.with_columns(studio=pl.int_range(pl.len()) % 3 == 0)
    clip = towers.init_model(spec)
    config = TrainConfig(epochs=1, mode="prototype", train_only_column="studio", group_column="product_id")

    trained = train.finetune(clip, frame, spec, access=access_for(str(sample_dir)), config=config)

    training, studio = trained.meta.training, int(frame["studio"].sum())
    assert training["train_only_rows"] == studio and training["train_rows"] >= studio
    assert training["val_rows"] + training["test_rows"] == pytest.approx(0.3 * (frame.height - studio), abs=2)
    assert f"of which {studio} train-only" in model_card(trained.meta)
    with pytest.raises(ValueError, match="train-only column 'product_id' must be a boolean"):
        load_labeled(
            frame, spec, access=access_for(str(sample_dir)), pixel_spec=clip.pixels, train_only_column="product_id"
        )


def test_finetune_splits_by_the_group_column(sample_dir, spec):
    frame = read_catalog(str(sample_dir / "labeled.parquet"))
    frame = frame.with_columns((pl.int_range(pl.len()) // 4).cast(pl.String).alias("family"))
    clip = towers.init_model(spec)
    config = TrainConfig(epochs=1, mode="prototype", group_column="family")

    data = load_labeled(frame, spec, access=access_for(str(sample_dir)), pixel_spec=clip.pixels, group_column="family")
    splits = default_splits(data, config)

    sides = [set(data.groups[rows]) for rows in splits]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    with pytest.raises(ValueError, match="group column 'nope'"):
        load_labeled(frame, spec, access=access_for(str(sample_dir)), pixel_spec=clip.pixels, group_column="nope")
    with pytest.raises(ValueError, match="instance column 'nope'"):
        load_labeled(frame, spec, access=access_for(str(sample_dir)), pixel_spec=clip.pixels, instance_column="nope")
    shown = load_labeled(
        frame, spec, access=access_for(str(sample_dir)), pixel_spec=clip.pixels, instance_column="family"
    ).instances
    assert shown is not None and ((shown[:, None] == shown) == (data.groups[:, None] == data.groups)).all()


def test_the_anchor_bank_keeps_one_anchor_per_product_a_train_only_row_first():
    instances = np.array([0, 0, 0, 1, 1, 2, -1, 3, 3])
    train_only = np.array([False, False, True, False, False, False, False, False, False])
    bank = instances_module.anchor_bank(instances, train_only, np.arange(8))  # row 8 does not train

    assert bank is not None and bank.products == 2  # product 2 shows once, product 3 once in training
    assert bank.anchor_rows.tolist() == [2, 3]  # product 0's train-only row, product 1's first
    assert bank.product_of.tolist() == [0, 0, 0, 1, 1, -1, -1, -1, -1]
    picked = bank.anchors_for(np.array([0, 1, 4, 5]), np.random.default_rng(0))
    assert picked.tolist() == [2, 3]  # both products' anchors, neither among the rows
    assert bank.anchors_for(np.array([0, 2, 4, 3]), np.random.default_rng(0)).tolist() == []
    assert instances_module.anchor_bank(np.array([0, 1, -1]), None, np.arange(3)) is None


def test_the_instance_loss_pulls_rows_towards_their_anchor_and_refreshes_the_bank():
    bank = instances_module.AnchorBank(np.array([0, 0, 1, 1]), None, np.arange(4))
    bank.fill(torch.eye(4)[[0, 1]])  # anchors: rows 0 and 2
    away = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0, 1.0]]), dim=1)  # row 1, nearer 2's anchor
    toward = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), dim=1)
    rows = np.array([1, 2])
    anchor = torch.eye(4)[[2]]

    losses = [float(bank.loss(rows, torch.cat([row, anchor]))) for row in (away, toward)]

    assert losses[0] > losses[1]
    torch.testing.assert_close(bank.embeddings[1], anchor[0])  # row 2 embedded: its anchor refreshed
    assert bank.loss(np.array([0, 2]), torch.eye(4)[[0, 2]]) is None  # anchors alone: nothing to pull


def test_instance_similarity_pulls_a_products_photos_towards_its_catalog_image(labeled, spec):
    n, views = len(labeled.pixels), 2  # each product: its image as the catalog image, and two cropped photos of it
    generator = torch.Generator().manual_seed(1)
    photos = torch.cat([augment_views(labeled.pixels, generator, min_area=0.4) for _ in range(views)])
    product = np.tile(np.arange(n), views + 1)
    data = LabeledSet(
        torch.cat([labeled.pixels, photos]),
        {name: values.repeat(views + 1) for name, values in labeled.labels.items()},
        0,
        train_only=np.arange(len(product)) < n,
        instances=product,
    )
    config = TrainConfig(epochs=4, batch_size=16, warmup_epochs=1, keep_best=False, test_fraction=0.0)
    parts = default_splits(data, config)
    margins, products = {}, {}
    for name, given in (("without", dataclasses.replace(data, instances=None)), ("with", data)):
        clip = towers.init_model(spec, seed=0)
        products[name] = full.fit(clip, given, spec, config, parts)["instance_products"]
        trained = np.setdiff1d(parts[0], np.arange(n))  # the photos that trained
        similarity = (
            towers.embed_images(clip, data.pixels[trained].numpy())
            @ towers.embed_images(clip, labeled.pixels.numpy()).T
        )
        own = similarity[np.arange(len(trained)), product[trained]]
        margins[name] = float(own.mean() - similarity.mean())  # own catalog image against the average one

    assert products == {"without": 0, "with": n}
    assert margins["with"] > margins["without"] + 0.3, margins


def test_finetune_pulls_the_products_named_by_the_instance_column_and_the_card_says_so(sample_dir, spec):
    frame = read_catalog(str(sample_dir / "labeled.parquet"))
    frame = frame.with_columns((pl.int_range(pl.len()) // 4).cast(pl.String).alias("product"))
    config = TrainConfig(epochs=1, instance_column="product")

    trained = train.finetune(towers.init_model(spec), frame, spec, access=access_for(str(sample_dir)), config=config)

    products = trained.meta.training["instance_products"]
    assert 0 < products <= frame.height // 4  # those with two training rows
    assert f"{products} products' photos pulled towards their anchors" in model_card(trained.meta)
