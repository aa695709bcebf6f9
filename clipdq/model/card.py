"""The model card: a fine-tuned model's README.md, its data, training, calibration and held-out
metrics in words and Markdown tables, written from its metadata (``ModelMeta``) when it is saved.
"""

from __future__ import annotations

from clipdq.core.predict import Calibration
from clipdq.core.text import TextCalibration
from clipdq.model.meta import ModelMeta

MAX_CONFUSION_VALUES = 12  # larger confusion matrices stay in clipdq.json only


def sizes_text(sizes) -> str:
    """ "208" or "160, 192 and 224"."""
    sizes = [str(size) for size in sizes]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} and {sizes[-1]}"


def _full_mode_details(config: dict) -> str:
    """What full mode's config changed from plain training, in words."""
    details = f", image tower on {config['train_size']}-px random crops" if config.get("train_size") else ""
    details += f", its stem and lowest {config['frozen_blocks']} blocks frozen" if config.get("frozen_blocks") else ""
    details += f", labels smoothed by {config['label_smoothing']}" if config.get("label_smoothing") else ""
    details += (
        f", the weights' moving average kept (decay {config['weight_average_decay']} per step)"
        if config.get("weight_average_decay")
        else ""
    )
    return details


def _audit_view(meta: ModelMeta) -> str:
    """How the audit shows the model photos, in words; "" where training did not choose."""
    sizes, mirrored = [size for size in meta.view_sizes() if size], meta.mirror_average
    averaged = ", its embeddings averaged" if len(sizes) > 1 or mirrored else ""
    return (
        f" The audit sees each photo at {sizes_text(sizes)} px{' and mirrored' if mirrored else ''}{averaged} "
        f"(chosen by validation loss)."
        if sizes
        else ""
    )


def _training_line(meta: ModelMeta) -> str:
    """How the model was trained, in words: mode, what trained, why it stopped."""
    config, training = meta.train_config or {}, meta.training or {}
    mode, unlocked = config.get("mode", "full"), config.get("unlock_blocks", 0)
    locked = "image tower locked" + (f" below its top {unlocked} blocks" if unlocked else "")
    how = {
        "full": f"both towers fine-tuned on pixels{_full_mode_details(config)}",
        "prototype": "value embeddings learned on the frozen image tower",
        "locked": f"{locked}; text tower and projections trained on its kept activations, "
        f"{config.get('views', 1)} view(s) per training image",
    }
    tower = f" Image tower: {meta.pretrained_image_tower}." if meta.pretrained_image_tower else ""
    return (
        f"Mode: **{mode}** ({how.get(mode, mode)}).{tower}{_audit_view(meta)} Best epoch "
        f"{training.get('best_epoch')} of {training.get('epochs_run')}, stopped by "
        f"{training.get('stopped_by', 'epochs')}; training {training.get('minutes')} min, "
        f"{training.get('total_minutes', training.get('minutes'))} min with reading the images."
    )


def _train_detail(training: dict) -> str:
    """What the training rows held beyond their count: train-only rows, products pulled together."""
    rows, products = training.get("train_only_rows"), training.get("instance_products")
    pulled = f"; {products} products' photos pulled towards their anchors" if products else ""
    return (f" of which {rows} train-only" if rows else "") + pulled


def _threshold(value: float | None, rows: int | None) -> str:
    return "never" if value is None else f"{value:.3f} ({rows})"


def _attribute_row(name: str, m: dict, c: Calibration | None) -> str:
    """The table row of one attribute: test and validation figures, its thresholds."""
    gap = _threshold(c.gap_threshold, c.gap_rows) if c else "never"
    conflict = _threshold(c.conflict_threshold, c.conflict_rows) if c else "never"
    return (
        f"| {name} | {m.get('test_accuracy', float('nan')):.3f} | {m.get('test_macro_f1', float('nan')):.3f} "
        f"| {m.get('val_accuracy', float('nan')):.3f} | {m.get('ece_before', float('nan')):.3f} / "
        f"{m.get('ece_after', float('nan')):.3f} | {gap} | {conflict} |"
    )


def model_card(meta: ModelMeta) -> str:
    """A readable summary of a fine-tuned model: data, training, calibration and held-out metrics."""
    assert meta.metrics is not None  # training records them
    training, basis = meta.training or {}, meta.calibration_basis or {}
    lines = [
        "# clipdq model",
        "",
        f"Fine-tuned for spec `{meta.spec_fingerprint}`, weights `{meta.fingerprint}`.",
        f"Labeled rows: {training.get('labeled_rows')} (train {training.get('train_rows')}{_train_detail(training)}, "
        f"validation {training.get('val_rows')}, test {training.get('test_rows')}).",
        "",
        _training_line(meta),
        "",
        f"Thresholds were chosen on the {basis.get('split', 'validation')} split ({basis.get('rows')} rows in "
        f"{basis.get('val_groups')} groups; grouping: {basis.get('grouping', 'none')}), each where the "
        f"{basis.get('bound', 'estimated accuracy')} of the rows above it meets the spec's precision target "
        f"{basis.get('target_precision')}; 'rows' says how many validation rows support each.",
        "",
        "| attribute | test accuracy | test macro-F1 | val accuracy | ECE before / after | gap threshold (rows) "
        "| conflict threshold (rows) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_attribute_row(name, m, (meta.calibration or {}).get(name)) for name, m in meta.metrics.items()]
    lines += _text_line(meta.text_calibration)
    for name, m in meta.metrics.items():
        lines += _confusion_table(name, (meta.values or {}).get(name), m.get("confusion"))
    return "\n".join(lines) + "\n"


def _text_line(fitted: TextCalibration | None) -> list[str]:
    """What the card says of the image and text agreement calibration."""
    if not fitted:
        return []
    threshold = "never flags" if fitted.threshold is None else f"flags at score {fitted.threshold:.2f} or below"
    return [
        "",
        f"Image and text agreement (`{fitted.column}`): {threshold}, chosen on {fitted.rows} validation "
        f"rows with their own texts and {fitted.planted_rows} pairings with other products' texts "
        f"(lower confidence bounds of recall and of the false-flag rate, at error rate {fitted.error_rate}).",
    ]


def _confusion_table(name: str, values: list[str] | None, confusion: list[list[int]] | None) -> list[str]:
    """A test-split confusion matrix as Markdown (rows: catalog value, columns: predicted)."""
    if not values or not confusion:
        return []
    if len(values) > MAX_CONFUSION_VALUES:
        return ["", f"Confusion matrix of {name}: {len(values)} values, in clipdq.json (`metrics.{name}.confusion`)."]
    lines = [
        "",
        f"Confusion matrix of {name} on the test split (rows: true value, columns: predicted):",
        "",
        "| | " + " | ".join(values) + " |",
        "|---|" + "---|" * len(values),
    ]
    lines += [f"| **{value}** | " + " | ".join(str(c) for c in row) + " |" for value, row in zip(values, confusion)]
    return lines
