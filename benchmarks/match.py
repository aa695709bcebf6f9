"""Product matching, measured as its users run it.

(a) Grocery Store: the catalog ("iconic") image of each of the 81 products as references and the
    dataset's 296 ``val`` shelf photos (other sessions than any training photo) as queries, through
    ``clipdq match`` timed from start to exit: top-1 and top-5 accuracy, for the pretrained tower as
    ``clipdq init-model`` makes it and, with ``--finetuned M``, for a model fine-tuned on the
    ``train`` photos (``benchmarks/grocery_cli.py`` makes one; several, one per training seed, give
    mean and range), with the defaults: references with their catalog values of the three levels,
    and without attribute columns (image similarity alone).
(b) Scale: ``--queries`` x ``--references`` random 256-d embeddings (the EfficientNet dual
    encoder's size) through the exact blockwise top-k, in a child process: time and the OS's peak RSS.
(c) The approximate index (``clipdq.checks.index``, faiss's inverted lists) on ``--approximate-references``
    clustered 256-d embeddings (products' centres plus noise: random embeddings have no neighbours
    for an index to find), ``--approximate-queries`` queries: its recall of the exact top-5, time to
    build and search, and peak RSS, in a child process.

    python benchmarks/match.py [--data DIR] [--finetuned MODEL ...] [--queries 100000] [--references 1000000]
        [--approximate-references 2000000] [--approximate-queries 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from grocery import DEFAULT_DATA, LEVELS, catalog_images, load_catalog, write_spec
from grocery_cli import clipdq

from clipdq.checks.match import RESCORED_CANDIDATES

SCALE = """
import sys, time, numpy as np
from clipdq.checks import match
from clipdq.checks import neighbours
m, n, d = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(0)
references = rng.standard_normal((n, d), dtype=np.float32)
queries = rng.standard_normal((m, d), dtype=np.float32)
started = time.monotonic()
found = neighbours.top_k(queries, references, k=5)
print(time.monotonic() - started, found.indices.shape)
"""

APPROXIMATE = """
import sys, tempfile, time, numpy as np
from clipdq.checks import index, match
m, n, d, products = (int(v) for v in sys.argv[1:5])
rng = np.random.default_rng(0)
centres = rng.standard_normal((products, d), dtype=np.float32)
def photos(count):  # each a product's centre plus as much noise again: cosine to the centre about 0.7
    out, picks = np.empty((count, d), np.float32), rng.integers(0, products, count)
    for start in range(0, count, 100_000):
        part = picks[start:start + 100_000]
        out[start:start + len(part)] = centres[part] + rng.standard_normal((len(part), d), dtype=np.float32)
    return out, picks
def recall_of(found, exact):  # share of the exact top-5 that ``found`` holds
    return np.mean([len(set(a) & set(e)) / 5 for a, e in zip(found.indices, exact.indices)])
(references, reference_products), (queries, _) = photos(n), photos(m)
def timed(call):
    started = time.monotonic()
    return call(), time.monotonic() - started
folder = tempfile.mkdtemp()  # the index kept as ``clipdq match`` keeps it beside the embedding cache
keys = [f"image-{i}" for i in range(n)]
def build_and_keep():  # as the first run does: built, kept, and let go
    index.kept(references, keys, folder)
_, build_s = timed(build_and_keep)
(built, read), read_s = timed(lambda: index.kept(references, keys, folder))  # as the next runs: read
assert read
approximate, search_s = timed(lambda: index.top_k(queries, references, k=5, built=built))
exact, exact_s = timed(lambda: neighbours.top_k(queries, references, k=5))
recall = recall_of(approximate, exact)
top1 = np.mean(approximate.indices[:, 0] == exact.indices[:, 0])
# the agreement: two attributes that follow the product (10 and 100 values), each value's embedding the mean of
# its products' centres; a tenth of the references without a catalog value; on the first 1,000 queries
values = [rng.permutation(products) % v for v in (10, 100)]  # every value held by some products
value_emb = [neighbours.normalised(np.stack([centres[of == v].mean(0) for v in range(of.max() + 1)])) for of in values]
codes = [np.where(rng.random(n) < 0.1, -1, of[reference_products]) for of in values]
agreement = neighbours.ValueAgreement(["a", "b"], value_emb, [10.0, 10.0], codes, weight=0.1)
few = queries[:1000]
candidates, candidates_s = timed(lambda: index.top_k(few, references, k=match.RESCORED_CANDIDATES, built=built))
rescored, rescore_s = timed(lambda: neighbours.rescore(candidates, few, references, agreement, k=5))
exact_both, exact_both_s = timed(lambda: neighbours.top_k(few, references, k=5, agreement=agreement))
recall_both = recall_of(rescored, exact_both)
print(build_s, read_s, search_s, exact_s, recall, top1, index.lists_for(n), index.PROBES,
      candidates_s, rescore_s, exact_both_s, recall_both)
