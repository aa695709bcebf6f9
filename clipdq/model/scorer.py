"""A model ready to score a spec's attributes, loaded only as far as a run needs it.

The model's files give its fingerprint, preprocessing and calibration; its text side (each
value's embedding and the logit scale) is kept beside the embedding cache once computed; the
image tower loads (with torch and transformers) at the first image that must be embedded. An
unchanged nightly rerun, whose embeddings are all cached, never loads the model at all.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import safetensors.numpy

from clipdq.core import predict, tree
from clipdq.core.options import Backend
from clipdq.core.predict import Calibration
from clipdq.core.spec import Spec
from clipdq.core.text import TextCalibration
from clipdq.io import storage
from clipdq.io.images import PixelSpec
from clipdq.model.files import ModelFiles, read_model_files

EMBED_PIXELS = 16 * 224 * 224  # pixels per image-tower call: 64 photos at 224 px at once raised a first
# audit's peak RSS by 0.67 GB; small images go many to a call, as the tower's per-call cost dominates them

if TYPE_CHECKING:
    from clipdq.model.towers import Clip

log = logging.getLogger(__name__)

SCALE_KEY = "__logit_scale__"  # beside the value embeddings in a kept text side


def trained_on(model: Clip | ModelFiles, spec: Spec) -> bool:
    """Whether the model was fine-tuned and calibrated on this spec: its value predictions mean something."""
    return bool(model.meta.calibration) and model.meta.spec_fingerprint == spec.fingerprint()


def calibration_for(model: Clip | ModelFiles, spec: Spec) -> dict[str, Calibration]:
    """The model's fitted calibration where it was trained on this spec, else defaults from the spec."""
    fitted = (model.meta.calibration or {}) if trained_on(model, spec) else {}  # trained_on: it has one
    if model.meta.calibration and not fitted:
        log.warning("model %s was trained on another spec: its calibration is ignored", model.source)
    rates = tree.conflict_error_rates(spec)
    return {
        name: fitted[name] if name in fitted else predict.default_calibration(spec.target_precision, rates[name])
        for name in spec.names
    }


def text_calibration_for(model: Clip | ModelFiles, spec: Spec) -> TextCalibration | None:
    """The model's image and text calibration where it was fitted on the spec's text column."""
    fitted = model.meta.text_calibration
    if spec.text_column is None or fitted is None:
        return None
    if fitted.column != spec.text_column:
        log.warning(
            "model %s was calibrated on texts of %r, not %r: agreement is not judged",
            model.source,
            fitted.column,
            spec.text_column,
        )
        return None
    return fitted


def value_embeddings_for(clip: Clip, spec: Spec) -> dict[str, np.ndarray]:
    """The model's learned value embeddings where it was trained on this spec, else its captions'."""
    from clipdq.model import towers

    if clip.value_emb is not None and clip.meta.spec_fingerprint == spec.fingerprint():
        return clip.value_emb
    return towers.embed_captions(clip, spec)


@dataclass
class Scorer:
    spec: Spec
    pixels: PixelSpec
    value_emb: dict[str, np.ndarray]  # attribute -> (k, d) one embedding per value
    scale: float  # the model's logit scale
    calibration: dict[str, Calibration]
    load: Callable[[], Clip]  # the model, on its backend
    text_calibration: TextCalibration | None = None  # image and text agreement (the spec's text column)
    trained: bool = False  # fine-tuned and calibrated on this spec (trained_on)

    @functools.cached_property
    def clip(self) -> Clip:
        return self.load()

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """(n, d) image embeddings, ``EMBED_PIXELS`` pixels per call to the image tower."""
        if not len(pixel_values):
            return np.zeros((0, next(iter(self.value_emb.values())).shape[1]), np.float32)
        from clipdq.model import towers

        per_call = max(1, EMBED_PIXELS // (pixel_values.shape[-1] * pixel_values.shape[-2]))
        return towers.embed_images(self.clip, pixel_values, batch_size=per_call)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, d) text embeddings (titles, descriptions)."""
        from clipdq.model import towers

        return towers.embed_texts(self.clip, texts)


def of_clip(clip: Clip, spec: Spec) -> Scorer:
    """A scorer of a model already loaded."""
    from clipdq.model import towers

    return Scorer(
        spec,
        clip.pixels,
        value_embeddings_for(clip, spec),
        towers.logit_scale(clip),
        calibration_for(clip, spec),
        load=lambda: clip,
        text_calibration=text_calibration_for(clip, spec),
        trained=trained_on(clip, spec),
    )


def of_files(uri: str, spec: Spec, *, backend: Backend = "fp32", text_folder: str | None = None) -> Scorer:
    """A scorer of the model at ``uri`` that loads it only when it must: to embed an image, or to
    embed the spec's captions where ``text_folder`` does not hold them from an earlier run."""
    files = read_model_files(uri)
    load = functools.partial(load_model, uri, backend)
    kept = storage.join(text_folder, f"text-{spec.fingerprint()}.safetensors") if text_folder else None
    if kept and storage.exists(kept):
        text = safetensors.numpy.load(storage.read_bytes(kept))
        scale = float(text.pop(SCALE_KEY)[0])
    else:
        from clipdq.model import towers

        clip = load()
        text, scale = value_embeddings_for(clip, spec), towers.logit_scale(clip)
        if kept:
            storage.write_bytes(kept, safetensors.numpy.save(text | {SCALE_KEY: np.array([scale], np.float32)}))
    return Scorer(
        spec,
        files.pixels,
        text,
        scale,
        calibration_for(files, spec),
        load=load,
        text_calibration=text_calibration_for(files, spec),
        trained=trained_on(files, spec),
    )


def load_model(uri: str, backend: Backend = "fp32") -> Clip:
    """The model at ``uri`` on ``backend``, loaded once per process while its files stay the same."""
    return _load(uri, storage.listing_digest(uri) if storage.is_s3(uri) or storage.exists(uri) else uri, backend)


@functools.lru_cache(maxsize=2)
def _load(uri: str, listing: str, backend: Backend) -> Clip:
    from clipdq.model import towers

    clip = _load(uri, listing, "fp32") if backend != "fp32" else towers.load_model(uri)
    return towers.on_backend(clip, backend) if backend != "fp32" else clip
