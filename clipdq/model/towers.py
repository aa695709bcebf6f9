"""CLIP models: the only module that imports transformers.

A model folder is Hugging Face ``save_pretrained`` output (safetensors, tokenizer, image
processor) plus ``clipdq.json``, which carries what an audit needs beyond the weights
(spec fingerprint, training metrics, calibration).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

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
    CLIPTokenizer,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

from clipdq.core.options import ARCHS, BACKENDS, Arch, Backend, check_backend  # noqa: E402, F401 - BACKENDS re-exported
from clipdq.core.spec import Spec  # noqa: E402
from clipdq.io import storage
from clipdq.io.images import PixelSpec  # noqa: E402
from clipdq.model import efficientnet  # noqa: E402
from clipdq.model.files import META_FILE, VALUE_EMB_FILE, ModelFiles, read_model_files  # noqa: E402

log = logging.getLogger(__name__)

DualEncoder = CLIPModel | VisionTextDualEncoderModel  # both: vision_model, visual_projection, text_model, logit_scale
_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_")  # CLIP's pre-tokenizer, in stdlib regex terms


@dataclass
class Clip:
    model: DualEncoder
    tokenizer: CLIPTokenizer
    pixels: PixelSpec
    source: str
    meta: dict = field(default_factory=dict)  # contents of clipdq.json; only a fingerprint for plain checkpoints
    value_emb: dict[str, np.ndarray] | None = None  # learned value embeddings (fast mode), else captions
    backend: str = "fp32"  # how the image tower computes: see BACKENDS

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """Identifies the weights (for caches and reports): the saved metadata's hash or the source."""
        return self.meta.get("fingerprint") or hashlib.sha256(self.source.encode()).hexdigest()[:16]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer runs it: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols


