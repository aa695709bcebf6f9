"""Training settings and their defaults, defined once: ``TrainConfig`` (every setting, its default
and why), ``PRESETS`` (the defaults that change with the model's starting point and the mode) and
``BOUNDS`` (the allowed range of a setting, shared by the job options and the config).

Vocabulary: the *starting point* is what a model starts from (``StartingPoint``), the *mode* how
it trains (``Mode``). Kept free of heavy imports, so the CLI builds its help without torch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, get_args

from clipdq.core.splits import NEAR_DUPLICATE_COSINE

# full: train both towers on pixels; locked: the image tower frozen (its top ``unlock_blocks`` blocks
# excepted) and its activations kept, the text tower and projections train; prototype: learn value
# embeddings on frozen image embeddings
Mode = Literal["full", "locked", "prototype"]
# pretrained: a trained CLIP (a checkpoint without clipdq's metadata counts as one); pretrained image
# tower: a pretrained image tower with a new text tower; new: a CLIP initialised at random
StartingPoint = Literal["pretrained", "pretrained image tower", "new"]
MODES, STARTING_POINTS = get_args(Mode), get_args(StartingPoint)
STARTING_POINT_WORDS = {
    "pretrained": "a pretrained CLIP",
    "new": "a new CLIP",
    "pretrained image tower": "a pretrained image tower with a new text tower",
}


class Bound(TypedDict, total=False):
    """A setting's allowed range, in pydantic's terms (ge: >=, gt: >, lt: <)."""

    ge: float
    gt: float
    lt: float


# the allowed range of each bounded setting
BOUNDS: dict[str, Bound] = {
    "epochs": {"ge": 1},
    "max_minutes": {"gt": 0},
    "val_fraction": {"gt": 0, "lt": 1},
    "test_fraction": {"ge": 0, "lt": 1},
    "label_noise": {"ge": 0, "lt": 0.5},
    "unlock_blocks": {"ge": 0},
    "frozen_blocks": {"ge": 0},
    "views": {"ge": 1},
}
_COMPARISONS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "lt": (operator.lt, "<"),
}


@dataclass
class TrainConfig:
    """How a model is fine-tuned: every setting, with its default for a new CLIP (see PRESETS)."""

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
    mode: Mode = "full"  # see Mode
    label_noise: float = 0.0  # share of wrong labels: 0 for curated ones, the error rate for a catalog's own
    group_column: str | None = None  # rows sharing its value (product family, photo session) share a split
    train_only_column: str | None = None  # rows where this boolean column is true only train (never calibrate)
    instance_column: str | None = None  # full mode: rows sharing its value show one product, pulled together
    unlock_blocks: int = 0  # locked mode: top blocks of an EfficientNet image tower that train too
    tower_lr: float | None = None  # the image tower's learning rate (pretrained: gentler than a new text tower's)
    train_size: int | None = None  # full mode: train on random crops of this side in px (FixRes: smaller than the
    # audit's size trains faster and suits the audit's whole photos); None: shifted and flipped photos at the model's
    views: int = 1  # locked mode: kept views per training image, the first plain, the others augmented
    label_smoothing: float = 0.0  # full mode: the training loss's share of probability spread over the other values
    weight_average_decay: float = 0.0  # full mode: validate and keep an exponential moving average of the weights
    # with this decay per step, reached after a warm-up (0: the weights themselves)
    frozen_blocks: int = 0  # full mode: the stem and this many lowest blocks of an EfficientNet tower stay as they are
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE  # images this alike share a split (no group column)
    text_epochs: int = 20  # then, epochs teaching the text tower the labeled texts (the spec's text column); 0: off
    seed: int = 0

    def __post_init__(self) -> None:
        for name in BOUNDS:
            check_bounds(name, getattr(self, name))
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction and test_fraction must sum to less than 1, not {self.val_fraction} "
                f"and {self.test_fraction}"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.unlock_blocks and self.mode != "locked":
            raise ValueError("unlock_blocks applies to locked mode only")
        if self.frozen_blocks and self.mode != "full":
            raise ValueError("frozen_blocks applies to full mode only")
        if self.instance_column and self.mode != "full":
            raise ValueError("instance_column applies to full mode only")

    @property
    def image_tower_lr(self) -> float:
        """The learning rate of what trains in the image tower: ``tower_lr``, else ``lr``."""
        return self.lr if self.tower_lr is None else self.tower_lr


def check_bounds(name: str, value) -> None:
    """Raise ValueError where ``value`` (not None) is outside ``BOUNDS[name]``."""
    for kind, bound in BOUNDS[name].items():
        holds, sign = _COMPARISONS[kind]
        if value is not None and not holds(value, bound):
            raise ValueError(f"{name} must be {sign} {bound}, not {value}")


# a pretrained CLIP: gentle updates that keep its captions where they are
_GENTLE = {"lr": 1e-5, "spread_steps": 0}
# (starting point, mode) -> the defaults that differ from TrainConfig's own (see ``default_text``)
PRESETS: dict[tuple[StartingPoint, Mode], dict] = {
    ("pretrained", "full"): _GENTLE,
    ("pretrained", "locked"): _GENTLE,
    ("pretrained", "prototype"): _GENTLE,
    # a pretrained image tower with a new text tower trains both on pixels by default (grocery fine classes
    # 0.80 on other sessions' photos against locked mode's 0.70, in 12 minutes on 2 cores against 5 to 8;
    # docs/benchmarks.md): the tower above its lowest five blocks (1.7x faster than all of it, as accurate) at
    # under a third of the new text tower's rate, on 160-px crops, 17 epochs (the frozen blocks compute in bf16);
    # labels smoothed and the weights averaged (grocery coarse / fine classes 0.894 / 0.803 on other sessions'
    # photos, three seeds); the whole tower gains most from photos, so a tenth is held out for validation and
    # calibration and none for a test split (docs/benchmarks.md)
    ("pretrained image tower", "full"): {
        "epochs": 17,
        "patience": 4,
        "warmup_epochs": 1,
        "train_size": 160,
        "tower_lr": 3e-4,
        "frozen_blocks": 5,
        "label_smoothing": 0.1,
        "weight_average_decay": 0.998,
        "val_fraction": 0.1,
        "test_fraction": 0.0,
    },
    # 4 views: grocery fine-class accuracy 0.764 against 0.73 with 2 (docs/benchmarks.md)
    ("pretrained image tower", "locked"): {"epochs": 40, "patience": 8, "batch_size": 64, "views": 4, "tower_lr": 1e-4},
    ("pretrained image tower", "prototype"): {},
    # a new CLIP: learn fast, first spread the captions apart (TrainConfig's own defaults)
    ("new", "full"): {},
    ("new", "locked"): {},
    ("new", "prototype"): {},
}


def preset(start: StartingPoint, **given) -> TrainConfig:
    """The config for a model at ``start``: PRESETS for it and the mode given (else TrainConfig's),
    overridden by the settings given."""
    mode = given.get("mode", TrainConfig.mode)
    return TrainConfig(**PRESETS.get((start, mode), {}) | given)


def default_text(name: str) -> str:
    """A setting's default in words, from TrainConfig and PRESETS: "17 in full mode and 40 in locked
    mode from a pretrained image tower with a new text tower; else 100"."""
    plain = {f.name: f.default for f in fields(TrainConfig)}[name]
    cases = []
    for start in STARTING_POINTS:
        by_mode = {mode: PRESETS[start, mode].get(name, plain) for mode in MODES}
        differing = {mode: value for mode, value in by_mode.items() if value != plain}
        if len(set(by_mode.values())) == 1 and differing:
            cases.append(f"{_figure(by_mode[MODES[0]])} from {STARTING_POINT_WORDS[start]}")
        elif differing:
            modes = " and ".join(f"{_figure(value)} in {mode} mode" for mode, value in differing.items())
            cases.append(f"{modes} from {STARTING_POINT_WORDS[start]}")
    return "; ".join([*cases, f"else {_figure(plain)}"]) if cases else _figure(plain)


def _figure(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
