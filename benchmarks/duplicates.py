"""Duplicate listings, measured: which copies of a real catalog image are found, which look-alike
products are wrongly grouped, and time and memory at scale.

(a) Grocery Store: the 81 catalog ("iconic") images, many in near-identical packaging of one
    brand, each with one copy made five ways (re-encoded, half size, cropped to 90%, 80% and 70%
    of each side around the centre, 80% from the top-left corner). Per way and threshold: copies
    grouped with their original; and the highest similarity between two distinct products.
(b) Scale: ``--images`` synthetic signatures (smooth random images, the last 1,000 of them
    copies of the first 1,000 with a little noise) through ``duplicates.find`` in a child process:
    time, copies found, and the OS's peak RSS.

    python benchmarks/duplicates.py [--data DIR] [--images 100000]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from grocery import DEFAULT_DATA, catalog_images
from PIL import Image

from clipdq.checks import duplicates
from clipdq.io import images
from clipdq.io.cache import digest

THRESHOLDS = (0.97, 0.98, 0.99)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _crop(image: Image.Image, keep: float, centred: bool = True) -> Image.Image:
    w, h = image.size
    left, top = ((w - w * keep) / 2, (h - h * keep) / 2) if centred else (0, 0)
    return image.crop((int(left), int(top), int(left + w * keep), int(top + h * keep)))


WAYS = {
    "re-encoded (quality 60)": lambda image: _jpeg(image, 60),
    "half size": lambda image: _jpeg(image.resize((image.width // 2, image.height // 2))),
    "centre 90%": lambda image: _jpeg(_crop(image, 0.9)),
    "centre 80%": lambda image: _jpeg(_crop(image, 0.8)),
    "centre 70%": lambda image: _jpeg(_crop(image, 0.7)),
    "corner 80%": lambda image: _jpeg(_crop(image, 0.8, centred=False)),
}


def _signatures(blobs: list[bytes]) -> np.ndarray:
    sigs = [images.signature(images.decode(blob, min_side=224)) for blob in blobs]
    return np.frombuffer(b"".join(sigs), np.uint8).reshape(len(blobs), -1)


def grocery(data: Path) -> None:
    blobs = [Path(path).read_bytes() for path in catalog_images(data)["image"]]
    n, ids = len(blobs), [f"p{i}" for i in range(len(blobs))]
    signatures = _signatures(blobs)
    pairs = np.concatenate(list(duplicates.candidate_pairs(signatures, np.arange(n), np.arange(n))))
    scores = duplicates.pair_similarity(signatures, pairs)[0]
    print(
        f"{n} distinct products: highest similarity between two of them "
        f"{scores[duplicates.better_way(pairs, scores)].max():.4f}"
    )
    print(
        "| copy | " + " | ".join(f"grouped at {t}" for t in THRESHOLDS) + f" | the copy's kind at {THRESHOLDS[-1]} "
        "(crop area: median) |"
    )
    print("|---|" + "---|" * (len(THRESHOLDS) + 1))
    originals = [Image.open(io.BytesIO(blob)).convert("RGB") for blob in blobs]
    for way, make in WAYS.items():
        copies = [make(image) for image in originals]
        both = blobs + copies
        sigs, shas = _signatures(both), [digest(blob) for blob in both]
        cells = []
        for threshold in THRESHOLDS:
            found, _ = duplicates.find(ids + [f"{i}-copy" for i in ids], shas, sigs, threshold=threshold)
            group = dict(found.select("product_id", "group").rows())
            grouped = sum(f"{i}-copy" in group and group[f"{i}-copy"] == group.get(i) for i in ids)
            wrong = sum(
                len({pid.split("-")[0] for pid in members}) > 1
                for members in found.group_by("group").agg("product_id")["product_id"].to_list()
            )
            cells.append(f"{grouped}/{n}" + (f" ({wrong} groups of distinct products)" if wrong else ""))
        listed = found.filter(pl.col("product_id").str.ends_with("-copy"))
        print(f"| {way} | " + " | ".join(cells) + f" | {_kinds(listed)} |")


def _kinds(copies: pl.DataFrame) -> str:
    """How many copies each kind names, with the median crop area of those named crops."""
    counts = copies.group_by("kind").agg(pl.len(), pl.col("crop_area").median()).sort("len", descending=True)
    return ", ".join(
        f"{kind} {count}" + ("" if area is None else f" ({area:.2f})") for kind, count, area in counts.rows()
    )


PLANTED = 1000  # the last images of the scale run: copies of the first ones with a little noise added


def write_synthetic(path: Path, n: int, *, block: int = 50_000) -> None:
    """``n`` synthetic signatures (smooth random images: 4 x 4 noise upsampled, plus grain) written
    to ``path`` block by block, as an audit writes its shards' signatures."""
    rng, planted, first = np.random.default_rng(0), min(PLANTED, n // 10), None
    with open(path, "wb") as out:
        for start in range(0, n, block):
            rows = min(block, n - start)
            coarse = torch.from_numpy(rng.random((rows, 3, 4, 4), dtype=np.float32))
            smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear") * 200 + torch.rand(rows, 3, 32, 32) * 40
            signatures = smooth.clamp(0, 255).to(torch.uint8).flatten(1).numpy()
            first = signatures[:planted].copy() if first is None else first
            for row in range(max(start, n - planted), start + rows):
                noisy = first[row - (n - planted)].astype(np.int16) + rng.integers(-3, 4, signatures.shape[1])
                signatures[row - start] = np.clip(noisy, 0, 255).astype(np.uint8)
            out.write(signatures.tobytes())


SCALE = """
import resource, sys, threading, time, polars as pl
from clipdq.checks import duplicates
from clipdq.io.images import SignatureFile
path, n, planted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = pl.Series([str(i) for i in range(n)])
own = [0]  # peak memory of the process's own (not file-backed) pages, sampled
def sample():
    while True:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        own[0] = max(own[0], int(status["RssAnon"].split()[0]) // 1024)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
started = time.monotonic()
found, _ = duplicates.find(ids, ids, SignatureFile(path, n), threshold=0.99)  # as the audit reads them
group = dict(found.select("product_id", "group").rows())
pairs = [(group.get(str(i)), group.get(str(n - planted + i))) for i in range(planted)]
grouped = sum(copy is not None and copy == original for copy, original in pairs)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{n:,} images: {time.monotonic() - started:.1f} s, {grouped} of {planted} planted copies grouped with their "
      f"original, {found.height} images in groups, peak RSS {peak:,.0f} MB (the process's own memory at most "
      f"{own[0]:,} MB)")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Grocery Store dataset folder")
    parser.add_argument("--images", type=int, default=100_000, help="synthetic images for the scale run (0: none)")
    args = parser.parse_args()
    if (args.data / "classes.csv").exists():
        grocery(args.data)
    else:
        print(f"Grocery Store dataset not found at {args.data}: skipping (a)")
    if args.images:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "signatures"
            write_synthetic(path, args.images)
            planted = str(min(PLANTED, args.images // 10))
            subprocess.run([sys.executable, "-c", SCALE, str(path), str(args.images), planted], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
