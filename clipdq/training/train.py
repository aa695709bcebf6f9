"""Fine-tune CLIP on labeled products: cross-entropy of image embeddings against the
embeddings of each attribute's value captions, best checkpoint by validation loss, then a
per-attribute calibration fitted on the validation split.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from clipdq.core import evaluation, predict, text, values
from clipdq.core.options import MODES, Mode
from clipdq.core.spec import Spec
from clipdq.core.splits import NEAR_DUPLICATE_COSINE, Splits, near_duplicate_groups, split_indices
from clipdq.core.text import texts_of
from clipdq.io import images
from clipdq.io.sources import ImageAccess
from clipdq.model import towers
from clipdq.model.files import VIEW_KEYS
from clipdq.training import locked, prototypes
from clipdq.training.steps import augment_views, balanced_batches, batch_loss, run_epochs, schedule, take_step

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 100  # upper bound; early stopping or max_minutes may end sooner
    batch_size: int = 32
    lr: float = 1e-3  # AdamW peak learning rate for models trained from scratch; ~1e-5 for pretrained
    weight_decay: float = 0.05
    warmup_epochs: int = 2  # linear warm-up, then cosine decay
    val_fraction: float = 0.2  # share of labeled products for checkpointing and calibration
    test_fraction: float = 0.1  # share held out for the metrics in the model card; 0 to skip
    balanced: bool = True  # batches cover every attribute value evenly (else plain shuffling)
    patience: int = 15  # epochs without a better validation loss before stopping
    keep_best: bool = True  # restore the lowest-validation-loss epoch; False keeps the last (fixed schedules)
    max_minutes: float | None = None  # wall-clock safety cap (epochs are the budget); the best checkpoint is kept
    spread_steps: int = 100  # text-only steps pushing each attribute's value captions apart (new models)
    augment: bool = True  # random crop, flip and brightness on training images
    mode: Mode = "full"  # see MODES
    label_noise: float = 0.0  # share of wrong labels: 0 for curated ones, the error rate for a catalog's own
    group_column: str | None = None  # rows sharing its value (product family, photo session) share a split
    train_only_column: str | None = None  # rows where this boolean column is true only train (never calibrate)
    unlock_blocks: int = 0  # locked mode: top blocks of an EfficientNet image tower that train too
    tower_lr: float | None = None  # the image tower's learning rate (pretrained: gentler than a new text tower's)
    train_size: int | None = None  # full mode: train on random crops of this side (FixRes: smaller than the audit's
    # size trains faster and suits the audit's whole photos); None: shifted and flipped photos at the model's size
    views: int = 1  # locked mode: kept views per training image, the first plain, the others augmented
    label_smoothing: float = 0.0  # full mode: the training loss's share of probability spread over the other values
    weight_average_decay: float = 0.0  # full mode: validate and keep an exponential moving average of the weights
    # with this decay per step, reached after a warm-up (0: the weights themselves)
    frozen_blocks: int = 0  # full mode: the stem and this many lowest blocks of an EfficientNet tower stay as they are
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE  # images this alike share a split (no group column)
    text_epochs: int = 20  # then, epochs teaching the text tower the labeled texts (the spec's text column); 0: off
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 < val_fraction, 0 <= test_fraction and their sum < 1, not "
                             f"{self.val_fraction} and {self.test_fraction}")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), not {self.label_noise}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.unlock_blocks and self.mode != "locked" or self.unlock_blocks < 0 or self.views < 1:
            raise ValueError("unlock_blocks (>= 0) applies to locked mode only, and views must be at least 1")
        if self.frozen_blocks and self.mode != "full" or self.frozen_blocks < 0:
            raise ValueError("frozen_blocks (>= 0) applies to full mode only")

    @property
    def image_tower_lr(self) -> float:
        """The learning rate of what trains in the image tower: ``tower_lr``, else ``lr``."""
        return self.lr if self.tower_lr is None else self.tower_lr


PRESETS = {  # defaults by what the model starts from (see ``config_for``)
    # a pretrained CLIP: gentle updates that keep its captions where they are
    "pretrained": {"lr": 1e-5, "spread_steps": 0},
    # a pretrained image tower with a new text tower: train both on pixels (full mode's preset below:
    # grocery fine classes 0.80 on other sessions' photos against locked mode's 0.70, in 12 minutes on 2 cores
    # against 5 to 8; docs/benchmarks.md)
    "pretrained image tower": {},
    # a new CLIP (``init_model``): learn fast, first spread the captions apart
    "new": {},
}
MODE_PRESETS = {  # (starting point, mode) -> further defaults where that pair needs its own
    # 4 views: grocery fine-class accuracy 0.764 against 0.73 with 2 (docs/benchmarks.md)
    ("pretrained image tower", "locked"): {"epochs": 40, "patience": 8, "batch_size": 64, "views": 4,
                                           "tower_lr": 1e-4},
    # the tower above its lowest five blocks (1.7x faster than all of it, as accurate) at under a third of the
    # new text tower's rate, on 160-px crops, 17 epochs (the frozen blocks compute in bf16); labels smoothed and
    # the weights averaged (grocery coarse / fine classes 0.894 / 0.803 on other sessions' photos, three seeds);
    # the whole tower gains most from photos, so a tenth is held out for validation and calibration and none for
    # a test split (docs/benchmarks.md)
    ("pretrained image tower", "full"): {"epochs": 17, "patience": 4, "warmup_epochs": 1, "train_size": 160,
                                         "tower_lr": 3e-4, "frozen_blocks": 5, "label_smoothing": 0.1,
                                         "weight_average_decay": 0.998, "val_fraction": 0.1,
                                         "test_fraction": 0.0},
}


def starting_point(clip: towers.Clip) -> str:
    """Which of PRESETS describes ``clip``: plain checkpoints (no metadata) count as pretrained."""
    if clip.meta.get("trained", True):
        return "pretrained"
    return "pretrained image tower" if clip.meta.get("pretrained_image_tower") else "new"


def quick_mode(clip: towers.Clip) -> Mode | None:
    """The mode for a model trained many times over, as cross-fitting's fold models are: locked for a
    pretrained image tower (minutes instead of a quarter hour), else the default (None)."""
    return "locked" if starting_point(clip) == "pretrained image tower" else None


def config_for(clip: towers.Clip, **options) -> TrainConfig:
    """Defaults that suit the model and its mode (PRESETS, MODE_PRESETS), overridden by the options
    that are not None."""
    given = {name: value for name, value in options.items() if value is not None}
    start = starting_point(clip)
    mode = given.get("mode", PRESETS[start].get("mode", TrainConfig.mode))
    return TrainConfig(**(PRESETS[start] | MODE_PRESETS.get((start, mode), {}) | given))


@dataclass
class LabeledSet:
    pixels: torch.Tensor  # (n, 3, h, w) float32
    labels: dict[str, torch.Tensor]  # attribute -> (n,) value index, -1 where unknown
    dropped: int  # labeled rows without a readable image
    groups: np.ndarray | None = None  # (n,) group per row: near-duplicates that must share a split
    texts: np.ndarray | None = None  # (n,) the spec's text column ("" where missing); None without one
    text_categories: np.ndarray | None = None  # (n,) the spec's text category column, "" where missing
    train_only: np.ndarray | None = None  # (n,) bool: rows that only train (``TrainConfig.train_only_column``)


def load_labeled(
    frame: pl.DataFrame, spec: Spec, *, access: ImageAccess, pixel_spec: images.PixelSpec,
    group_column: str | None = None, train_only_column: str | None = None
) -> LabeledSet:
    groups, train_only = group_keys(frame, group_column), train_only_rows(frame, train_only_column)
    loaded = images.load_images(frame[spec.image_column].to_list(), access, pixel_spec)
    if not loaded.ok.any():
        raise ValueError("no labeled image could be read")
    labels = {k: torch.from_numpy(v[loaded.ok]) for k, v in values.labels(frame, spec).items()}
    texts, categories = (part[loaded.ok] for part in texts_of(frame, spec))
    has_texts = spec.text_column in frame.columns
    return LabeledSet(torch.from_numpy(loaded.pixels), labels, int((~loaded.ok).sum()),
                      None if groups is None else groups[loaded.ok], texts if has_texts else None,
                      categories if has_texts else None, None if train_only is None else train_only[loaded.ok])


def group_keys(frame: pl.DataFrame, column: str | None) -> np.ndarray | None:
    """(n,) group of each row from ``column`` (nulls form one group); None without a column."""
    if column is None:
        return None
    if column not in frame.columns:
        raise ValueError(f"group column {column!r} is not in the labeled catalog")
    return frame[column].cast(pl.String).fill_null("").to_numpy()


def train_only_rows(frame: pl.DataFrame, column: str | None) -> np.ndarray | None:
    """(n,) bool: the rows where the boolean ``column`` is true (null: false); None without a column."""
    if column is None:
        return None
    if frame.schema.get(column) != pl.Boolean:
        raise ValueError(f"train-only column {column!r} must be a boolean column of the labeled catalog")
    return frame[column].fill_null(False).to_numpy()


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (pad 1/8 and crop), horizontal flip and brightness, batch-wise per image."""
    n, _, h, w = pixels.shape
    pad = h // 8
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5))


