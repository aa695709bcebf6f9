"""What a nightly audit costs at catalog scale, measured as its user runs it: whole ``clipdq audit``
processes, from process start to exit, timed by the clock, their peak memory (RSS) read from the OS.

It builds a catalog of ``--rows`` products in the sample spec's shape, each with its own small
distinct image (24 px PNG: a block of colour on white, so decoding and embedding cost little and
per-row overhead shows), row groups of 20,000 rows, and a tiny model (``clipdq init-model --arch tiny``); then runs

1. the first audit (nothing kept from an earlier night),
2. an unchanged rerun (findings must equal the first run's),
3. a rerun after 1% of the images were rewritten (new bytes),

and prints seconds, rows/s and peak RSS for each, with how many images were read and embedded.
``--workers 2`` runs the shards on a local 2-process Dask cluster. ``--check`` exits non-zero when
the unchanged rerun read an image or its findings differ from the first run's (the test suite runs
it this way at a small size).

    python benchmarks/nightly.py --rows 200000 [--workers 2] [--folder DIR] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from clipdq import sample_data

ROW_GROUP_ROWS = 20_000
IMAGE_SIDE = 24
FOLDER_FILES = 1_000  # images per folder

MEASURE = (
    "import resource, subprocess, sys, time; t = time.monotonic(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.stdout[-2000:], r.stderr[-3000:] if r.returncode else '', sep='\\n'); "
    "print(r.returncode, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def image_path(index: int) -> str:
    return f"images/{index // FOLDER_FILES:05d}/{index:08d}.png"


def write_images(folder: Path, indices: range, generation: int = 0) -> None:
    """A distinct small PNG for each index, drawn at random for the whole range at once
    (``generation`` gives other bytes for the same indices)."""
    rng = np.random.default_rng([indices.start, len(indices), generation])
    pixels = np.full((len(indices), IMAGE_SIDE, IMAGE_SIDE, 3), 255, np.int16)  # products on a white background
    corners = np.sort(rng.integers(0, IMAGE_SIDE + 1, (len(indices), 2, 2)), axis=2)
    colours = rng.integers(0, 256, (len(indices), 3))
    for image, ((top, bottom), (left, right)), colour in zip(pixels, corners, colours):
        image[top : bottom + 2, left : right + 2] = colour
    pixels = (pixels + rng.integers(-8, 9, pixels.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
    made: set[Path] = set()
    for index, image in zip(indices, pixels):
        path = folder / image_path(index)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(png(image))


def png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of (h, w, 3) uint8 ``pixels``, compressed at zlib level 1, no row filters."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def make_catalog(folder: Path, rows: int, *, duplicates: bool) -> Path:
    """``rows`` products with the sample spec's columns, values drawn at random (some missing), each
    with its own image; returns the catalog's path."""
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [range(lo, min(lo + 50_000, rows)) for lo in range(0, rows, 50_000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(write_images, [folder] * len(chunks), chunks))
    rng = np.random.default_rng(0)
    columns: dict[str, object] = {
        "product_id": [f"P{i:08d}" for i in range(rows)],
        "image": [image_path(i) for i in range(rows)],
    }
    kinds = rng.choice(sample_data.PRODUCT_TYPES, rows).tolist()
    columns["product_type"] = kinds
    columns["title"] = [f"{kind} item {i}" for i, kind in enumerate(kinds)]
    for name in sample_data.ATTRIBUTES:
        values = np.array(sample_data.SPEC["attributes"][name]["values"] + [None], dtype=object)
        columns[name] = pl.Series(values[rng.integers(0, len(values), rows)].tolist(), dtype=pl.String)
    path = folder / "catalog.parquet"
    pl.DataFrame(columns).write_parquet(path, row_group_size=ROW_GROUP_ROWS)
    (folder / "spec.yaml").write_text(sample_data.SPEC_YAML + ("" if duplicates else "duplicate_similarity: null\n"))
    return path


def change_images(folder: Path, rows: int, share: float) -> int:
    """New bytes for ``share`` of the images, spread over the catalog; returns how many."""
    picked = np.random.default_rng(1).choice(rows, max(1, int(rows * share)), replace=False)
    for index in picked:
        write_images(folder, range(int(index), int(index) + 1), generation=int(index) + 1)
    return len(picked)


def audit(folder: Path, model: Path, output: Path, *extra: str) -> dict:
    """Seconds, peak RSS (MB) and the run's summary of one ``clipdq audit`` process."""
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "clipdq.cli", "audit"]
    command += ["--catalog", str(folder / "catalog.parquet"), "--spec", str(folder / "spec.yaml")]
    command += ["--model", str(model), "--output", str(output), *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    code, seconds, rss_kb = result.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"audit failed:\n{result.stdout[-4000:]}")
    run = [row for row in result.stdout.splitlines() if "run_id=" in row][-1].strip()
    summary = json.loads((Path(run) / "summary.json").read_text())
    return {"seconds": float(seconds), "rss_mb": int(rss_kb) / 1024, "run": run, "summary": summary}


