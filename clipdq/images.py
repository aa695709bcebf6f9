"""Fetch product images and decode them safely into model-ready pixels, with a status per image."""

from __future__ import annotations

import io
import ipaddress
import socket
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipdq import storage

MAX_DOWNLOAD_BYTES = 50 * 2**20
URL_TIMEOUT_S = 15
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


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


class MissingImage(ValueError):
    """The catalog row names no image."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect could point at an internal address: refuse it


def _check_public_host(host: str) -> None:
    """Refuse URLs that resolve to loopback, private, link-local or other non-global addresses."""
    for *_, address in socket.getaddrinfo(host, None):
        ip = ipaddress.ip_address(address[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global:
            raise ValueError(f"image URL host {host!r} resolves to non-public address {ip}")


def _fetch_url(url: str) -> bytes:
    _check_public_host(urllib.parse.urlsplit(url).hostname or "")
    opener = urllib.request.build_opener(_NoRedirect)
    with opener.open(url, timeout=URL_TIMEOUT_S) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"image larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def resolve(ref: str, base: str) -> str:
    """An image reference as a URI: relative paths are taken from the catalog's folder."""
    if storage.is_s3(ref) or ref.startswith(("http://", "https://", "/")):
        return ref
    return storage.join(base, ref)


def fetch(ref: str | bytes | None, base: str) -> bytes:
    """Image bytes for a catalog cell: raw bytes as they are, else read from path, s3 or URL."""
    if ref is None or ref == "" or ref == b"":
        raise MissingImage("no image given in the catalog")
    if isinstance(ref, bytes):
        return ref
    uri = resolve(ref, base)
    if uri.startswith(("http://", "https://")):
        return _fetch_url(uri)
    return storage.read_bytes(uri)


def decode(data: bytes, *, min_side: int) -> Image.Image:
    """Decode to 8-bit RGB, upright, transparent areas flattened on white.

    JPEG draft mode decodes at a reduced scale no smaller than ``min_side``, which is several
    times faster for large photos.
    """
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    image.load()  # decode fully now, so truncated files fail here
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def to_pixels(image: Image.Image, spec: PixelSpec) -> np.ndarray:
    """Resize the shortest edge (bicubic), centre-crop and normalise, as CLIP's processor does."""
    width, height = image.size
    short, long = sorted((width, height))
    long = int(spec.resize * long / short)  # truncated, as transformers does
    size = (spec.resize, long) if width <= height else (long, spec.resize)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
    image = image.crop((left, top, left + spec.crop, top + spec.crop))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return array.transpose(2, 0, 1)


def _fetch_one(ref: str | bytes | None, base: str) -> bytes | str:
    """The image's bytes, or why they could not be fetched."""
    try:
        return fetch(ref, base)
    except FileNotFoundError:
        return "image file not found"
    except MissingImage as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - storage errors (S3, HTTP) become a per-image status
        return f"image fetch failed: {type(error).__name__}: {error}"[:300]


def _pixels_one(data: bytes, spec: PixelSpec) -> np.ndarray | str:
    """Model-ready pixels of image bytes, or why they could not be decoded."""
    try:
        return to_pixels(decode(data, min_side=spec.resize), spec)
    except UnidentifiedImageError:  # its message names a memory address: keep statuses reproducible
        return "unreadable image: not a recognised image format"
    except DECODE_ERRORS as error:
        return f"unreadable image: {type(error).__name__}: {error}"[:300]


def fetch_images(refs: list, base: str, *, workers: int = 4) -> list[bytes | str]:
    """Bytes per catalog cell, fetched in a thread pool; a string says why one failed."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda ref: _fetch_one(ref, base), refs))


def decode_images(fetched: list[bytes | str], spec: PixelSpec, *, workers: int = 4) -> LoadedImages:
    """Decode and preprocess fetched images in a thread pool; earlier failures pass through."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda item: item if isinstance(item, str) else _pixels_one(item, spec), fetched))
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    stacked = [r for r in results if not isinstance(r, str)]
    pixels = np.stack(stacked) if stacked else np.zeros((0, 3, spec.crop, spec.crop), np.float32)
    return LoadedImages(pixels, ok, [r if isinstance(r, str) else None for r in results])


def load_images(refs: list, base: str, spec: PixelSpec, *, workers: int = 4) -> LoadedImages:
    """Fetch, decode and preprocess images; failures become per-image errors."""
    return decode_images(fetch_images(refs, base, workers=workers), spec, workers=workers)


def thumbnail(ref: str | bytes | None, base: str, *, size: int = 96) -> bytes | None:
    """A small JPEG of an image for reports, or None when it cannot be read."""
    try:
        image = decode(fetch(ref, base), min_side=size)
    except Exception:  # noqa: BLE001 - a missing thumbnail must not fail a report
        return None
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