def build_tokenizer(texts: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each word of ``texts`` as one token.

    Any other text still tokenizes, byte by byte, so the tokenizer is complete.
    """
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet.values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w for text in texts for w in _WORD.findall(text.lower())}):
        symbols = [alphabet[b] for b in word.encode()]
        symbols[-1] += "</w>"
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:  # a new merge ranks last, so it never changes earlier words
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_merges(pieces, ranks)
    merges = sorted(ranks, key=ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)


SMALL_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 32}  # enough to tell a spec's value captions apart; trains in seconds


def _config(arch: Arch, vocab_size: int, bos: int, eos: int) -> CLIPConfig | VisionTextDualEncoderConfig:
    text = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    if arch == "tiny":  # trains from scratch on CPU in minutes; 32 px in 16 patches learns shapes fast
        vision = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
        return CLIPConfig(text_config=text | SMALL_TEXT, vision_config=vision, projection_dim=128)
    if arch == "vit-b-32":  # CLIPConfig's defaults are ViT-B/32
        return CLIPConfig(text_config=text | {"max_position_embeddings": 77}, vision_config={}, projection_dim=512)
    if arch in efficientnet.VARIANTS:  # LiT: a pretrained image tower, a new text tower trained to meet it
        return VisionTextDualEncoderConfig.from_vision_text_configs(
            efficientnet.config_for(arch), CLIPTextConfig(**text, **SMALL_TEXT), projection_dim=256)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def init_model(spec: Spec, arch: Arch = "tiny", *, seed: int = 0) -> Clip:
    """A CLIP-style model of the given shape with a tokenizer for the spec's captions: random
    weights, except an EfficientNet image tower, which keeps its ImageNet weights."""
    captions = [c for a in spec.attributes for v in a.values for c in a.captions(v)]
    tokenizer = build_tokenizer(captions)
    config = _config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    meta = {"arch": arch, "spec_fingerprint": spec.fingerprint(), "trained": False}
    if isinstance(config, CLIPConfig):
        model, pixels = CLIPModel(config), (config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    else:
        model = VisionTextDualEncoderModel(config)
        model.vision_model.load_state_dict(efficientnet.pretrained_state_dict(arch)[0])
        pixels = (config.vision_config.image_size, efficientnet.PIXEL_MEAN, efficientnet.PIXEL_STD)
        meta["pretrained_image_tower"] = f"{arch} (ImageNet)"
    size, mean, std = pixels
    return Clip(model.eval(), tokenizer, PixelSpec(size, size, tuple(mean), tuple(std)), source=f"init:{arch}",
                meta=meta)


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
        clip.meta["fingerprint"] = hashlib.sha256(b"".join(p.read_bytes() for p in weights if p.exists())).hexdigest()[:16]
        (path / META_FILE).write_text(json.dumps(clip.meta, indent=2))
        if clip.meta.get("metrics"):
            (path / "README.md").write_text(model_card(clip.meta))
        if target.exists():  # swap a previous model out only once the new one is whole
            target.rename(Path(tmp) / "previous")
        path.rename(target)
    return folder


def _training_line(meta: dict) -> str:
    """How the model was trained, in words: mode, what trained, why it stopped."""
    config, training = meta.get("train_config", {}), meta.get("training", {})
    mode, unlocked = config.get("mode", "full"), config.get("unlock_blocks", 0)
    locked = "image tower locked" + (f" below its top {unlocked} blocks" if unlocked else "")
    details = f", image tower on {config['train_size']}-px random crops" if config.get("train_size") else ""
    details += f", its stem and lowest {config['frozen_blocks']} blocks frozen" if config.get("frozen_blocks") else ""
    details += f", labels smoothed by {config['label_smoothing']}" if config.get("label_smoothing") else ""
    details += (f", the weights' moving average kept (decay {config['weight_average_decay']} per step)"
                if config.get("weight_average_decay") else "")
    how = {"full": f"both towers fine-tuned on pixels{details}",
           "prototype": "value embeddings learned on the frozen image tower",
           "locked": f"{locked}; text tower and projections trained on its kept activations, "
                     f"{config.get('views', 1)} view(s) per training image"}
    tower = f" Image tower: {meta['pretrained_image_tower']}." if meta.get("pretrained_image_tower") else ""
    sizes, mirrored = [size for size in view_sizes(meta) if size], meta.get("mirror_average")
    averaged = ", its embeddings averaged" if len(sizes) > 1 or mirrored else ""
    audit = (f" The audit sees each photo at {sizes_text(sizes)} px{' and mirrored' if mirrored else ''}{averaged} "
             f"(chosen by validation loss)." if sizes else "")
    return (f"Mode: **{mode}** ({how.get(mode, mode)}).{tower}{audit} Best epoch {training.get('best_epoch')} of "
            f"{training.get('epochs_run')}, stopped by {training.get('stopped_by', 'epochs')}; training "
            f"{training.get('minutes')} min, {training.get('total_minutes', training.get('minutes'))} min with "
            f"reading the images.")


def _train_only(training: dict) -> str:
    rows = training.get("train_only_rows")
    return f" of which {rows} train-only" if rows else ""


def model_card(meta: dict) -> str:
    """A readable summary of a fine-tuned model: data, training, calibration and held-out metrics."""
    training, basis = meta.get("training", {}), meta.get("calibration_basis", {})
    lines = [
        "# clipdq model", "",
        f"Fine-tuned for spec `{meta.get('spec_fingerprint')}`, weights `{meta.get('fingerprint')}`.",
        f"Labeled rows: {training.get('labeled_rows')} (train {training.get('train_rows')}{_train_only(training)}, "
        f"validation {training.get('val_rows')}, test {training.get('test_rows')}).", "",
        _training_line(meta), "",
        f"Thresholds were chosen on the {basis.get('split', 'validation')} split ({basis.get('rows')} rows in "
        f"{basis.get('val_groups')} groups; grouping: {basis.get('grouping', 'none')}), each where the "
        f"{basis.get('bound', 'estimated accuracy')} of the rows above it meets the spec's precision target "
        f"{basis.get('target_precision')}; 'rows' says how many validation rows support each.", "",
        "| attribute | test accuracy | test macro-F1 | val accuracy | ECE before / after | gap threshold (rows) "
        "| conflict threshold (rows) |",
        "|---|---|---|---|---|---|---|",
    ]
    def fmt(value: float | None, rows: int | None) -> str:
        return "never" if value is None else f"{value:.3f} ({rows})"

    for name, m in meta["metrics"].items():
        c = meta.get("calibration", {}).get(name, {})
        lines.append(
            f"| {name} | {m.get('test_accuracy', float('nan')):.3f} | {m.get('test_macro_f1', float('nan')):.3f} "
            f"| {m.get('val_accuracy', float('nan')):.3f} | {m.get('ece_before', float('nan')):.3f} / "
            f"{m.get('ece_after', float('nan')):.3f} | {fmt(c.get('gap_threshold'), c.get('gap_rows'))} | "
            f"{fmt(c.get('conflict_threshold'), c.get('conflict_rows'))} |"
        )
    lines += _text_line(meta.get("text_calibration"))
    for name, m in meta["metrics"].items():
        lines += _confusion_table(name, meta.get("values", {}).get(name), m.get("confusion"))
    return "\n".join(lines) + "\n"


def _text_line(fitted: dict | None) -> list[str]:
    """What the card says of the image and text agreement calibration."""
    if not fitted:
        return []
    threshold = "never flags" if fitted["threshold"] is None else f"flags at score {fitted['threshold']:.2f} or below"
    return ["", f"Image and text agreement (`{fitted['column']}`): {threshold}, chosen on {fitted['rows']} validation "
                f"rows with their own texts and {fitted['planted_rows']} pairings with other products' texts "
                f"(lower confidence bounds of recall and of the false-flag rate, at error rate {fitted['error_rate']})."]


def _confusion_table(name: str, values: list[str] | None, confusion: list[list[int]] | None) -> list[str]:
    """A test-split confusion matrix as Markdown (rows: catalog value, columns: predicted)."""
    if not values or not confusion:
        return []
    if len(values) > 12:
        return ["", f"Confusion matrix of {name}: {len(values)} values, in clipdq.json (`metrics.{name}.confusion`)."]
    lines = ["", f"Confusion matrix of {name} on the test split (rows: true value, columns: predicted):", "",
             "| | " + " | ".join(values) + " |", "|---|" + "---|" * len(values)]
    lines += [f"| **{value}** | " + " | ".join(str(c) for c in row) + " |" for value, row in zip(values, confusion)]
    return lines


def load_model(uri: str, *, device: str | None = None, files: ModelFiles | None = None) -> Clip:
    """Load a CLIP from a Hugging Face hub id, a local folder or an s3:// prefix (whose files,
    ``read_model_files(uri)``, may already be at hand)."""
    files = files or read_model_files(uri)
    model = AutoModel.from_pretrained(files.folder, use_safetensors=True).eval()
    if not isinstance(model, DualEncoder):
        raise ValueError(f"{uri} holds a {type(model).__name__}, not a CLIP-style dual encoder")
    tokenizer = AutoTokenizer.from_pretrained(files.folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Clip(model.to(device), tokenizer, files.pixels, source=uri, meta=files.meta, value_emb=files.value_emb)


def image_features(model: DualEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, shape (n, d); differentiable."""
    out = model.get_image_features(pixel_values=pixel_values)
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