TOWER_CROP_AREA = 0.25  # full mode's crops at ``train_size`` keep 25 to 100% of a photo's area


def augmented(pixels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A training batch as full mode sees it: random crops at ``config.train_size`` where set, else
    shifted and flipped at the model's size."""
    if config.train_size:
        return augment_views(pixels, generator, size=config.train_size, min_area=TOWER_CROP_AREA)
    return augment(pixels, generator)


def parameter_groups(clip: towers.Clip, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the image tower at ``image_tower_lr``, the rest at ``lr``."""
    named = list(clip.model.named_parameters())
    return [{"params": [p for n, p in named if n.startswith("vision_model.")], "lr": config.image_tower_lr},
            {"params": [p for n, p in named if not n.startswith("vision_model.")], "lr": config.lr}]


def _autocast(clip: towers.Clip, *, inference: bool = False):
    """bf16 mixed precision on CUDA, and for inference on CPUs that compute bf16 natively (validation
    runs about 3x faster there; training steps stay fp32 on CPU: their backward pass gains nothing)."""
    fast = clip.device.type == "cuda" or inference and towers.native_bf16(clip.device)
    return torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=fast)


EVAL_BATCH = 32  # images per forward pass when validating: twice as fast on CPU as 256 at 224 px


@torch.inference_mode()
def evaluate(
    clip: towers.Clip, data: LabeledSet, idx: np.ndarray, captions: towers.Captions
) -> tuple[float, dict[str, np.ndarray]]:
    """(validation loss, per-attribute logits) over the given rows."""
    clip.model.eval()
    pixels = data.pixels[idx].to(clip.device)
    with _autocast(clip, inference=True):
        chunks = [towers.image_embeddings(clip, pixels[i : i + EVAL_BATCH]) for i in range(0, len(pixels), EVAL_BATCH)]
        logits = {k: v.float() for k, v in towers.attribute_logits(clip, torch.cat(chunks), captions).items()}
    labels = {k: v[idx].to(clip.device) for k, v in data.labels.items()}
    return float(batch_loss(logits, labels)), {k: v.cpu().numpy() for k, v in logits.items()}


AUDIT_SIZES = 3  # single image sizes the audit may use after training on crops: the model's and the two below
AUDIT_SIZE_STEP = 16  # it, this far apart (grocery photos trained at 160 px: 208 best, 192 to 224 within 0.02 loss)
SCALE_SPANS = (1, 2)  # or the model's size and this many steps of SCALE_STEP either side, embeddings averaged:
SCALE_STEP = 32  # grocery fine classes 0.79 at 160 to 288 px against 0.755 at 208 px, three models (docs/benchmarks.md)


def audit_views(tower: int) -> list[tuple[int, ...]]:
    """The candidate image sizes of ``choose_audit_view`` for a tower built for ``tower``-px photos:
    single sizes, then sets averaged."""
    singles = [(tower - AUDIT_SIZE_STEP * i,) for i in reversed(range(AUDIT_SIZES))]
    return singles + [tuple(tower + SCALE_STEP * k for k in range(-span, span + 1)) for span in SCALE_SPANS]


@torch.inference_mode()
def choose_audit_view(clip: towers.Clip, data: LabeledSet, rows: np.ndarray,
                      captions: towers.Captions) -> tuple[dict, np.ndarray]:
    """The image sizes the audit uses (``audit_views``: one, or several with their embeddings
    averaged): those with the lowest loss on ``rows`` (validation). A tower trained on small crops
    sees a product larger than it is in the whole photo, so a size between the two suits it best
    (FixRes), and the product seen at several sizes better still. Each photo's embedding is also
    averaged with its mirror image's: training flips photos at random, and on grocery photos from
    other sessions the mirror average read fine classes 1 to 3 points better wherever it was
    measured, also in models whose validation loss had preferred the plain view. Sets
    ``clip.meta``: from then on ``towers.image_embeddings`` resizes the photos it is given as they
    were resized here (decoded once, as training decoded them (``loading_spec``), then resized, as
    in training: decoding afresh at each size read grocery fine classes 4 points worse). Returns
    (what was chosen and why, the embeddings of ``rows`` in the chosen view: calibration's, without
    computing them again)."""
    clip.model.eval()
    labels = {k: v[rows].to(clip.device) for k, v in data.labels.items()}
    views = audit_views(towers.tower_size(clip))
    features = {}  # size -> the sum of the plain and the mirrored photos' features
    for size in sorted({size for sizes in views for size in sizes}):
        pixels = towers.resized(data.pixels[rows], size).to(clip.device)
        with _autocast(clip, inference=True):
            features[size] = sum(torch.cat([towers.image_features(clip.model, p[i : i + EVAL_BATCH]).float()
                                            for i in range(0, len(p), EVAL_BATCH)]) for p in (pixels, pixels.flip(-1)))
    # averaged as ``towers.image_embeddings`` averages them
    in_view = {sizes: F.normalize(sum(features[size] for size in sizes), dim=-1) for sizes in views}
    losses = {sizes: float(batch_loss(towers.attribute_logits(clip, emb, captions), labels))
              for sizes, emb in in_view.items()}
    sizes = min(losses, key=losses.get)
    chosen = {"image_sizes": list(sizes), "mirror_average": True}
    clip.meta |= chosen
    log.info("the audit sees photos at %s px, mirror averaged: validation loss %.3f (%s)", towers.sizes_text(sizes),
             losses[sizes], ", ".join(f"{towers.sizes_text(s)} px {v:.3f}" for s, v in losses.items()))
    return (chosen | {"val_losses": [{"sizes": list(s), "val_loss": v} for s, v in losses.items()]},
            in_view[sizes].cpu().numpy())


def spread_captions(clip: towers.Clip, captions: towers.Captions, *, steps: int, lr: float) -> float:
    """Push apart the caption embeddings of each attribute's values; returns the final max cosine.

    A text tower trained from scratch starts with near-identical embeddings for captions that
    share words ("lid", "no lid": cosine ~0.95), which stalls learning of those attributes.
    """
    text = [p for n, p in clip.model.named_parameters() if n.startswith(("text_model.", "text_projection."))]
    optimizer = torch.optim.AdamW(text, lr=lr)
    worst = 1.0
    for _ in range(steps):
        embeddings = captions.value_embeddings(clip).values()
        sims = [emb @ emb.T - 2 * torch.eye(len(emb), device=emb.device) for emb in embeddings]
        loss = torch.stack([torch.logsumexp(10 * s.flatten(), 0) for s in sims]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        worst = max(float(s.detach().max()) for s in sims)
    return worst


def _epoch_batches(labels, train_idx, config: TrainConfig, steps: int, rng: np.random.Generator):
    if config.balanced:
        return balanced_batches(labels, train_idx, batch_size=config.batch_size, steps=steps, rng=rng)
    order = rng.permutation(train_idx)
    return (order[s * config.batch_size : (s + 1) * config.batch_size] for s in range(steps))


def label_arrays(data: LabeledSet) -> dict[str, np.ndarray]:
    return {name: values.numpy() for name, values in data.labels.items()}


def default_splits(data: LabeledSet, config: TrainConfig) -> Splits:
    return split_indices(label_arrays(data), val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                         seed=config.seed, groups=data.groups, train_only=data.train_only)


def fit(clip: towers.Clip, data: LabeledSet, spec: Spec, config: TrainConfig, splits: Splits) -> dict:
    """Train in place; restores the lowest-validation-loss weights and returns training metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    clip.value_emb = None  # both towers are trained: captions give the value embeddings
    if config.frozen_blocks:
        freeze_below(clip, config.frozen_blocks)
    if config.train_size:  # until the audit's view is chosen, validation sees photos at the tower's own size
        clip.meta["image_sizes"] = [towers.tower_size(clip)]
    captions = towers.Captions(clip, spec)
    labels, (train_idx, val_idx, _) = label_arrays(data), splits
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    if config.spread_steps:
        cosine = spread_captions(clip, captions, steps=config.spread_steps, lr=config.lr)
        log.info("value captions spread apart: max cosine within an attribute %.2f", cosine)
    optimizer = torch.optim.AdamW(parameter_groups(clip, config), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(
        s, warmup=config.warmup_epochs * steps_per_epoch, total=config.epochs * steps_per_epoch))

    averaged = MovingAverage(clip.model, config.weight_average_decay) if config.weight_average_decay else None
    judged = replace(clip, model=averaged.module) if averaged is not None else clip  # what validation judges and keeps

    def train_epoch() -> float:
        clip.model.train()
        for rows in _epoch_batches(labels, train_idx, config, steps_per_epoch, rng):
            pixels = augmented(data.pixels[rows], config, generator) if config.augment else data.pixels[rows]
            with _autocast(clip):
                image_emb = towers.image_features(clip.model, pixels.to(clip.device))
                logits = towers.attribute_logits(clip, image_emb, captions)
            loss = batch_loss({k: v.float() for k, v in logits.items()},
                              {k: v[rows].to(clip.device) for k, v in data.labels.items()},
                              smoothing=config.label_smoothing)
            take_step(loss, optimizer, scheduler)
            if averaged is not None:
                averaged.update()
        return loss.item()

    started = time.monotonic()
    best, history, stopped_by = run_epochs(config, train_epoch=train_epoch, state=judged.model.state_dict,
                                           val_loss=lambda: evaluate(judged, data, val_idx, captions)[0],
                                           started=started)
    if best["state"] is None:
        raise ValueError("validation loss was never finite: check the labels and lower the learning rate")
    clip.model.load_state_dict(best["state"] if config.keep_best else judged.model.state_dict())
    clip.model.eval()
    view = {}
    if config.train_size:
        chosen, val_embeddings = choose_audit_view(clip, data, val_idx, captions)
        view = {"audit_view": chosen, "val_embeddings": val_embeddings}
    return {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "epochs_run": len(history),
            "stopped_by": stopped_by, "minutes": round((time.monotonic() - started) / 60, 2),
            "device": clip.device.type, "history": history} | view


class MovingAverage:
    """An exponential moving average of a module's weights and batch-norm statistics, in a copy of
    it (``module``), updated after each training step. Integer buffers (batch counts) are copied,
    not averaged, and those outside the state dict (position ids) keep their values. The decay
    warms up as (1 + step) / (10 + step) until it reaches ``decay``, so the average forgets the
    untrained start (at a fixed 0.998, 9% of the average after 1,184 steps was still the new
    text tower's random weights, and its validation loss lagged the weights' own)."""

    def __init__(self, source: torch.nn.Module, decay: float):
        self.module, self.decay, self.steps = copy.deepcopy(source), decay, 0
        # training changes the source's tensors in place: pair them with their averages once
        self._pairs = list(zip(self.module.state_dict().values(), source.state_dict().values(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, self.steps / (self.steps + 9))
        for average, current in self._pairs:
            if average.is_floating_point():
                average.lerp_(current, 1 - decay)
            else:
                average.copy_(current)


def freeze_below(clip: towers.Clip, blocks: int) -> None:
    """Keep the stem and the lowest ``blocks`` blocks of an EfficientNet image tower as they are, and
    compute them in bf16 while training where the device does so natively."""
    vision = clip.model.vision_model
    if not 0 < blocks <= len(getattr(vision, "blocks", ())):
        raise ValueError(f"frozen_blocks={blocks} needs an EfficientNet image tower with that many blocks")
    vision.freeze_below(blocks, dtype=torch.bfloat16 if towers.native_bf16(clip.device) else None)


def fit_prototypes(clip: towers.Clip, data: LabeledSet, spec: Spec, config: TrainConfig, splits: Splits) -> dict:
    """Fast mode: learn value embeddings on frozen image embeddings; sets ``clip.value_emb``."""
    started = time.monotonic()
    train_idx, val_idx, _ = splits
    torch.manual_seed(config.seed)
    clip.value_emb, result = prototypes.fit(
        towers.embed_images(clip, data.pixels.numpy()), label_arrays(data), towers.embed_captions(clip, spec),
        train_idx=train_idx, val_idx=val_idx, scale=towers.logit_scale(clip))
    log.info("prototypes: best validation loss %.3f at step %d", result["best_val_loss"], result["best_step"])
    return result | {"minutes": round((time.monotonic() - started) / 60, 2), "device": clip.device.type}


def labels_of(data: LabeledSet, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The value indices of the given rows, per attribute."""
    return {name: values[idx] for name, values in label_arrays(data).items()}


def train_on(clip: towers.Clip, data: LabeledSet, spec: Spec, *, config: TrainConfig, splits: Splits,
             plain: torch.Tensor | None = None) -> dict:
    """Train (``config.mode``) on the train rows, calibrate on the validation rows, measure on the
    test rows; returns the metadata that describes the result (see ``finetune``). ``plain``: the
    locked mode's kept activations of every row, where the caller has them."""
    if torch.cuda.is_available():
        clip.model.cuda()
    train_idx, val_idx, test_idx = splits
    for chosen_by_training in VIEW_KEYS:  # only training on crops sets them again
        clip.meta.pop(chosen_by_training, None)
    if config.mode == "locked":
        result, embed = locked.fit(clip, data, spec, config, splits, plain=plain)
    else:
        result = (fit_prototypes if config.mode == "prototype" else fit)(clip, data, spec, config, splits)
        embed = lambda rows: towers.embed_images(clip, data.pixels[rows].numpy())  # noqa: E731
    value_emb = clip.value_emb if clip.value_emb is not None else towers.embed_captions(clip, spec)
    if data.texts is not None and config.text_epochs:
        clip.value_emb = value_emb  # fixed: teaching the text tower the texts leaves the attributes' predictions as they are
        result["texts"] = fit_texts(clip, data, embed, config, splits)
    val_emb = result.pop("val_embeddings", None)  # the audit's view chosen on them, in validation's arithmetic
    val_emb = embed(val_idx) if val_emb is None else val_emb
    calibration, metrics = evaluation.calibrate(logits_from(val_emb, value_emb, clip), labels_of(data, val_idx),
                                                spec, label_noise=config.label_noise)
    if len(test_idx):
        temperatures = {name: fitted["temperature"] for name, fitted in calibration.items()}
        for name, figures in evaluation.held_out_metrics(logits_from(embed(test_idx), value_emb, clip),
                                                         labels_of(data, test_idx), spec,
                                                         temperatures=temperatures).items():
            metrics.setdefault(name, {}).update(figures)
    sizes = {"train_rows": len(train_idx), "val_rows": len(val_idx), "test_rows": len(test_idx),
             "train_only_rows": 0 if data.train_only is None else int(data.train_only.sum())}
    basis = {"split": "validation", "rows": len(val_idx), "bound": "one-sided 90% Wilson lower bound of accuracy",
             "target_precision": spec.target_precision, "expected_error_rate": spec.expected_error_rate,
             "label_noise": config.label_noise}
    outcome = {"training": result | sizes, "metrics": metrics, "calibration": calibration, "calibration_basis": basis}
    if data.texts is not None:
        outcome["text_calibration"] = calibrate_texts(clip, data, spec, val_idx, val_emb, seed=config.seed).to_dict()
    return outcome


def fit_texts(clip: towers.Clip, data: LabeledSet, embed, config: TrainConfig, splits: Splits) -> dict:
    """Teach the text tower the labeled rows' texts (``towers.Titles``) against their image
    embeddings (``embed(rows)``, fixed), keeping the epoch of lowest validation loss."""
    started = time.monotonic()
    titles = towers.Titles(clip, data.texts)
    train_rows, val_rows = (rows[titles.known[rows]] for rows in splits[:2])
    if not len(train_rows) or not len(val_rows):
        return {"epochs_run": 0, "why": "no texts in the train or validation split"}
    train_emb, val_emb = (torch.from_numpy(embed(rows)).to(clip.device) for rows in (train_rows, val_rows))
    text = [p for n, p in clip.model.named_parameters() if n.startswith(("text_model.", "text_projection."))]
    optimizer = torch.optim.AdamW(text, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)

    def val_loss() -> float:
        with torch.no_grad():
            return float(titles.loss(clip, val_emb, val_rows))

    def text_state() -> dict:
        return {k: v.detach().clone() for k, v in clip.model.state_dict().items()
                if k.startswith(("text_model.", "text_projection."))}

    best = {"epoch": 0, "val_loss": val_loss(), "state": text_state()}
    for epoch in range(1, config.text_epochs + 1):
        order = rng.permutation(len(train_rows))
        for start in range(0, len(order), config.batch_size):
            picks = order[start : start + config.batch_size]
            loss = titles.loss(clip, train_emb[picks], train_rows[picks])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (current := val_loss()) < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": current, "state": text_state()}
    clip.model.load_state_dict(best["state"], strict=False)
    log.info("texts: best validation loss %.3f at epoch %d of %d", best["val_loss"], best["epoch"], config.text_epochs)
    return {"rows": len(train_rows), "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
            "epochs_run": config.text_epochs, "minutes": round((time.monotonic() - started) / 60, 2)}


def calibrate_texts(clip: towers.Clip, data: LabeledSet, spec: Spec, rows: np.ndarray, image_emb: np.ndarray, *,
                    seed: int) -> text.TextCalibration:
    """Image and text agreement calibrated on the given (validation) rows that have a text."""
    known = data.texts[rows] != ""
    texts = data.texts[rows][known]
    calibration = text.calibrate(image_emb[known], towers.embed_texts(clip, texts.tolist()), texts,
                                 data.text_categories[rows][known], column=spec.text_column,
                                 target_precision=spec.target_precision, error_rate=spec.expected_error_rate,
                                 seed=seed)
    log.info("image and text agreement: threshold %s from %d validation rows and %d planted mismatches",
             calibration.threshold, calibration.rows, calibration.planted_rows)
    return calibration


def logits_from(image_emb: np.ndarray, value_emb: dict[str, np.ndarray], clip: towers.Clip) -> dict[str, np.ndarray]:
    """Per attribute, (n, k) scaled similarities of image embeddings to the value embeddings."""
    scale = towers.logit_scale(clip)
    return {name: predict.logits_for(image_emb, emb, scale=scale) for name, emb in value_emb.items()}


def loading_spec(clip: towers.Clip, config: TrainConfig) -> images.PixelSpec:
    """How labeled photos are decoded for training: as the model's processor says, or, where full
    mode trains on random crops, at the largest size an audit view may show them (``audit_views``),
    so that crops and views are resized down from the photo, not up from a smaller copy."""
    if not config.train_size:
        return clip.pixels
    side = max(max(view) for view in audit_views(towers.tower_size(clip)))
    return replace(clip.pixels, resize=side, crop=side)


def group_near_duplicates(clip: towers.Clip, data: LabeledSet, config: TrainConfig, plain: torch.Tensor | None) -> str:
    """Sets ``data.groups`` to near-duplicate groups of images, unless a group column gave them or
    the image tower is untrained (its features cannot tell); returns how rows were grouped."""
    if data.groups is not None:
        return f"group column {config.group_column!r}"
    if starting_point(clip) == "new":
        return "none: an untrained image tower cannot tell near-duplicates (name a group column)"
    if plain is not None:
        features = locked.pooled_features(clip, plain, config.unlock_blocks)
    else:
        tower = towers.tower_size(clip)
        with _autocast(clip, inference=True):  # bf16 where native: 3x faster, alike groups; resized chunk by chunk
            features = np.concatenate([towers.embed_images(clip, towers.resized(chunk, tower).numpy())
                                       for chunk in data.pixels.split(256)])
    data.groups = near_duplicate_groups(features, threshold=config.near_duplicate_cosine)
    log.info("%d labeled images form %d near-duplicate groups", len(features), data.groups.max() + 1)
    return f"near-duplicate images (cosine >= {config.near_duplicate_cosine} between image-tower features)"


def finetune(clip: towers.Clip, frame: pl.DataFrame, spec: Spec, *, access: ImageAccess, config: TrainConfig
             ) -> towers.Clip:
    """Train on labeled rows (``config.mode``) and record metrics and calibration in the model's metadata."""
    started = time.monotonic()
    decoding = loading_spec(clip, config)
    data = load_labeled(frame, spec, access=access, pixel_spec=decoding, group_column=config.group_column,
                        train_only_column=config.train_only_column)
    log.info("training on %d labeled products (%d without a readable image)", len(data.pixels), data.dropped)
    plain = locked.plain_activations(clip, data, config.unlock_blocks) if config.mode == "locked" else None
    grouping = group_near_duplicates(clip, data, config, plain)
    rows = default_splits(data, config)
    outcome = train_on(clip, data, spec, config=config, splits=rows, plain=plain)
    clip.pixels = decoding  # saved as the processor: the audit decodes photos as training did
    outcome["training"] |= {"labeled_rows": frame.height, "unreadable_images": data.dropped,
                            "total_minutes": round((time.monotonic() - started) / 60, 2)}  # images read, kept, trained
    outcome["calibration_basis"] |= {"grouping": grouping,
                                     "val_groups": len(np.unique(data.groups[rows[1]])) if data.groups is not None
                                     else len(rows[1])}
    clip.meta.update({"trained": True, "spec_fingerprint": spec.fingerprint(), "train_config": asdict(config),
                      "values": {a.name: list(a.values) for a in spec.attributes},
                      "fingerprint": f"unsaved-{uuid.uuid4().hex[:12]}"} | outcome)  # new weights; saving sets it
    return clip
