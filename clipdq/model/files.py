"""What a model folder says without loading its weights: where its files are (a local folder, an
``s3://`` prefix copied to a local cache, or a Hugging Face hub snapshot), its ``clipdq.json``,
how images become its input, and its learned value embeddings.

Kept free of torch and transformers, so a run that finds every embedding in its cache never
imports them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from clipdq.io import storage
from clipdq.io.images import PixelSpec
from clipdq.model.meta import ModelMeta

log = logging.getLogger(__name__)

META_FILE = "clipdq.json"
VALUE_EMB_FILE = "value_embeddings.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ModelFiles:
    source: str  # the URI or hub id as given
    folder: str  # a local folder holding the files
    meta: ModelMeta  # clipdq.json; only a fingerprint for plain checkpoints
    pixels: PixelSpec
    value_emb: dict[str, np.ndarray] | None  # learned value embeddings (fast mode), else None

    def fingerprint(self) -> str:
        assert self.meta.fingerprint is not None  # read_model_files gives plain checkpoints one
        return self.meta.fingerprint

    def view(self) -> tuple:
        """How the model's training chose to show it photos (``views.choose_audit_view``), where it
        chose: its embeddings depend on this as much as on the weights."""
        return self.meta.view()


def read_model_files(uri: str) -> ModelFiles:
    """The files of the model at a hub id, a local folder or an s3:// prefix."""
    folder = local_folder(uri)
    config = json.loads(Path(folder, "config.json").read_text()) if Path(folder, "config.json").exists() else {}
    meta = ModelMeta.from_json(_read_meta(Path(folder), uri, expected="clipdq_metadata" in config))
    if meta.fingerprint is None:  # a plain checkpoint: its files identify it (a hub snapshot's path has its commit)
        meta.fingerprint = f"files-{storage.listing_digest(folder)}"
    value_path = Path(folder, VALUE_EMB_FILE)
    value_emb = safetensors.numpy.load_file(str(value_path)) if value_path.exists() else None
    return ModelFiles(uri, folder, meta, pixel_spec(json.loads(Path(folder, PROCESSOR_FILE).read_text())), value_emb)


def pixel_spec(processor: dict) -> PixelSpec:
    """How a Hugging Face image processor's settings turn images into model input."""
    size = processor["size"] if isinstance(processor["size"], dict) else {"shortest_edge": processor["size"]}
    resize = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
    crop = processor.get("crop_size") or {"height": resize}
    crop = crop if isinstance(crop, dict) else {"height": crop}
    return PixelSpec(int(resize), int(crop["height"]), tuple(processor["image_mean"]), tuple(processor["image_std"]))


def _hub_snapshot(repo_id: str) -> str:
    """The local copy of a Hugging Face hub model (configs, tokenizer, safetensors weights and any
    clipdq files), fetched once into the hub cache; offline (``HF_HUB_OFFLINE=1``), the cached copy."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"no model at {repo_id!r}: not a local folder, and not a Hugging Face hub model "
            f"that can be fetched or is cached ({error})"
        ) from error


def local_folder(uri: str) -> str:
    """A local folder for an s3:// prefix or a hub id, else the folder as given.

    S3 downloads are cached by the digest of the prefix's listing, so a model re-saved under the same
    prefix is fetched again; a download lands in a temporary folder renamed into place when whole.
    """
    if not storage.is_s3(uri):
        return uri if Path(uri).is_dir() else _hub_snapshot(uri)
    cache = Path.home() / ".cache" / "clipdq" / "models" / storage.listing_digest(uri)
    if not cache.exists():
        log.info("downloading model %s to %s", uri, cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            storage.download_folder(uri, Path(tmp) / "model")
            (Path(tmp) / "model").rename(cache)
    return str(cache)


def _read_meta(folder: Path, uri: str, *, expected: bool) -> dict:
    """``clipdq.json`` of a model folder; {} for a plain checkpoint. A folder clipdq wrote
    (``expected``, from its config, or value embeddings beside it) must carry a whole one, and a
    trained model its calibration: audit defaults would flag wrongly."""
    path = folder / META_FILE
    if not path.exists():
        if expected or (folder / VALUE_EMB_FILE).exists():
            raise ValueError(f"model {uri} was saved by clipdq but has no {META_FILE}: it is incomplete")
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"model {uri}: {META_FILE} is not whole JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("trained") and not isinstance(meta.get("calibration"), dict):
        raise ValueError(f"model {uri}: {META_FILE} of a trained model lacks its calibration")
    return meta
