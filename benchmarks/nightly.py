"""What a nightly audit costs, measured as its user runs it: whole ``clipdq audit`` processes,
from start to exit, timed by the clock and their peak memory (RSS) read from the OS.

On generated 1600 px product photos and the pretrained EfficientNet-Lite0 dual encoder
(``clipdq init-model --arch efficientnet-lite0``):

(a) the first audit of a catalog of ``--images`` photos, an unchanged rerun (its share of the
    first), and a rerun after 1% of the images changed (what was read and embedded again), with a
    served Prefect (``prefect server start``, as deployments run) and with the temporary server a
    command starts where no Prefect API is configured;
(b) shards on a local 2-process Dask cluster (``--workers 2``) against one process, on the same
    catalog and cache: time, and whether the findings are identical;
(c) peak RSS and time of audits of ``--memory-rows`` rows cycling over those photos, with a cache
    that already holds their embeddings.

    python benchmarks/nightly.py [--images 1024] [--memory-rows 100000,1000000] [--skip-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
from throughput import change_images, line, make_catalog

MEASURE = (
    "import resource, subprocess, sys, time; t = time.monotonic(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.stdout[-2000:], r.stderr[-3000:] if r.returncode else '', sep='\\n'); "
    "print(r.returncode, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


ENV = dict(os.environ)  # the environment of the audits: with PREFECT_API_URL once a server is served


@contextlib.contextmanager
def served_prefect(home: Path):
    """``prefect server start`` on a free loopback port; the audits meanwhile use it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        ENV.update(env)
        yield
    finally:
        for key in env:
            ENV.pop(key, None)
        ENV.update(os.environ)
        server.terminate()
        server.wait(timeout=30)


def audit(catalog: Path, spec: Path, model_dir: str, output: Path, *extra: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, run folder) of one ``clipdq audit`` process."""
    command = [
        sys.executable,
        "-c",
        MEASURE,
        sys.executable,
        "-m",
        "clipdq.cli",
        "audit",
        "--catalog",
        str(catalog),
        "--spec",
        str(spec),
        "--model",
        model_dir,
        "--output",
        str(output),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=ENV)
    code, seconds, rss_kb = result.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"audit failed:\n{result.stdout[-4000:]}")
    folder = [row for row in result.stdout.splitlines() if "run_id=" in row][-1].strip()
    return float(seconds), int(rss_kb) / 1024, folder


def images_line(folder: str) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())["images"]


def findings(folder: str) -> pl.DataFrame:
    return pl.read_parquet(Path(folder) / "findings.parquet")


def cycled(catalog: Path, rows: int) -> Path:
    """A catalog of ``rows`` products cycling over the images of ``catalog``."""
    frame = pl.read_parquet(catalog)
    big = frame.select(pl.all().gather(np.arange(rows) % frame.height))
    big = big.with_columns(pl.format("R{}", pl.int_range(pl.len())).alias("product_id"))
    path = catalog.parent / f"catalog-{rows}.parquet"
    big.write_parquet(path, row_group_size=20_000)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--memory-rows", default="100000,1000000", help='catalog sizes for peak memory ("" for none)')
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--only-memory", action="store_true", help="warm the cache with one audit, then (c) only")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = make_catalog(root / "data", args.images)
        spec = root / "data" / "spec.yaml"
        model_dir = str(root / "model")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "clipdq.cli",
                "init-model",
                "--spec",
                str(spec),
                "--arch",
                "efficientnet-lite0",
                "--output",
                model_dir,
            ],
            check=True,
            capture_output=True,
        )
        print(
            f"{args.images} photos of 1600 px, efficientnet-lite0, fp32, {os.cpu_count()} CPU cores; "
            "whole `clipdq audit` processes\n",
            flush=True,
        )
        if args.only_memory:
            with served_prefect(root / "prefect"):
                audit(catalog, spec, model_dir, root / "out-served")
                _dask_and_memory(args, catalog, spec, model_dir, root, root / "out-served", dask=False)
            return 0
        first_runs = {}
        for mode in ("temporary server", "served Prefect"):
            with served_prefect(root / "prefect") if mode == "served Prefect" else contextlib.nullcontext():
                out = root / f"out-{mode.split()[0]}"
                first_runs[mode], rss, folder = audit(catalog, spec, model_dir, out)
                line(
                    f"(a) first audit, {mode}",
                    first_runs[mode],
                    "s",
                    f"{images_line(folder)['embedded']} embedded; peak RSS {rss:,.0f} MB",
                )
                again, _, folder = audit(catalog, spec, model_dir, out)
                seen = images_line(folder)
                line(
                    f"    unchanged rerun, {mode}",
                    again,
                    "s",
                    f"{again / first_runs[mode]:.1%} of the first; target <= 10%; "
                    f"{seen['unread']} of {seen['scored']} images not read, {seen['embedded']} embedded",
                )
        with served_prefect(root / "prefect"):
            changed = change_images(catalog, 0.01)
            after, _, folder = audit(catalog, spec, model_dir, out)
            seen = images_line(folder)
            line(
                f"    rerun after {changed} images changed",
                after,
                "s",
                f"{seen['scored'] - seen['unread']} read again, {seen['embedded']} embedded",
            )
            _dask_and_memory(args, catalog, spec, model_dir, root, out)
    return 0


def _dask_and_memory(
    args, catalog: Path, spec: Path, model_dir: str, root: Path, out: Path, *, dask: bool = True
) -> None:
    if dask and not args.skip_dask:
        sharded = cycled(catalog, 4 * args.images)  # four shards' worth
        for name, extra in (("one process", ()), ("--workers 2", ("--workers", "2"))):
            seconds, rss, folder = audit(
                sharded,
                spec,
                model_dir,
                root / f"dask-{name}",
                "--rows-per-shard",
                str(args.images),
                *extra,
                "--no-embedding-cache",
            )
            line(
                f"(b) {len(pl.read_parquet(sharded)):,} rows, 4 shards, {name}", seconds, "s", f"peak RSS {rss:,.0f} MB"
            )
            if name == "one process":
                reference = findings(folder)
            else:
                same = findings(folder).drop("confidence").equals(reference.drop("confidence"))
                gap = (findings(folder)["confidence"] - reference["confidence"]).abs().max()
                print(f"    findings identical to one process: {same} (largest confidence difference {gap:.2g})")
    peaks = {}
    for rows in (int(n) for n in args.memory_rows.split(",") if n):
        seconds, peaks[rows], folder = audit(cycled(catalog, rows), spec, model_dir, out)
        growth = f", {peaks[rows] / min(peaks.values()) - 1:+.0%} from the smallest" if len(peaks) > 1 else ""
        line(
            f"(c) peak RSS, {rows:,} rows, cache warm",
            peaks[rows],
            "MB",
            f"target < 2048 MB, growth < +20%{growth}; {seconds:.0f} s, {rows / seconds:,.0f} rows/s",
        )


if __name__ == "__main__":
    sys.exit(main())
