"""The ``clipdq`` console script.

Commands that write something print its location (folder or URI) as the last line of standard
output, and fail with a one-line reason and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import logging
import operator
import os
import re
import sys
from importlib import metadata
from pathlib import Path

from clipdq.options import ARCHS, BACKENDS, MODES

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipdq")  # library logs show in Prefect runs
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from batch jobs
# Arrow's default allocator (mimalloc) keeps what each batch of rows freed: reading a million
# rows' keys grew the process by 70 MB with it, and by 24 MB with the system allocator.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

log = logging.getLogger("clipdq")
GROUP_HELP = ("rows with the same value here (product family, photo session) stay on one side of every split; "
              "without it, near-duplicate images are grouped")
IMAGE_ROOT_HELP = ("a folder or s3:// prefix outside the catalog's own that images may come from (repeatable; "
                   "adds to the spec's image_roots)")
MODE_HELP = ("full: fine-tune both towers on pixels; locked: keep the image tower frozen (but --unlock-blocks) "
             "and train the text tower and projections on its kept activations; prototype: learn value embeddings "
             "on frozen images. Default: locked for a pretrained image tower with a new text tower, else full")


FAIL_ON_EXIT = 3  # `clipdq report --fail-on`: a condition held (1: an error, 2: a usage error)
CONDITION_COUNTS = ("conflict", "gap", "invalid_value", "image_error", "uncertain", "new", "resolved", "persisting")
_COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
                "!=": operator.ne}


def _condition(text: str) -> tuple[str, str, int]:
    """'conflict>100' as (count, comparison, bound)."""
    match = re.fullmatch(r"\s*(\w+)\s*([<>=!]=?)\s*(\d+)\s*", text)
    if not match or match[1] not in CONDITION_COUNTS or match[2] not in _COMPARISONS:
        raise argparse.ArgumentTypeError(f"{text!r}: write COUNT OP N, COUNT one of {', '.join(CONDITION_COUNTS)}, "
                                         f"OP one of {' '.join(_COMPARISONS)}")
    return match[1], match[2], int(match[3])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdq", description="Check product catalogs against their images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('clipdq')}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build sample data and a demo model if missing, then audit")
    demo.add_argument("--data-dir", default="sample_data", help="where the sample catalog and model live")
    demo.add_argument("--output", default="reports", help="folder or s3:// prefix for the reports")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs for the demo model (the budget)")
    demo.add_argument("--max-minutes", type=float, default=15,
                      help="safety cap on the demo model's training time; the output says when it is hit")

    audit = commands.add_parser("audit", help="audit a catalog against its images")
    audit.add_argument("--catalog", required=True, help="Parquet file, local or s3://")
    audit.add_argument("--spec", required=True, help="spec YAML, local or s3://")
    audit.add_argument("--model", required=True, help="model folder, s3:// prefix or Hugging Face hub id")
    audit.add_argument("--output", required=True, help="folder or s3:// prefix for run folders")
    audit.add_argument("--batch-size", type=int, default=64, help="images per model call")
    audit.add_argument("--cross-fit", type=int, default=0, metavar="K",
                       help="audit the model's own training catalog honestly: score each of K folds with --model "
                       "fine-tuned on the other folds")
    audit.add_argument("--fold-minutes", type=float, help="training time budget per fold with --cross-fit")
    audit.add_argument("--group-column", help=GROUP_HELP)
    audit.add_argument("--no-embedding-cache", dest="embedding_cache", action="store_false",
                       help="embed every image again instead of reusing embeddings kept beside the reports")
    audit.add_argument("--image-root", dest="image_roots", action="append", metavar="DIR_OR_S3_PREFIX",
                       help=IMAGE_ROOT_HELP)
    audit.add_argument("--backend", default="fp32", choices=BACKENDS,
                       help="a faster image tower (int8 on CPU, bf16), used where its predictions on the first "
                       "batch agree with fp32 for at least 99%% of the images")

    audit.add_argument("--rows-per-shard", type=int, default=20_000,
                       help="catalog rows per shard: the unit of work that runs on one worker and is kept "
                       "when a killed run is started again")
    audit.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="run the shards on this Dask cluster")
    audit.add_argument("--workers", type=int, default=0,
                       help="run the shards on a local Dask cluster of this many processes")

    finetune = commands.add_parser("finetune", help="fine-tune a CLIP on labeled products")
    finetune.add_argument("--catalog", required=True, help="labeled products, Parquet, local or s3://")
    finetune.add_argument("--spec", required=True)
    finetune.add_argument("--output", required=True, help="model folder or s3:// prefix to write")
    finetune.add_argument("--base-model", help="start from this CLIP (folder, s3:// or hub id); "
                          "default: a new one of --arch")
    finetune.add_argument("--arch", default="tiny", choices=ARCHS)
    finetune.add_argument("--max-minutes", type=float, help="safety cap on training time (the budget is --epochs)")
    finetune.add_argument("--epochs", type=int, help="the training budget in epochs (default: 40 for a pretrained "
                          "image tower with a new text tower, else 100)")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--mode", choices=MODES, help=MODE_HELP)
    finetune.add_argument("--unlock-blocks", type=int, help="locked mode: top EfficientNet blocks that train too")
    finetune.add_argument("--views", type=int, help="locked mode: kept views per training image (plain + augmented)")
    finetune.add_argument("--val-fraction", type=float, default=0.2, help="share of products for validation")
    finetune.add_argument("--test-fraction", type=float, default=0.1, help="share held out for the model card")
    finetune.add_argument("--group-column", help=GROUP_HELP)
    finetune.add_argument("--image-root", dest="image_roots", action="append", metavar="DIR_OR_S3_PREFIX",
                          help=IMAGE_ROOT_HELP)
    finetune.add_argument("--label-noise", type=float, default=0.0,
                          help="share of wrong labels to allow for in calibration (0 for curated labels)")

    curve = commands.add_parser("learning-curve", help="accuracy against labeled examples per value (table and PNG)")
    curve.add_argument("--catalog", required=True, help="labeled products, Parquet, local or s3://")
    curve.add_argument("--spec", required=True)
    curve.add_argument("--output", required=True, help="folder or s3:// prefix for the table and plot")
    curve.add_argument("--base-model", help="start each point from this CLIP; default: a new one of --arch")
    curve.add_argument("--arch", default="tiny", choices=ARCHS)
    curve.add_argument("--mode", choices=MODES, help=MODE_HELP)
    curve.add_argument("--sizes", default="10,30,100,300", help="labeled examples per value, comma-separated")
    curve.add_argument("--max-minutes", type=float, help="safety cap on training time per point")
    curve.add_argument("--group-column", help=GROUP_HELP)
    curve.add_argument("--seed", type=int, default=0)

    show = commands.add_parser("report", help="the latest complete run under an output folder or prefix: its "
                               "summary, or with --diff what changed since the run before")
    show.add_argument("output", help="the folder or s3:// prefix given to clipdq audit --output")
    show.add_argument("--diff", nargs="*", metavar="RUN_ID",
                      help="list new, resolved and persisting problems against the previous complete run of the "
                      "same catalog, or between two given runs (older first)")
    show.add_argument("--fail-on", action="append", default=[], type=_condition, metavar="CONDITION",
                      help=f"exit with status {FAIL_ON_EXIT} when a count passes a bound, e.g. 'conflict>100' or "
                      f"'new>0' (repeatable; counts: {', '.join(CONDITION_COUNTS)})")

    init = commands.add_parser("init-model", help="a new CLIP-style model with a tokenizer for the spec: random "
                               "weights, or the pretrained ImageNet tower of efficientnet-lite0")
    init.add_argument("--spec", required=True)
    init.add_argument("--arch", default="tiny", choices=ARCHS)
    init.add_argument("--output", required=True)
    init.add_argument("--seed", type=int, default=0)
    return parser


def run_audit(catalog: str, spec: str, model: str, output: str, **options) -> str:
    from flows.early_server import started_early

    with started_early() as server_is_up:  # its start-up overlaps the imports below
        from flows.audit import audit_catalog

        server_is_up()
        return audit_catalog(catalog, spec, model, output, **options)


def run_finetune(args: argparse.Namespace) -> str:
    from flows.finetune import finetune_model

    return finetune_model(args.catalog, args.spec, args.output, base_model=args.base_model, arch=args.arch,
                          max_minutes=args.max_minutes, epochs=args.epochs, seed=args.seed, mode=args.mode,
                          val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                          label_noise=args.label_noise, group_column=args.group_column,
                          unlock_blocks=args.unlock_blocks, views=args.views, image_roots=args.image_roots)


def _train_demo_model(data: Path, output: Path, *, epochs: int, max_minutes: float) -> str:
    from flows.finetune import finetune_model

    return finetune_model(str(data / "labeled.parquet"), str(data / "spec.yaml"), str(output),
                          arch="efficientnet-lite0", max_minutes=max_minutes, epochs=epochs, seed=0, views=1)


def run_init_model(args: argparse.Namespace) -> str:
    from clipdq import model, storage
    from clipdq.spec import parse_spec

    spec = parse_spec(storage.read_bytes(args.spec).decode())
    return model.save_model(model.init_model(spec, args.arch, seed=args.seed), args.output)


def run_learning_curve(args: argparse.Namespace) -> str:
    from clipdq import catalog, curves, model, sources, storage, train
    from clipdq.spec import parse_spec

    spec = parse_spec(storage.read_bytes(args.spec).decode())
    frame = catalog.read_catalog(args.catalog)
    catalog.check_schema(frame.schema, spec)

    def make_model() -> model.Clip:
        return model.load_model(args.base_model) if args.base_model else model.init_model(spec, args.arch, seed=args.seed)

    first = make_model()
    config = train.config_for(first, mode=args.mode, max_minutes=args.max_minutes, seed=args.seed,
                              group_column=args.group_column)
    data = train.load_labeled(frame, spec, access=sources.catalog_access(args.catalog, spec), pixel_spec=first.pixels,
                              group_column=args.group_column)
    sizes = tuple(int(n) for n in args.sizes.split(","))
    table = curves.learning_curve(make_model, data, spec, config=config, splits=train.default_splits(data, config),
                                  sizes=sizes)
    text = curves.markdown(table)
    print(text)
    csv = io.BytesIO()
    table.write_csv(csv)
    storage.write_bytes(storage.join(args.output, "learning_curve.csv"), csv.getvalue())
    storage.write_bytes(storage.join(args.output, "learning_curve.md"), text.encode())
    title = f"{config.mode} training, {args.base_model or args.arch}"
    storage.write_bytes(storage.join(args.output, "learning_curve.png"), curves.plot_png(table, title=title))
    return args.output


def run_demo(args: argparse.Namespace) -> str:
    from clipdq import storage
    from clipdq.sample_data import generate

    data = Path(args.data_dir)
    catalog, spec, model = data / "catalog.parquet", data / "spec.yaml", data / "model"
    if not catalog.exists():
        print(f"[1/3] generating the sample catalog in {data}/", flush=True)
        generate(data)
    else:
        print(f"[1/3] sample catalog found in {data}/", flush=True)
    if not (model / "clipdq.json").exists():
        print(f"[2/3] training the demo model (pretrained EfficientNet-Lite0 tower, locked; up to {args.epochs} "
              f"epochs) into {model}/", flush=True)
        _train_demo_model(data, model, epochs=args.epochs, max_minutes=args.max_minutes)
        training = json.loads((model / "clipdq.json").read_text())["training"]
        print(f"      {training['epochs_run']} epochs, stopped by {training['stopped_by']}; "
              f"{training['total_minutes']:g} min with reading the images", flush=True)
    else:
        print(f"[2/3] demo model found in {model}/", flush=True)
    print("[3/3] auditing the sample catalog", flush=True)
    folder = run_audit(str(catalog), str(spec), str(model), args.output)
    summary = json.loads(storage.read_bytes(storage.join(folder, "summary.json")))
    t = summary["totals"]
    print(f"\n{summary['products']} products audited: {t['conflict']} conflicts, {t['gap']} gaps with a suggestion, "
          f"{t['invalid_value']} invalid values, {t['image_error']} image errors, {t['uncertain']} uncertain.")
    print(f"Report: {storage.join(folder, 'report.html')}")
    return folder


def run_report(args: argparse.Namespace) -> str:
    """Print the latest run's summary or a diff; a ``--fail-on`` condition that holds ends in FAIL_ON_EXIT."""
    from clipdq import report, runs, storage

    done = runs.complete_runs(args.output)
    if not done:
        raise LookupError(f"no complete run under {args.output}")
    if args.diff is not None and len(args.diff) not in (0, 2):
        raise ValueError("--diff takes no run id (the latest against the one before) or two (older first)")
    newer = runs.find_run(args.output, args.diff[1]) if args.diff else done[-1]
    summary = json.loads(storage.read_bytes(storage.join(newer, "summary.json")))
    counts = dict(summary["totals"]) | ((summary.get("changes") or {}).get("totals") or {})
    if args.diff is None:
        print(report.text(summary, newer))
    else:
        older = (runs.find_run(args.output, args.diff[0]) if args.diff
                 else runs.previous_run(args.output, summary["catalog"], before=newer))
        if older is None:
            raise LookupError(f"no complete run of {summary['catalog']} before run {summary['run_id']} to compare with")
        changes = runs.changed(runs.read_problems(newer).lazy(), runs.read_problems(older))
        print(report.diff_text(changes, older, newer))
        counts |= runs.change_counts(changes, older)["totals"]
    unknown = [name for name, _, _ in args.fail_on if name not in counts]
    if unknown:
        raise ValueError(f"--fail-on {', '.join(unknown)}: run {summary['run_id']} has no earlier run to count "
                         "changes against")
    held = [f"{name}{op}{bound} ({name} = {counts[name]})" for name, op, bound in args.fail_on
            if _COMPARISONS[op](counts[name], bound)]
    if held:
        _LAST_WORDS.append(f"clipdq report: failing on {'; '.join(held)}")
        raise ConditionHeld(newer)
    return newer