def image_embeddings(clip: Clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """``image_features`` as the audit computes them, in the view the model's training chose by
    validation loss (``train.choose_audit_view``): the photos resized to each of ``view_sizes``,
    each also mirrored where ``meta["mirror_average"]``, and the embeddings averaged."""
    mirrored = clip.meta.get("mirror_average")
    total = 0
    for size in view_sizes(clip.meta):
        shown = resized(pixel_values, size) if size else pixel_values
        total = total + image_features(clip.model, shown)
        if mirrored:
            total = total + image_features(clip.model, shown.flip(-1))
    return torch.nn.functional.normalize(total, dim=-1)


def tower_size(clip: Clip) -> int:
    """The side of the photos the image tower was built for (its config's ``image_size``)."""
    return clip.model.config.vision_config.image_size


def view_sizes(meta: dict) -> list[int | None]:
    """The sizes the audit resizes photos to (``meta["image_sizes"]``, or a single ``image_size``
    as models trained before several were recorded); [None]: as they are loaded."""
    return meta.get("image_sizes") or [meta.get("image_size")]


def sizes_text(sizes) -> str:
    """"208" or "160, 192 and 224"."""
    sizes = [str(size) for size in sizes]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} and {sizes[-1]}"


def resized(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, size, size) pixels, bilinear and antialiased where they shrink; the same tensor where
    the size is right."""
    if pixels.shape[-1] == size:
        return pixels
    return torch.cat([torch.nn.functional.interpolate(pixels[i : i + 256], size=(size, size), mode="bilinear",
                                                      align_corners=False, antialias=True)
                      for i in range(0, len(pixels), 256)])


def tokenize(clip: Clip, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(clip.device))


def text_features(clip: Clip, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised text embeddings of tokenized texts, shape (n, d); differentiable."""
    out = clip.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


