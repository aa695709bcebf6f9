"""Decode product images safely into model-ready pixels, with a status per image (fetching: ``sources``)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipdq.io import sources
from clipdq.io.sources import Fetched, ImageAccess, fetch, fetch_all

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)
MAX_PIXELS = 40_000_000  # below Pillow's MAX_IMAGE_PIXELS: what Pillow only warns about is refused here
MAX_DECODED_BYTES = 160 * 2**20  # per decoding worker
THREADED_BYTES = 32 * 2**10  # images decode in threads where their mean compressed bytes or their
# model-ready pixels reach this: Pillow's decoding and resizing then run long outside the GIL (2
# threads decode 800x600 JPEGs for a 224 px tower 2.4x as fast as one); smaller ones (24 px PNGs for
# a 32 px tower) decode twice as fast in one thread as in two, each call holding the GIL briefly
MAX_ASPECT = 4  # longer sides are cropped to this many times the shorter before resizing
BYTES_PER_PIXEL = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "PA": 2,
    "I;16": 2,
    "I;16B": 2,
    "I;16L": 2,
    "RGB": 3,
    "YCbCr": 3,
    "RGBA": 4,
    "CMYK": 4,
    "I": 4,
    "F": 4,
}
SIGNATURE_SIZE = 32  # a pixel signature is the whole image as SIGNATURE_SIZE^2 RGB pixels (uint8)
SIGNATURE_BYTES = 3 * SIGNATURE_SIZE**2
SIGNATURE_DECODE_SIDE = 2 * SIGNATURE_SIZE  # decoded at least this large, however small the model's input
FORMAT_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}


@dataclass(frozen=True)
class PixelSpec:
    """How images become model input: resize shortest edge, centre crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class LoadedImages:
    pixels: np.ndarray  # (n_ok, 3, crop, crop) float32, rows of the images that loaded
    ok: np.ndarray  # (n,) bool, which input images loaded
    errors: list[str | None]  # (n,) why each image failed, None where it loaded
    signatures: list[bytes] = field(default_factory=list)  # (n_ok,) pixel signature of each loaded image


def image_format(data: bytes) -> str | None:
    """The allowed format ``data`` starts with (JPEG, PNG, WebP, GIF, TIFF, BMP), judged on the bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, starts in FORMAT_MAGIC.items() if data.startswith(starts)), None)


def decode(data: bytes, *, min_side: int) -> Image.Image:
    """Decode to 8-bit RGB, upright, transparent areas flattened on white.

    JPEG draft mode decodes at a reduced scale no smaller than ``min_side``, which is several
    times faster for large photos.
    """
    kind = image_format(data)
    if kind is None:
        raise UnidentifiedImageError("not an allowed image format (JPEG, PNG, WebP, GIF, TIFF, BMP)")
    opened = Image.open(io.BytesIO(data), formats=[kind])
    if opened.format == "JPEG":
        opened.draft("RGB", (min_side, min_side))
    image: Image.Image = opened
    width, height = image.size
    if width * height > MAX_PIXELS or width * height * BYTES_PER_PIXEL.get(image.mode, 4) > MAX_DECODED_BYTES:
        raise Image.DecompressionBombError(f"{width}x{height} {image.mode} is too large to decode")
    image.load()  # decode fully now, so truncated files fail here
    ImageOps.exif_transpose(image, in_place=True)  # (a copy otherwise, even where nothing turns)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pixels(image: Image.Image, pixel_spec: PixelSpec) -> np.ndarray:
    """Resize the shortest edge (bicubic), centre-crop and normalise, as CLIP's processor does."""
    return normalised(cropped(image, pixel_spec)[None], pixel_spec)[0]


def normalised(crops: np.ndarray, pixel_spec: PixelSpec) -> np.ndarray:
    """(n, 3, crop, crop) float32 model input of (n, crop, crop, 3) uint8 ``cropped`` images."""
    mean, std = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (pixel_spec.mean, pixel_spec.std))
    return (crops.transpose(0, 3, 1, 2).astype(np.float32, order="C") / 255.0 - mean) / std


