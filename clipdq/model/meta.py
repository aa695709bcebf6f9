"""A model's metadata in memory (``ModelMeta``): typed fields, turned into ``clipdq.json`` only when a
model folder is saved (``to_json``) and read back from it (``from_json``), the file's format kept.

Vocabulary: a *plain checkpoint* is a CLIP without clipdq.json (made elsewhere); its metadata is
only a fingerprint. The *view* is how training chose to show the model photos (sizes, mirroring):
the audit's embeddings depend on it as much as on the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from clipdq.core.predict import Calibration
from clipdq.core.presets import StartingPoint
from clipdq.core.text import TextCalibration

VIEW_KEYS = ("image_size", "image_sizes", "mirror_average")  # the fields that make the view


@dataclass
class ModelMeta:
    """What clipdq.json says of a model; a field that is None is not in the file."""

    arch: str | None = None  # what init_model built (options.Arch)
    spec_fingerprint: str | None = None  # the spec the model was built or fine-tuned for
    trained: bool | None = None  # fine-tuned by clipdq; False: as init_model made it; None: a plain checkpoint
    pretrained_image_tower: str | None = None  # e.g. "efficientnet-lite0 (ImageNet)", beside a new text tower
    fingerprint: str | None = None  # identifies the weights: the saved files' hash ("unsaved-..." until saved)
    image_size: int | None = None  # the one size photos are resized to, in models trained before image_sizes
    image_sizes: list[int] | None = None  # sizes in px photos are resized to, their embeddings averaged
    mirror_average: bool | None = None  # each photo's embedding is averaged with its mirror image's
    train_config: dict | None = None  # the TrainConfig it was trained with, as a record
    values: dict[str, list[str]] | None = None  # attribute -> its values when trained
    training: dict | None = None  # how training went: epochs, losses, split sizes, minutes
    metrics: dict[str, dict] | None = None  # attribute -> validation and test figures
    calibration: dict[str, Calibration] | None = None  # attribute -> its fitted calibration
    calibration_basis: dict | None = None  # what the calibration rests on: split, rows, grouping, targets
    text_calibration: TextCalibration | None = None  # image and text agreement, where the spec has a text column
    other: dict = field(default_factory=dict)  # keys of clipdq.json this version does not know, kept as read

    @property
    def starting_point(self) -> StartingPoint:
        """Which of ``presets.PRESETS`` describes the model: plain checkpoints count as pretrained."""
        if self.trained is None or self.trained:
            return "pretrained"
        return "pretrained image tower" if self.pretrained_image_tower else "new"

    def view_sizes(self) -> Sequence[int | None]:
        """The sizes the audit resizes photos to; [None]: as they are loaded."""
        return self.image_sizes or [self.image_size]

    def view(self) -> tuple:
        """(key, value) of each view field set: what embeddings depend on besides the weights."""
        return tuple((key, getattr(self, key)) for key in VIEW_KEYS if getattr(self, key) is not None)

    def clear_view(self) -> None:
        for key in VIEW_KEYS:
            setattr(self, key, None)

    def to_json(self) -> dict:
        """clipdq.json's contents."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        if self.calibration is not None:
            raw["calibration"] = {name: fitted.to_dict() for name, fitted in self.calibration.items()}
        if self.text_calibration is not None:
            raw["text_calibration"] = self.text_calibration.to_dict()
        return {key: value for key, value in raw.items() if value is not None} | self.other

    @classmethod
    def from_json(cls, raw: dict) -> ModelMeta:
        known = {f.name for f in fields(cls)} - {"other"}
        given = {key: value for key, value in raw.items() if key in known}
        calibration, text_calibration = given.pop("calibration", None), given.pop("text_calibration", None)
        return cls(
            **given,
            calibration=None if calibration is None else {k: Calibration(**v) for k, v in calibration.items()},
            text_calibration=None if text_calibration is None else TextCalibration.from_dict(text_calibration),
            other={key: value for key, value in raw.items() if key not in known},
        )
