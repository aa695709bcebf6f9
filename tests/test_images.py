"""Fetching and decoding product images safely, and preprocessing them as CLIP's processor does."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from transformers import AutoImageProcessor, CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipdq.io import images
from clipdq.io.sources import access_for
from clipdq.model import towers

SIZE = 32
PIXELS = images.PixelSpec(SIZE, SIZE, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
WHITE = (np.ones(3) - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD  # white after normalisation
TOLERANCE = 0.05  # max abs difference from transformers' CLIP processor, in normalised units


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like picture: blurred coloured blobs on a coloured ground."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse((x, y, x + width // 3, y + height // 3), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(max(width, height) / 80))


def half_transparent_palette_png() -> bytes:
    """Left half: palette index 0, transparent but holding bright green. Right half: opaque red."""
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 10))
    return encode(image, "PNG", transparency=0)


def gray16_png() -> bytes:
    """A 16-bit grayscale gradient over the full 0..65535 range."""
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 80x40 (left red, right blue) with EXIF orientation 6: shown 40x80, red on top."""
    image = Image.new("RGB", (80, 40), (220, 20, 20))
    image.paste((20, 20, 220), (40, 0, 80, 40))
    exif = image.getexif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def truncated_jpeg() -> bytes:
    data = encode(photo(300, 200, seed=1), "JPEG")
    return data[: len(data) // 2]


def decompression_bomb_png() -> bytes:
    """Only a PNG header, claiming 30000 x 30000 pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    files = {
        "good.jpg": encode(photo(60, 45, seed=0), "JPEG"),
        "palette.png": half_transparent_palette_png(),
        "gray16.png": gray16_png(),
        "rotated.jpg": exif_rotated_jpeg(),
        "truncated.jpg": truncated_jpeg(),
        "noise.jpg": np.random.default_rng(0).bytes(2048),
        "bomb.png": decompression_bomb_png(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_load_images_keeps_good_images_and_explains_each_failure(image_folder):
    refs = [
        "good.jpg",  # relative to the catalog's folder
        str(image_folder / "palette.png"),  # absolute
        "gray16.png",
        "rotated.jpg",
        "truncated.jpg",
        "noise.jpg",
        "missing.jpg",
        None,
        encode(photo(50, 70, seed=2), "PNG"),  # image bytes in the cell itself
        "",
        "bomb.png",
    ]

    loaded = images.load_images(refs, access_for(str(image_folder)), PIXELS)

    expected_ok = [True, True, True, True, False, False, False, False, True, False, False]
    assert loaded.ok.tolist() == expected_ok
    assert loaded.pixels.shape == (sum(expected_ok), 3, SIZE, SIZE)
    assert loaded.pixels.dtype == np.float32
    assert np.isfinite(loaded.pixels).all()
    errors = dict(
        zip(
            ["good", "palette", "gray16", "rotated", "truncated", "noise", "missing", "none", "bytes", "empty", "bomb"],
            loaded.errors,
        )
    )
    assert [errors[k] for k in ("good", "palette", "gray16", "rotated", "bytes")] == [None] * 5
    assert "truncated" in errors["truncated"]
    assert errors["noise"] == "unreadable image: not a recognised image format"
    assert errors["missing"] == "image file not found"
    assert "no image given" in errors["none"] and "no image given" in errors["empty"]
    assert "DecompressionBomb" in errors["bomb"]


def test_load_images_rows_follow_the_input_order(image_folder):
    loaded = images.load_images(["rotated.jpg", "missing.jpg", "good.jpg"], access_for(str(image_folder)), PIXELS)
    alone = images.load_images(["good.jpg"], access_for(str(image_folder)), PIXELS)

    assert loaded.ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(loaded.pixels[1], alone.pixels[0])


def test_load_images_with_no_readable_image_gives_an_empty_batch(tmp_path):
    loaded = images.load_images([None, "missing.jpg"], access_for(str(tmp_path)), PIXELS)

    assert loaded.pixels.shape == (0, 3, SIZE, SIZE)
    assert loaded.ok.tolist() == [False, False]


def test_transparent_palette_pixels_are_flattened_on_white():
    decoded = images.decode(half_transparent_palette_png(), min_side=8)

    assert decoded.mode == "RGB"
    assert decoded.getpixel((2, 5)) == (255, 255, 255)  # not the hidden green
    assert decoded.getpixel((17, 5)) == (255, 0, 0)


def test_transparent_area_is_white_in_model_pixels(image_folder):
    pixels = images.load_images(["palette.png"], access_for(str(image_folder)), PIXELS).pixels[0]

    np.testing.assert_allclose(pixels[:, SIZE // 2, 0], WHITE, atol=0.02)


def test_sixteen_bit_grayscale_keeps_its_tones():
    decoded = np.asarray(images.decode(gray16_png(), min_side=8))

    assert decoded.shape == (48, 64, 3)
    assert decoded.min() < 20 and decoded.max() > 235
    assert decoded.std() > 50  # a clipped conversion would be nearly all white
    assert (np.diff(decoded[:, :, 0].astype(int).ravel()) >= 0).all()  # the ramp stays a ramp


def test_exif_orientation_is_applied():
    decoded = images.decode(exif_rotated_jpeg(), min_side=40)

    assert decoded.size == (40, 80)  # (width, height): upright is portrait
    top, bottom = np.asarray(decoded)[5, 20], np.asarray(decoded)[75, 20]
    assert top[0] > 150 and top[2] < 80  # red half on top
    assert bottom[2] > 150 and bottom[0] < 80


def test_jpeg_draft_mode_never_decodes_below_the_requested_side():
    data = encode(photo(1600, 1200, seed=4), "JPEG")

    for min_side in (32, 224, 700):
        width, height = images.decode(data, min_side=min_side).size
        assert min(width, height) >= min_side
        assert width / height == pytest.approx(4 / 3, rel=0.02)
    assert images.decode(data, min_side=32).size < (1600, 1200)  # and does shrink large photos


def clip_processor_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize(
    "size",
    [
        (64, 64),
        (300, 200),
        (33, 250),
        (517, 311),
        (45, 32),
        (640, 480),
        (97, 61),
    ],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_to_pixels_matches_transformers_clip_processor(size):
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    image = photo(*size, seed=sum(size))

    ours = images.to_pixels(image, PIXELS)
    reference = clip_processor_pixels(processor, image)

    assert ours.shape == reference.shape == (3, SIZE, SIZE)
    assert np.abs(ours - reference).max() < TOLERANCE


def test_saved_model_processor_and_pixel_spec_agree(init_model_dir):
    processor = AutoImageProcessor.from_pretrained(init_model_dir)
    pixel_spec = towers.load_model(str(init_model_dir), device="cpu").pixels
    image = photo(90, 90, seed=9)

    ours = images.to_pixels(image, pixel_spec)
    reference = clip_processor_pixels(processor, image)

    assert ours.shape == reference.shape == (3, pixel_spec.crop, pixel_spec.crop)
    assert np.abs(ours - reference).max() < TOLERANCE


def test_thumbnail_is_a_small_jpeg_or_none(image_folder):
    jpeg = images.thumbnail("good.jpg", access_for(str(image_folder)), size=24)

    with Image.open(io.BytesIO(jpeg)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 24
    assert images.thumbnail("missing.jpg", access_for(str(image_folder))) is None
    assert images.thumbnail("truncated.jpg", access_for(str(image_folder))) is None