def cropped(image: Image.Image, pixel_spec: PixelSpec) -> np.ndarray:
    """(crop, crop, 3) uint8: the shortest edge resized (bicubic) and the centre cropped."""
    width, height = image.size
    short, long = sorted((width, height))
    if long > MAX_ASPECT * short:  # keep the centre the crop will use, or a 4000x3 strip resizes to 224x298666
        keep = MAX_ASPECT * short
        box = (
            ((width - keep) // 2, 0, (width + keep) // 2, height)
            if width > height
            else (0, (height - keep) // 2, width, (height + keep) // 2)
        )
        image = image.crop(box)
        width, height = image.size
        short, long = sorted((width, height))
    long = int(pixel_spec.resize * long / short)  # truncated, as transformers does
    size = (pixel_spec.resize, long) if width <= height else (long, pixel_spec.resize)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - pixel_spec.crop) // 2, (size[1] - pixel_spec.crop) // 2
    return np.asarray(image.crop((left, top, left + pixel_spec.crop, top + pixel_spec.crop)), dtype=np.uint8)


def signature(image: Image.Image) -> bytes:
    """The whole image, uncropped, squashed to SIGNATURE_SIZE x SIGNATURE_SIZE RGB (channels first,
    uint8): what duplicate listings compare, unchanged by re-encoding and resizing."""
    small = image.resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1).tobytes()


def row_indices(index, length: int) -> np.ndarray:
    """The rows that ``index`` (a slice or row indices) picks of ``length`` rows, as an array."""
    return np.arange(*index.indices(length)) if isinstance(index, slice) else np.asarray(index)


class SignatureFile:
    """(rows, SIGNATURE_BYTES) uint8 pixel signatures in a local file, read on demand like an array
    (``len``, slices, row indices), a run of consecutive rows in one read. Not mapped: a map keeps
    the pages it touched in the process, and the system maps 16 pages around each row read, so a
    search over millions of images would hold most of the file (3 GB a million)."""

    def __init__(self, path: str, rows: int):
        self.path, self.shape = path, (rows, SIGNATURE_BYTES)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = row_indices(index, len(self))
        flat = rows.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"rows outside the {len(self)} signatures")
        out = np.empty((flat.size, SIGNATURE_BYTES), np.uint8)
        starts = np.flatnonzero(np.diff(flat, prepend=-2) != 1)  # where each run of consecutive rows starts
        with open(self.path, "rb", buffering=0) as file:
            for start, end in zip(starts.tolist(), [*starts[1:].tolist(), flat.size]):
                wanted = (end - start) * SIGNATURE_BYTES
                if os.preadv(file.fileno(), [out[start:end].data], int(flat[start]) * SIGNATURE_BYTES) != wanted:
                    raise OSError(f"{self.path} is shorter than its {len(self)} signatures")
        return out.reshape(*rows.shape, SIGNATURE_BYTES)


Signatures = np.ndarray | SignatureFile  # (n, SIGNATURE_BYTES) uint8, in memory or in a file


def _pixels_one(data: bytes, pixel_spec: PixelSpec) -> tuple[np.ndarray, bytes] | str:
    """The ``cropped`` pixels and the signature of image bytes, or why they could not be decoded."""
    try:
        image = decode(data, min_side=max(pixel_spec.resize, SIGNATURE_DECODE_SIDE))
        return cropped(image, pixel_spec), signature(image)
    except UnidentifiedImageError:  # its message names a memory address: keep statuses reproducible
        return "unreadable image: not a recognised image format"
    except DECODE_ERRORS as error:
        return f"unreadable image: {type(error).__name__}: {error}"[:300]


def decode_images(fetched: list[Fetched], pixel_spec: PixelSpec, *, workers: int = 4) -> LoadedImages:
    """Decode and preprocess fetched images, in up to ``workers`` threads where they are large
    enough to share (``THREADED_BYTES``); fetch failures pass through."""
    sizes = [len(item.data) for item in fetched if item.data is not None]
    large = 3 * pixel_spec.crop**2 >= THREADED_BYTES or sum(sizes) >= THREADED_BYTES * max(len(sizes), 1)
    results = sources.in_threads(
        lambda item: str(item.error) if item.data is None else _pixels_one(item.data, pixel_spec),
        fetched,
        workers=workers if large else 1,
    )
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    loaded = [r for r in results if not isinstance(r, str)]
    crops = np.stack([r[0] for r in loaded]) if loaded else np.zeros((0, pixel_spec.crop, pixel_spec.crop, 3), np.uint8)
    pixels = normalised(crops, pixel_spec)
    return LoadedImages(pixels, ok, [r if isinstance(r, str) else None for r in results], [r[1] for r in loaded])


def load_images(refs: list, access: ImageAccess, pixel_spec: PixelSpec, *, workers: int = 4) -> LoadedImages:
    """Fetch, decode and preprocess images; failures become per-image errors."""
    return decode_images(fetch_all(refs, access, workers=workers), pixel_spec, workers=workers)


def thumbnail(ref: str | bytes | None, access: ImageAccess, *, size: int = 96) -> bytes | None:
    """A small JPEG of an image for reports, or None when it cannot be read or is not allowed."""
    try:
        image = decode(fetch(ref, access), min_side=size)
    except Exception:  # noqa: BLE001 - a missing thumbnail must not fail a report
        return None
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
