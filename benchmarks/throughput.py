"""Audit throughput on large product photos, against the model alone and Hugging Face's pipeline.

On the same JPEGs (generated, 1600 px) and the same attribute values, with a ViT-B/32-shaped CLIP
(``clipdq init-model --arch vit-b-32``; speed does not depend on the weights) or, with ``--arch
efficientnet-lite0``, the pretrained EfficientNet-Lite0 dual encoder, it measures:

(a) the model's forward pass alone, on pixels already in memory, and fetching plus decoding alone
    (a light tower can leave the audit decode-bound);
(b) the whole audit flow, Parquet to published findings, without and then with the embedding
    cache (an unchanged catalog), and after changing 1% of the images;
(c) ``pipeline("zero-shot-image-classification")`` called as its documentation shows, once per
    image and attribute;
(d) compare and report for 1,000,000 products x 5 attributes, predictions given;
(e) peak memory (RSS) of the audit command for 10,000 and 100,000 rows, images repeating;
(f) the int8 and bf16 backends: the forward pass alone, how often their predicted values equal
    fp32's, and the whole audit with each;

and prints images/s and the ratios next to their targets.

    python benchmarks/throughput.py [--arch vit-b-32] [--images 1000] [--pipeline-images 24] [--batch-size 32]
                                    [--only-rates]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from clipdq import sample_data
from clipdq.checks.compare import compare
from clipdq.checks.schemas import PREDICTIONS_SCHEMA
from clipdq.core import predict
from clipdq.core.options import ARCHS, BACKENDS
from clipdq.core.predict import default_calibration
from clipdq.core.spec import parse_spec
from clipdq.io import images
from clipdq.io.sources import access_for
from clipdq.model import towers
from clipdq.reporting import report


def make_catalog(folder: Path, n: int, *, size: int = 1600) -> Path:
    """The sample generator's catalog of n products, its photos enlarged to ``size`` px with sensor
    noise (JPEG, quality 90), like product photos straight from a camera."""
    from PIL import Image

    sample_data.generate(folder, n_labeled=0, n_catalog=n, image_size=256)
    rng = np.random.default_rng(0)
    for path in sorted((folder / "images").glob("*.jpg")):
        try:
            image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        except OSError:  # the sample's deliberately broken images stay broken
            continue
        noisy = np.asarray(image, np.int16) + rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return folder / "catalog.parquet"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def model_only(clip: towers.Clip, pixels: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """(images/s of the image tower on pixels in memory, the embeddings)."""
    towers.embed_images(clip, pixels[:batch_size], batch_size=batch_size)  # warm-up
    seconds, embeddings = timed(towers.embed_images, clip, pixels, batch_size=batch_size)
    return len(pixels) / seconds, embeddings


def probe_values(embeddings: np.ndarray, ids: list[str], truth: pl.DataFrame, spec) -> dict[str, np.ndarray]:
    """Per attribute, one prototype per value: the centred mean fp32 embedding of the images showing it.

    The benchmark's weights are random, so its captions predict one value for every image and any
    backend would agree; these prototypes tell the images apart, with margins as thin as random
    features give, which makes agreement a harder test than a trained model's."""
    centred = embeddings - embeddings.mean(axis=0)
    prototypes = {}
    for attribute in spec.attributes:
        true = dict(truth.filter(pl.col("attribute") == attribute.name).select("product_id", "true_value").iter_rows())
        labels = np.array([true.get(i) for i in ids], dtype=object)
        means = [
            centred[labels == value].mean(axis=0) if (labels == value).any() else np.zeros(centred.shape[1])
            for value in attribute.values
        ]
        prototypes[attribute.name] = np.stack([m / (np.linalg.norm(m) or 1.0) for m in means]).astype(np.float32)
    return prototypes


def hf_pipeline(folder: str, refs: list[str], base: str, spec) -> float:
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=folder, device="cpu")
    paths = [str(Path(base) / r) for r in refs]
    classifier(paths[0], candidate_labels=list(spec.attributes[0].values))  # warm-up
    started = time.perf_counter()
    for path in paths:
        for attribute in spec.attributes:
            classifier(path, candidate_labels=list(attribute.values))
    return len(paths) / (time.perf_counter() - started)