class ConditionHeld(Exception):
    """A ``--fail-on`` condition held: the run folder is still printed, the exit status says so."""


_LAST_WORDS: list[str] = []


@atexit.register  # registered before Prefect's shutdown handlers, so it runs after them
def _print_last_words() -> None:
    for line in _LAST_WORDS:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.setLevel(logging.INFO)  # Prefect's console handler shows these inside flows
    commands = {
        "demo": run_demo,
        "audit": lambda a: run_audit(a.catalog, a.spec, a.model, a.output, batch_size=a.batch_size,
                                     cross_fit=a.cross_fit, fold_minutes=a.fold_minutes,
                                     group_column=a.group_column, embedding_cache=a.embedding_cache,
                                     backend=a.backend, image_roots=a.image_roots,
                                     rows_per_shard=a.rows_per_shard, dask_address=a.dask_address,
                                     workers=a.workers),
        "finetune": run_finetune,
        "init-model": run_init_model,
        "learning-curve": run_learning_curve,
        "report": run_report,
    }
    try:
        location = commands[args.command](args)
    except ConditionHeld as held:
        print(held.args[0])
        return FAIL_ON_EXIT
    except Exception as error:  # noqa: BLE001 - the CLI's contract: one line, non-zero exit
        log.debug("failed", exc_info=True)
        _LAST_WORDS.append(f"clipdq {args.command}: error: {type(error).__name__}: {error}".splitlines()[0])
        return 1
    print(location)
    return 0


if __name__ == "__main__":
    sys.exit(main())
