"""CLIP models: made (``init_model``), saved and loaded, and embedding images, texts and captions.

A model folder is Hugging Face ``save_pretrained`` output (safetensors, tokenizer, image
processor) plus ``clipdq.json`` (``meta.ModelMeta``), which carries what an audit needs beyond
the weights (spec fingerprint, training metrics, calibration), and for a fine-tuned model its
card (``card.model_card``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import safetensors.numpy
import torch
import transformers

transformers.logging.set_verbosity_error()  # load reports and backend notices are noise in batch runs
transformers.logging.disable_progress_bar()
from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

from clipdq.core.options import ARCHS, Arch, Backend, check_backend  # noqa: E402
from clipdq.core.spec import Spec  # noqa: E402
from clipdq.io import storage  # noqa: E402
from clipdq.io.images import PixelSpec  # noqa: E402
from clipdq.model import efficientnet  # noqa: E402
from clipdq.model.card import model_card  # noqa: E402
from clipdq.model.files import META_FILE, VALUE_EMB_FILE, ModelFiles, read_model_files  # noqa: E402
from clipdq.model.meta import ModelMeta  # noqa: E402
from clipdq.model.tokenizer import MAX_TOKENS, build_tokenizer  # noqa: E402

log = logging.getLogger(__name__)

DualEncoder = CLIPModel | VisionTextDualEncoderModel  # both: vision_model, visual_projection, text_model, logit_scale
RGB = tuple[float, float, float]  # a mean or std per colour channel


@dataclass
class Clip:
    model: DualEncoder
    tokenizer: PreTrainedTokenizerBase  # a CLIPTokenizer for the models init_model makes
    pixels: PixelSpec
    source: str
    meta: ModelMeta = field(default_factory=ModelMeta)  # clipdq.json; only a fingerprint for plain checkpoints
    value_emb: dict[str, np.ndarray] | None = None  # learned value embeddings (fast mode), else captions
    backend: str = "fp32"  # how the image tower computes: see BACKENDS

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """Identifies the weights (for caches and reports): the saved metadata's hash or the source."""
        return self.meta.fingerprint or hashlib.sha256(self.source.encode()).hexdigest()[:16]


SMALL_TEXT: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
}  # enough to tell a spec's value captions apart; trains in seconds


def _config(arch: Arch, vocab_size: int, bos: int, eos: int) -> CLIPConfig | VisionTextDualEncoderConfig:
    text: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    if arch == "tiny":  # trains from scratch on CPU in minutes; 32 px in 16 patches learns shapes fast
        vision = {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        }
        return CLIPConfig(text_config=text | SMALL_TEXT, vision_config=vision, projection_dim=128)
    if arch == "vit-b-32":  # CLIPConfig's defaults are ViT-B/32
        return CLIPConfig(text_config=text | {"max_position_embeddings": 77}, vision_config={}, projection_dim=512)
    if arch in efficientnet.VARIANTS:  # LiT: a pretrained image tower, a new text tower trained to meet it
        return VisionTextDualEncoderConfig.from_vision_text_configs(
            efficientnet.config_for(arch), CLIPTextConfig(**text, **SMALL_TEXT), projection_dim=256
        )
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def init_model(spec: Spec, arch: Arch = "tiny", *, seed: int = 0) -> Clip:
    """A CLIP-style model of the given shape with a tokenizer for the spec's captions: random
    weights, except an EfficientNet image tower, which keeps its ImageNet weights."""
    captions = [c for a in spec.attributes for v in a.values for c in a.captions(v)]
    tokenizer = build_tokenizer(captions)
    config = _config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    meta = ModelMeta(arch=arch, spec_fingerprint=spec.fingerprint(), trained=False)
    model: DualEncoder
    if isinstance(config, CLIPConfig):
        model, mean, std = CLIPModel(config), tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    else:
        model = VisionTextDualEncoderModel(config)
        model.vision_model.load_state_dict(efficientnet.pretrained_state_dict(arch)[0])
        mean, std = efficientnet.PIXEL_MEAN, efficientnet.PIXEL_STD
        meta.pretrained_image_tower = f"{arch} (ImageNet)"
    size = _image_size(config)  # transformers lists OpenAI's mean and std as list[float]: three each
    pixels = PixelSpec(size, size, cast(RGB, mean), cast(RGB, std))
    return Clip(model.eval(), tokenizer, pixels, source=f"init:{arch}", meta=meta)