def compare_and_report(spec, n: int = 1_000_000) -> float:
    """Seconds to compare n products x the spec's attributes and summarise and render the report."""
    rng = np.random.default_rng(0)
    ids = pl.Series("product_id", [f"P{i}" for i in range(n)])
    catalog = pl.DataFrame({"product_id": ids, "image": ids, "product_type": rng.choice(["apparel", "cookware"], n)})
    predictions = []
    for attribute in spec.attributes:
        values = np.array(attribute.values, dtype=object)
        catalog = catalog.with_columns(pl.Series(attribute.name, values[rng.integers(0, len(values), n)]))
        predictions.append(
            pl.DataFrame(
                {
                    "product_id": ids,
                    "attribute": attribute.name,
                    "predicted_value": values[rng.integers(0, len(values), n)],
                    "confidence": rng.random(n),
                    "image_error": None,
                },
                schema=PREDICTIONS_SCHEMA,
            )
        )
    predictions = pl.concat(predictions)
    calibration = {name: default_calibration(spec.target_precision, spec.expected_error_rate) for name in spec.names}
    started = time.perf_counter()
    findings = compare(catalog, predictions, spec=spec, calibration=calibration)
    summary = report.summarize(findings, products=n, run={"run_id": "benchmark"}, validation={})
    report.render_html(report.featured(findings), summary, {})
    return time.perf_counter() - started


def change_images(catalog: Path, share: float) -> int:
    """Flip a share of the catalog's images left to right (new bytes); returns how many changed."""
    from PIL import Image

    refs = pl.read_parquet(catalog)["image"].to_list()
    changed = 0
    for ref in refs[: max(1, int(len(refs) * share))]:
        path = catalog.parent / ref
        if path.exists():
            try:
                Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=90)
                changed += 1
            except OSError:  # the sample's deliberately broken images
                pass
    return changed


def whole_audit(
    catalog: Path, spec_path: Path, model_dir: str, output: str, batch_size: int, **options
) -> tuple[float, dict]:
    """(seconds, the run's summary)."""
    from clipdq.core.options import AuditOptions
    from flows.audit import audit_catalog

    seconds, folder = timed(
        audit_catalog, str(catalog), str(spec_path), model_dir, output, AuditOptions(batch_size=batch_size, **options)
    )
    return seconds, json.loads((Path(folder) / "summary.json").read_text())