def report(name: str, rows: int, measured: dict) -> None:
    seen = measured["summary"]["images"]
    print(
        f"{name:<28}{measured['seconds']:>9.1f} s {rows / measured['seconds']:>10,.0f} rows/s "
        f"{measured['rss_mb']:>8,.0f} MB peak RSS   "
        f"{seen['scored'] - seen['unread']:,} images read, {seen['embedded']:,} embedded",
        flush=True,
    )


def findings(run: str) -> pl.DataFrame:
    return pl.read_parquet(Path(run) / "findings.parquet").sort("product_id", "attribute")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1, help="Dask worker processes (1: shards in this process)")
    parser.add_argument(
        "--folder", type=Path, help="keep the catalog, model and runs here (default: a temporary folder)"
    )
    parser.add_argument(
        "--no-duplicates", action="store_true", help="a spec without duplicate listings (they are on by default)"
    )
    parser.add_argument("--check", action="store_true", help="fail unless reruns reuse and findings are identical")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.folder or Path(scratch)
        name = f"{args.rows}{'-no-duplicates' if args.no_duplicates else ''}"
        data, model, output = root / f"catalog-{name}", root / "model", root / f"runs-{name}-{args.workers}"
        if not (data / "catalog.parquet").exists():
            make_catalog(data, args.rows, duplicates=not args.no_duplicates)
        if not model.exists():
            init = ["init-model", "--spec", str(data / "spec.yaml"), "--arch", "tiny", "--output", str(model)]
            subprocess.run([sys.executable, "-m", "clipdq.cli", *init], check=True, capture_output=True)
        extra = ("--workers", str(args.workers)) if args.workers > 1 else ()
        duplicates = "off" if args.no_duplicates else "on"
        print(f"{args.rows:,} products, {IMAGE_SIDE} px PNGs, tiny model, duplicate listings {duplicates}, ", end="")
        print(f"{os.cpu_count()} CPU cores, {'--workers ' + str(args.workers) if extra else 'one process'}")
        first = audit(data, model, output, *extra)
        report("first run", args.rows, first)
        again = audit(data, model, output, *extra)
        report("unchanged rerun", args.rows, again)
        same = findings(again["run"]).equals(findings(first["run"]))
        print(f"    findings identical to the first run: {same}")
        changed = change_images(data, args.rows, 0.01)
        after = audit(data, model, output, *extra)
        report(f"rerun, {changed:,} images changed", args.rows, after)
        extra_cost = after["seconds"] / again["seconds"]
        print(f"    the changed rerun costs {extra_cost:.2f}x the unchanged rerun")
        if args.check:
            unread, embedded = again["summary"]["images"]["unread"], after["summary"]["images"]["embedded"]
            problems = [] if same else ["the unchanged rerun's findings differ from the first run's"]
            problems += [] if unread == args.rows else [f"the unchanged rerun read {args.rows - unread} images"]
            problems += [] if embedded == changed else [f"{embedded} images embedded after {changed} changed"]
            print("\n".join(problems) or "reuse and findings: as expected")
            return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