def _image_size(config: CLIPConfig | VisionTextDualEncoderConfig) -> int:
    """The side of the photos the image tower of ``config`` is built for."""
    return cast(PreTrainedConfig, config.vision_config).image_size  # both configs turn a dict given into a config


def save_model(clip: Clip, folder: str) -> str:
    """Save in Hugging Face format plus clipdq.json, to a local folder or an s3:// prefix."""
    if storage.is_s3(folder):
        with tempfile.TemporaryDirectory() as tmp:
            save_model(clip, tmp)
            storage.upload_folder(Path(tmp), folder, last=META_FILE)
        return folder
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        path = Path(tmp) / "model"
        clip.model.config.clipdq_metadata = META_FILE  # says a whole clipdq.json belongs beside the weights
        clip.model.save_pretrained(path, safe_serialization=True)
        clip.tokenizer.save_pretrained(path)
        CLIPImageProcessor(
            size={"shortest_edge": clip.pixels.resize},
            crop_size={"height": clip.pixels.crop, "width": clip.pixels.crop},
            image_mean=list(clip.pixels.mean),
            image_std=list(clip.pixels.std),
        ).save_pretrained(path)
        if clip.value_emb is not None:
            safetensors.numpy.save_file(clip.value_emb, str(path / VALUE_EMB_FILE))
        weights = [path / "model.safetensors", path / VALUE_EMB_FILE]
        clip.meta.fingerprint = hashlib.sha256(b"".join(p.read_bytes() for p in weights if p.exists())).hexdigest()[:16]
        (path / META_FILE).write_text(json.dumps(clip.meta.to_json(), indent=2))
        if clip.meta.metrics:
            (path / "README.md").write_text(model_card(clip.meta))
        if target.exists():  # swap a previous model out only once the new one is whole
            target.rename(Path(tmp) / "previous")
        path.rename(target)
    return folder