"""


def grocery_catalogs(data: Path, work: Path) -> tuple[Path, Path, Path, Path]:
    """(references with their catalog values of the three levels, the same without them, queries,
    spec): iconic images by class name; val photos labeled with theirs."""
    references, bare, queries = work / "references.parquet", work / "bare.parquet", work / "queries.parquet"
    iconic = catalog_images(data).select(pl.col("fine").alias("product_id"), "image", *LEVELS)
    iconic.write_parquet(references)
    iconic.select("product_id", "image").write_parquet(bare)
    frame = load_catalog(data)
    val = frame.filter(pl.col("split") == "holdout")
    val.select("product_id", "image", pl.col("fine").alias("expected_id")).write_parquet(queries)
    return references, bare, queries, write_spec(frame, data, work / "spec.yaml")  # the spec grocery_cli.py uses


def matched(work: Path, spec: Path, queries: Path, model_uri: str, references: Path, search: str = "auto") -> dict:
    """One whole ``clipdq match`` with the defaults (``search`` aside): its summary, and its seconds."""
    seconds, folder = clipdq(
        "match",
        *("--references", str(references), "--queries", str(queries), "--spec", str(spec), "--model", model_uri),
        *("--output", str(work / "out"), "--label-column", "expected_id", "--no-embedding-cache", "--search", search),
    )
    return json.loads((Path(folder) / "summary.json").read_text()) | {"seconds": seconds}


def report(name: str, summary: dict) -> None:
    acc = summary["accuracy"]
    print(
        f"(a) {name}: top-1 {acc['top_1']:.3f}, top-5 {acc['top_5']:.3f} over {acc['labeled_queries']} val photos, "
        f"{summary['references']} references; score: {summary['score']['formula']} ({summary['score']['why']}); "
        f"same-image pairs left out: {summary['same_image_excluded']['pairs']}; "
        f"clipdq match {summary['seconds']:.1f} s",
        flush=True,
    )


def grocery(data: Path, finetuned: list[str]) -> None:
    """The pretrained tower once, then each fine-tuned model (one per training seed) with references
    that carry their category columns and without them; mean and range over the models."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        references, bare, queries, spec = grocery_catalogs(data, work)
        _, pretrained = clipdq(
            "init-model", "--spec", str(spec), "--arch", "efficientnet-lite0", "--output", str(work / "model")
        )
        report("pretrained tower, new projection", matched(work, spec, queries, pretrained, references))
        settings = {
            "references with their category values": references,
            "references without attribute columns (by image alone)": bare,
        }
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
        for model in finetuned:
            for name, catalog in settings.items():
                summary = matched(work, spec, queries, model, catalog)
                report(f"{model}, {name}", summary)
                figures[name].append((summary["accuracy"]["top_1"], summary["accuracy"]["top_5"]))
        for name, pairs in figures.items():
            if len(pairs) > 1:
                top1, top5 = np.array(pairs).T
                print(
                    f"(a) {len(pairs)} models, {name}: top-1 {top1.mean():.3f} ({top1.min():.3f} to {top1.max():.3f}), "
                    f"top-5 {top5.mean():.3f} ({top5.min():.3f} to {top5.max():.3f})",
                    flush=True,
                )
        if finetuned:
            summary = matched(work, spec, queries, finetuned[0], references, "approximate")
            report(f"{finetuned[0]} through the approximate index (81 references: one cell)", summary)


def scale(queries: int, references: int) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SCALE, str(queries), str(references), "256"], capture_output=True, text=True, check=True
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    inner = float(result.stdout.split()[0])
    print(
        f"(b) {queries:,} queries x {references:,} references, 256-d, exact top-5: {inner:.0f} s in top_k "
        f"({queries * references / inner / 1e6:,.0f} M pairs/s), {time.monotonic() - started:.0f} s whole process; "
        f"peak RSS {peak:,.0f} MB (target < 2048 MB)",
        flush=True,
    )


def approximate(queries: int, references: int) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", APPROXIMATE, str(queries), str(references), "256", str(references // 100)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the larger of (b)'s and this child's
    figures = [float(v) for v in result.stdout.split()]
    (
        build_s,
        read_s,
        search_s,
        exact_s,
        recall,
        top1,
        lists,
        probes,
        candidates_s,
        rescore_s,
        exact_both_s,
        recall_both,
    ) = figures
    print(
        f"(c) approximate index, {queries:,} queries x {references:,} clustered references ({references // 100:,} "
        f"products), {lists:.0f} lists, {probes:.0f} probes: recall of the exact top-5 {recall:.3f}, same first "
        f"{top1:.3f}; {build_s:.0f} s to build and keep the index, {read_s:.1f} s to read it kept, {search_s:.0f} s to "
        f"search (exact: {exact_s:.0f} s)",
        flush=True,
    )
    print(
        f"    with the attribute agreement (1,000 queries, {RESCORED_CANDIDATES} candidates by image rescored): "
        f"recall of the exact top-5 {recall_both:.3f}; {candidates_s:.1f} s to search, {rescore_s:.1f} s to "
        f"rescore (exact with the agreement: {exact_both_s:.0f} s); {time.monotonic() - started:.0f} s whole "
        f"process; peak RSS {peak:,.0f} MB",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--finetuned",
        nargs="*",
        default=[],
        help="models fine-tuned on the Grocery train photos, one per training seed",
    )
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--references", type=int, default=1_000_000)
    parser.add_argument("--skip-grocery", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--approximate-queries", type=int, default=10_000)
    parser.add_argument("--approximate-references", type=int, default=2_000_000, help="0: skip (c)")
    args = parser.parse_args()
    if not args.skip_grocery:
        if not (args.data / "classes.csv").exists():
            print(f"Grocery Store dataset not found at {args.data}: skipping (a)")
        else:
            grocery(args.data, args.finetuned)
    if not args.skip_scale:
        scale(args.queries, args.references)
    if args.approximate_references:
        approximate(args.approximate_queries, args.approximate_references)
    return 0


if __name__ == "__main__":
    sys.exit(main())