class Captions:
    """Every caption of every attribute value, tokenized once; embeds them all in one pass."""

    def __init__(self, clip: Clip, spec: Spec):
        texts, self.owners = [], {}  # owners[attribute] @ caption embeddings = mean per value, (k, d)
        for attribute in spec.attributes:
            start = len(texts)
            texts.extend(c for v in attribute.values for c in attribute.captions(v))
            per_value = len(attribute.prompts)
            owner = torch.zeros(len(attribute.values), len(texts))
            for k in range(len(attribute.values)):
                owner[k, start + k * per_value : start + (k + 1) * per_value] = 1.0 / per_value
            self.owners[attribute.name] = owner
        self.tokens = tokenize(clip, texts)
        self.owners = {k: torch.nn.functional.pad(v, (0, len(texts) - v.shape[1])).to(clip.device)
                       for k, v in self.owners.items()}

    def value_embeddings(self, clip: Clip) -> dict[str, torch.Tensor]:
        """Per attribute, (k, d): the normalised mean embedding of each value's captions."""
        features = text_features(clip, self.tokens)
        return {name: torch.nn.functional.normalize(owner @ features, dim=-1) for name, owner in self.owners.items()}


class Titles:
    """The labeled rows' texts (titles, descriptions), each distinct one tokenized once, for a
    contrastive loss that teaches the text tower to meet the images they describe."""

    def __init__(self, clip: Clip, texts: np.ndarray):
        distinct, self.index = np.unique(texts.astype(str), return_inverse=True)
        self.known = texts != ""
        self.tokens = tokenize(clip, distinct.tolist())

    def loss(self, clip: Clip, image_emb: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Cross-entropy of each image against the distinct texts of the batch ``rows`` (the rows
        of ``image_emb``), its own text the target; rows without a text take no part. Only the
        text tower learns from it: the image embeddings and the logit scale stay what the
        attributes make them."""
        keep = self.known[rows]
        if not keep.any():
            return image_emb.sum() * 0.0
        distinct, target = np.unique(self.index[rows[keep]], return_inverse=True)
        text_emb = text_features(clip, {k: v[distinct] for k, v in self.tokens.items()})
        scale = clip.model.logit_scale.detach().exp().clamp(max=100.0)
        logits = scale * image_emb.detach()[torch.from_numpy(keep).to(image_emb.device)] @ text_emb.T
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(target).to(logits.device))


def attribute_logits(clip: Clip, image_emb: torch.Tensor, captions: Captions) -> dict[str, torch.Tensor]:
    """Per attribute, (n, k) scaled similarities of images to the value captions."""
    scale = clip.model.logit_scale.exp().clamp(max=100.0)
    return {name: scale * image_emb @ emb.T for name, emb in captions.value_embeddings(clip).items()}


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
        tower = torch.nn.ModuleDict({"vision_model": quantized.vision_model,
                                     "visual_projection": quantized.visual_projection})
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


@torch.inference_mode()
def embed_images(clip: Clip, pixel_values: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Image embeddings for an (n, 3, h, w) float32 array, as (n, d) float32."""
    with _image_arithmetic(clip):
        chunks = [
            image_embeddings(clip, torch.from_numpy(pixel_values[i : i + batch_size]).to(clip.device)).float().cpu()
            for i in range(0, len(pixel_values), batch_size)
        ]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, clip.model.config.projection_dim), np.float32)


@torch.inference_mode()
def embed_texts(clip: Clip, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """(n, d) float32 embeddings of free texts (titles, descriptions), truncated to the text tower's length."""
    chunks = [text_features(clip, tokenize(clip, texts[i : i + batch_size])).float().cpu()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, clip.model.config.projection_dim), np.float32)


@torch.inference_mode()
def embed_captions(clip: Clip, spec: Spec) -> dict[str, np.ndarray]:
    """Per attribute, one embedding per value: the normalised mean over its caption templates."""
    return {k: v.float().cpu().numpy() for k, v in Captions(clip, spec).value_embeddings(clip).items()}