def load_model(uri: str, *, device: str | None = None, files: ModelFiles | None = None) -> Clip:
    """Load a CLIP from a Hugging Face hub id, a local folder or an s3:// prefix (whose files,
    ``read_model_files(uri)``, may already be at hand)."""
    files = files or read_model_files(uri)
    model = AutoModel.from_pretrained(files.folder, use_safetensors=True).eval()
    if not isinstance(model, DualEncoder):
        raise ValueError(f"{uri} holds a {type(model).__name__}, not a CLIP-style dual encoder")
    tokenizer = AutoTokenizer.from_pretrained(files.folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # transformers wraps Module.to with functools.wraps, which mypy does not bind to the model
    model = model.to(device)  # type: ignore[arg-type]
    return Clip(model, tokenizer, files.pixels, source=uri, meta=files.meta, value_emb=files.value_emb)


def image_features(model: DualEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, shape (n, d); differentiable."""
    out = model.get_image_features(pixel_values=pixel_values)
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


def image_embeddings(clip: Clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """``image_features`` as the audit computes them, in the view the model's training chose by
    validation loss (``views.choose_audit_view``): the photos resized to each of its view sizes,
    each also mirrored where ``mirror_average``, and the embeddings averaged."""
    mirrored = clip.meta.mirror_average
    total: torch.Tensor | int = 0
    for size in clip.meta.view_sizes():
        shown = resized(pixel_values, size) if size else pixel_values
        total = total + image_features(clip.model, shown)
        if mirrored:
            total = total + image_features(clip.model, shown.flip(-1))
    assert isinstance(total, torch.Tensor)  # view_sizes is never empty
    return torch.nn.functional.normalize(total, dim=-1)


def tower_size(clip: Clip) -> int:
    """The side of the photos the image tower was built for (its config's ``image_size``)."""
    return _image_size(clip.model.config)


def resized(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, size, size) pixels, bilinear and antialiased where they shrink; the same tensor where
    the size is right."""
    if pixels.shape[-1] == size:
        return pixels
    return torch.cat(
        [
            torch.nn.functional.interpolate(
                pixels[i : i + 256], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            for i in range(0, len(pixels), 256)
        ]
    )


def tokenize(clip: Clip, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(clip.device))


def text_features(clip: Clip, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised text embeddings of tokenized texts, shape (n, d); differentiable."""
    out = clip.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


class Captions:
    """Every caption of every attribute value, tokenized once; embeds them all in one pass."""

    def __init__(self, clip: Clip, spec: Spec):
        texts: list[str] = []
        self.owners: dict[str, torch.Tensor] = {}  # owners[attribute] @ caption embeddings = mean per value, (k, d)
        for attribute in spec.attributes:
            start = len(texts)
            texts.extend(c for v in attribute.values for c in attribute.captions(v))
            per_value = len(attribute.prompts)
            owner = torch.zeros(len(attribute.values), len(texts))
            for k in range(len(attribute.values)):
                owner[k, start + k * per_value : start + (k + 1) * per_value] = 1.0 / per_value
            self.owners[attribute.name] = owner
        self.tokens = tokenize(clip, texts)
        self.owners = {
            k: torch.nn.functional.pad(v, (0, len(texts) - v.shape[1])).to(clip.device) for k, v in self.owners.items()
        }

    def value_embeddings(self, clip: Clip) -> dict[str, torch.Tensor]:
        """Per attribute, (k, d): the normalised mean embedding of each value's captions."""
        features = text_features(clip, self.tokens)
        return {name: torch.nn.functional.normalize(owner @ features, dim=-1) for name, owner in self.owners.items()}


def logit_scale(clip: Clip) -> float:
    return float(clip.model.logit_scale.detach().exp().clamp(max=100.0))


def on_backend(clip: Clip, backend: Backend) -> Clip:
    """``clip`` with its image tower on another backend; the text tower stays fp32.

    Predictions may differ from fp32's: measure how often (``predict.agreement``) before relying on one.
    """
    check_backend(backend)
    if backend == "int8":
        if clip.device.type != "cpu":
            raise ValueError("the int8 backend runs on CPU; use bf16 on a GPU")
        quantized = copy.deepcopy(clip.model)
        tower = torch.nn.ModuleDict(
            {"vision_model": quantized.vision_model, "visual_projection": quantized.visual_projection}
        )
        with warnings.catch_warnings():  # deprecated in favour of torchao, still working in the pinned torch
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            tower = torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8)
        for name, module in tower.items():
            setattr(quantized, name, module)
        return dataclasses.replace(clip, model=quantized, backend=backend)
    return dataclasses.replace(clip, backend=backend)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA; CPUs with AMX or AVX-512 BF16), where
    bf16 autocast runs an EfficientNet-Lite tower about 3x faster than fp32 on 2 CPU cores."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def _image_arithmetic(clip: Clip):
    if clip.backend == "bf16":
        return torch.autocast(clip.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _no_embeddings(clip: Clip) -> np.ndarray:
    """(0, d) float32: the embeddings of no images or texts."""
    dim = clip.model.config.projection_dim
    assert dim is not None  # both towers project to it
    return np.zeros((0, dim), np.float32)


@torch.inference_mode()
def embed_images(clip: Clip, pixel_values: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Image embeddings for an (n, 3, h, w) float32 array, as (n, d) float32."""
    with _image_arithmetic(clip):
        chunks = [
            image_embeddings(clip, torch.from_numpy(pixel_values[i : i + batch_size]).to(clip.device)).float().cpu()
            for i in range(0, len(pixel_values), batch_size)
        ]
    return torch.cat(chunks).numpy() if chunks else _no_embeddings(clip)


@torch.inference_mode()
def embed_texts(clip: Clip, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """(n, d) float32 embeddings of free texts (titles, descriptions), truncated to the text tower's length."""
    chunks = [
        text_features(clip, tokenize(clip, texts[i : i + batch_size])).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks).numpy() if chunks else _no_embeddings(clip)


@torch.inference_mode()
def embed_captions(clip: Clip, spec: Spec) -> dict[str, np.ndarray]:
    """Per attribute, one embedding per value: the normalised mean over its caption templates."""
    return {k: v.float().cpu().numpy() for k, v in Captions(clip, spec).value_embeddings(clip).items()}