def peak_memory_mb(catalog: Path, rows: int, spec_path: Path, model_dir: str, output: Path) -> float:
    """Peak RSS of a CLI audit (its own process) of a catalog of ``rows`` rows cycling over the
    images of ``catalog``."""
    frame = pl.read_parquet(catalog)
    big = frame.select(pl.all().gather(np.arange(rows) % frame.height))
    big = big.with_columns(pl.format("R{}", pl.int_range(pl.len())).alias("product_id"))
    path = catalog.parent / f"catalog-{rows}.parquet"
    big.write_parquet(path)
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [
        sys.executable,
        "-c",
        measure,
        sys.executable,
        "-m",
        "clipdq.cli",
        "audit",
        "--catalog",
        str(path),
        "--spec",
        str(spec_path),
        "--model",
        model_dir,
        "--output",
        str(output),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024


def line(name: str, value: float, unit: str, target: str = "") -> None:
    print(f"{name:<52}{value:>10.2f} {unit:<10}{target}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="photos in the benchmark catalog")
    parser.add_argument("--pipeline-images", type=int, default=24, help="photos for the (slow) HF pipeline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1_000_000, help="products for the compare/report timing")
    parser.add_argument("--memory-rows", default="10000,100000", help="catalog sizes for the peak-memory audit")
    parser.add_argument("--arch", default="vit-b-32", choices=ARCHS, help="the model to time")
    parser.add_argument("--only-rates", action="store_true", help="(a) and (b) only: tower, decoding, whole audit")
    parser.add_argument(
        "--backend", default="fp32", choices=BACKENDS, help="the image tower's arithmetic in (a) and (b)"
    )
    args = parser.parse_args()
    if args.backend != "fp32" and not args.only_rates:
        parser.error("--backend applies to --only-rates (the full run compares each backend with fp32 itself)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = make_catalog(root / "data", args.images)
        spec_path = root / "data" / "spec.yaml"
        spec = parse_spec(spec_path.read_text())
        clip = towers.init_model(spec, args.arch, seed=0)
        model_dir = towers.save_model(clip, str(root / "model"))
        frame = pl.read_parquet(catalog)  # changing images later leaves the Parquet as it is
        refs = frame["image"].to_list()
        print(
            f"{args.images} photos of 1600 px, {args.arch} model, {args.backend}, {os.cpu_count()} CPU cores, "
            f"batch {args.batch_size}\n",
            flush=True,
        )

        seconds, loaded = timed(images.load_images, refs, access_for(str(root / "data")), clip.pixels)
        decode_rate = len(refs) / seconds
        readable = [ref for ref, ok in zip(refs, loaded.ok) if ok]
        model_rate, reference = model_only(towers.on_backend(clip, args.backend), loaded.pixels, args.batch_size)
        line("(a) model forward pass alone", model_rate, "images/s")
        line("    fetch + decode + preprocess alone", decode_rate, "images/s")
        options = {"backend": args.backend}
        whole_audit(catalog, spec_path, model_dir, str(root / "warm-up"), args.batch_size, **options)  # starts Prefect
        first, summary = whole_audit(catalog, spec_path, model_dir, str(root / "out"), args.batch_size, **options)
        audit_rate = summary["images"]["embedded"] / first
        slower = min(model_rate, decode_rate)
        line(
            "(b) whole audit, Parquet to findings",
            audit_rate,
            "images/s",
            f"{audit_rate / slower:.0%} of the slower of the two above; target >= 85%; "
            f"ran on {summary['backend']['used']}",
        )
        if args.only_rates:
            return 0
        again, summary = whole_audit(catalog, spec_path, model_dir, str(root / "out"), args.batch_size)
        line(
            "    second audit, unchanged catalog",
            again,
            "s",
            f"{again / first:.0%} of the first run; target <= 10%; {summary['images']['embedded']} embedded",
        )
        changed = change_images(catalog, 0.01)
        after, summary = whole_audit(catalog, spec_path, model_dir, str(root / "out"), args.batch_size)
        line(f"    after changing {changed} images", after, "s", f"{summary['images']['embedded']} embedded")
        ids = [pid for pid, ok in zip(frame["product_id"], loaded.ok) if ok]
        prototypes = probe_values(reference, ids, pl.read_parquet(root / "data" / "ground_truth.parquet"), spec)
        for backend in ("int8", "bf16"):
            rate, embeddings = model_only(towers.on_backend(clip, backend), loaded.pixels, args.batch_size)
            agreement = predict.agreement(reference, embeddings, prototypes)
            line(
                f"(f) {backend} model forward pass alone",
                rate,
                "images/s",
                f"{rate / model_rate:.1f}x fp32; same values as fp32 for {agreement:.1%} of images (bar 99%)",
            )
            seconds, summary = whole_audit(
                catalog, spec_path, model_dir, str(root / f"out-{backend}"), args.batch_size, backend=backend
            )
            rate = summary["images"]["embedded"] / seconds
            line(
                f"    whole audit with --backend {backend}",
                rate,
                "images/s",
                f"{rate / audit_rate:.1f}x the fp32 audit; ran on {summary['backend']['used']}",
            )
        pipeline_rate = hf_pipeline(model_dir, readable[: args.pipeline_images], str(root / "data"), spec)
        line(
            "(c) HF zero-shot pipeline, one call per attribute",
            pipeline_rate,
            "images/s",
            f"(b) is {audit_rate / pipeline_rate:.1f}x; target >= 5x",
        )
        peaks = {}
        for rows in (int(n) for n in args.memory_rows.split(",")):
            peaks[rows] = peak_memory_mb(catalog, rows, spec_path, model_dir, root / f"memory-{rows}")
            growth = f"; {peaks[rows] / min(peaks.values()) - 1:+.0%} from the smallest, target < +20%"
            line(
                f"(e) peak RSS, audit of {rows:,} rows (images repeat)",
                peaks[rows],
                "MB",
                "target < 2048 MB" + (growth if len(peaks) > 1 else ""),
            )
    seconds = compare_and_report(spec, args.rows)
    line(f"(d) compare + report, {args.rows:,} products x {len(spec.attributes)}", seconds, "s", "target < 15 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
