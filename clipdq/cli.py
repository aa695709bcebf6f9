"""The ``clipdq`` console script.

Commands that write something print its location (folder or URI) as the last line of standard
output, and fail with a one-line reason and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import logging
import operator
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from types import UnionType
from typing import Literal, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError

from clipdq.core.options import AuditOptions, FinetuneOptions, MatchOptions, Options

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipdq")  # library logs show in Prefect runs
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from batch jobs
# Arrow's default allocator (mimalloc) keeps what each batch of rows freed: reading a million
# rows' keys grew the process by 70 MB with it, and by 24 MB with the system allocator.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

log = logging.getLogger("clipdq")
OptionsT = TypeVar("OptionsT", bound=Options)
FAIL_ON_EXIT = 3  # `clipdq report --fail-on`: a condition held (1: an error, 2: a usage error)
CONDITION_COUNTS = ("conflict", "gap", "invalid_value", "image_error", "uncertain", "new", "resolved", "persisting")
_COMPARISONS = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


def _condition(text: str) -> tuple[str, str, int]:
    """'conflict>100' as (count, comparison, bound)."""
    match = re.fullmatch(r"\s*(\w+)\s*([<>=!]=?)\s*(\d+)\s*", text)
    if not match or match[1] not in CONDITION_COUNTS or match[2] not in _COMPARISONS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write COUNT OP N, COUNT one of {', '.join(CONDITION_COUNTS)}, "
            f"OP one of {' '.join(_COMPARISONS)}"
        )
    return match[1], match[2], int(match[3])


FLAGS = {"image_roots": "--image-root"}  # a repeatable flag names one item; the rest are the field names


def _flag_type(annotation) -> tuple[type, tuple[str, ...] | None]:
    """(the type a flag parses, its choices) for an options field's annotation."""
    if get_origin(annotation) in (Union, UnionType):  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, get_args(annotation)
    return get_origin(annotation) or annotation, None


def _add_options(parser: argparse.ArgumentParser, options: type[Options], only: tuple[str, ...] | None = None) -> None:
    """A flag for each field of ``options`` (or of those named): its type, choices and help come from
    the field; left out, the field's own default applies (so defaults live in the options only)."""
    for name, field in options.model_fields.items():
        if only is not None and name not in only:
            continue
        kind, choices = _flag_type(field.annotation)
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        default = field.get_default(call_default_factory=True)
        assert field.description is not None  # every option has one: it is the flag's help
        text = field.description.replace("%", "%%")
        if default is not None and default != [] and kind is not bool:
            text += f" (default: {default})"
        if kind is bool:
            text = ("Turns off: " if default else "") + text
            parser.add_argument(
                f"--no-{name.replace('_', '-')}" if default else flag,
                dest=name,
                default=None,
                action="store_false" if default else "store_true",
                help=text,
            )
        elif kind is list:
            parser.add_argument(
                flag, dest=name, action="append", metavar="DIR_OR_S3_PREFIX", help=text + " Repeatable."
            )
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, help=text)


def _options(args: argparse.Namespace, options: type[OptionsT]) -> OptionsT:
    """The options given on the command line; a bad value fails with the field's own message."""
    given = {name: getattr(args, name) for name in options.model_fields if getattr(args, name, None) is not None}
    try:
        return options(**given)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f"--{str(part).replace('_', '-')}: " for part in first["loc"][:1])
        raise ValueError(f"{where}{first['msg']}".replace("Value error, ", "")) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdq", description="Check product catalogs against their images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('clipdq')}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_run_commands(commands)
    _add_model_commands(commands)
    _add_report_command(commands)
    return parser


def _add_run_commands(commands) -> None:
    """demo, audit and match: the commands that write a run folder."""
    demo = commands.add_parser("demo", help="build sample data and a demo model if missing, then audit")
    demo.add_argument("--data-dir", default="sample_data", help="where the sample catalog and model live")
    demo.add_argument("--output", default="reports", help="folder or s3:// prefix for the reports")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs for the demo model (the budget)")
    demo.add_argument(
        "--max-minutes",
        type=float,
        default=15,
        help="safety cap on the demo model's training time; the output says when it is hit",
    )

    audit = commands.add_parser("audit", help="audit a catalog against its images")
    audit.add_argument("--catalog", required=True, help="Parquet file, local or s3://")
    audit.add_argument("--spec", required=True, help="spec YAML, local or s3://")
    audit.add_argument("--model", required=True, help="model folder, s3:// prefix or Hugging Face hub id")
    audit.add_argument("--output", required=True, help="folder or s3:// prefix for run folders")
    _add_options(audit, AuditOptions)

    pair = commands.add_parser(
        "match",
        help="the nearest catalog products of other photos (shelf photos, supplier "
        "images): matches.parquet in a run folder",
    )
    pair.add_argument("--references", required=True, help="the catalog matched against, Parquet, local or s3://")
    pair.add_argument("--queries", required=True, help="the photos to match: a catalog of the same form")
    pair.add_argument("--spec", required=True, help="spec YAML naming the id and image columns")
    pair.add_argument("--model", required=True, help="model folder, s3:// prefix or Hugging Face hub id")
    pair.add_argument("--output", required=True, help="folder or s3:// prefix for run folders")
    _add_options(pair, MatchOptions)


def _add_model_commands(commands) -> None:
    """finetune, learning-curve and init-model: the commands that make models."""
    finetune = commands.add_parser("finetune", help="fine-tune a CLIP on labeled products")
    finetune.add_argument("--catalog", required=True, help="labeled products, Parquet, local or s3://")
    finetune.add_argument("--spec", required=True)
    finetune.add_argument("--output", required=True, help="model folder or s3:// prefix to write")
    _add_options(finetune, FinetuneOptions)

    curve = commands.add_parser("learning-curve", help="accuracy against labeled examples per value (table and PNG)")
    curve.add_argument("--catalog", required=True, help="labeled products, Parquet, local or s3://")
    curve.add_argument("--spec", required=True)
    curve.add_argument("--output", required=True, help="folder or s3:// prefix for the table and plot")
    curve.add_argument("--sizes", default="10,30,100,300", help="labeled examples per value, comma-separated")
    _add_options(curve, FinetuneOptions, only=("base_model", "arch", "mode", "max_minutes", "group_column", "seed"))

    init = commands.add_parser(
        "init-model",
        help="a new CLIP-style model with a tokenizer for the spec: random "
        "weights, or the pretrained ImageNet tower of efficientnet-lite0",
    )
    init.add_argument("--spec", required=True)
    init.add_argument("--output", required=True)
    _add_options(init, FinetuneOptions, only=("arch", "seed"))


def _add_report_command(commands) -> None:
    show = commands.add_parser(
        "report",
        help="the latest complete run under an output folder or prefix: its "
        "summary, or with --diff what changed since the run before",
    )
    show.add_argument("output", help="the folder or s3:// prefix given to clipdq audit --output")
    show.add_argument(
        "--diff",
        nargs="*",
        metavar="RUN_ID",
        help="list new, resolved and persisting problems against the previous complete run of the "
        "same catalog, or between two given runs (older first)",
    )
    show.add_argument(
        "--fail-on",
        action="append",
        default=[],
        type=_condition,
        metavar="CONDITION",
        help=f"exit with status {FAIL_ON_EXIT} when a count passes a bound, e.g. 'conflict>100' or "
        f"'new>0' (repeatable; counts: {', '.join(CONDITION_COUNTS)})",
    )


def run_audit(catalog: str, spec: str, model: str, output: str, options: AuditOptions = AuditOptions()) -> str:
    return _run_flow("flows.audit", "audit_catalog", catalog, spec, model, output, options)


def run_finetune(args: argparse.Namespace) -> str:
    return _run_flow(
        "flows.finetune", "finetune_model", args.catalog, args.spec, args.output, _options(args, FinetuneOptions)
    )


def _train_demo_model(data: Path, output: Path, *, epochs: int, max_minutes: float) -> str:
    options = FinetuneOptions(
        arch="efficientnet-lite0", mode="locked", max_minutes=max_minutes, epochs=epochs, seed=0, views=1
    )
    return _run_flow(
        "flows.finetune", "finetune_model", str(data / "labeled.parquet"), str(data / "spec.yaml"), str(output), options
    )


def _run_flow(module: str, name: str, *args):
    """The flow ``name`` of ``module`` called with ``args``. Where no Prefect API is configured, it
    runs against a temporary server started before the flow's imports, so the two overlap (and
    waited for as long as a loaded machine needs, not Prefect's 20 s)."""
    from flows.early_server import started_early

    with started_early() as server_is_up:
        flow = getattr(importlib.import_module(module), name)
        server_is_up()
        return flow(*args)


def run_init_model(args: argparse.Namespace) -> str:
    from clipdq.core.spec import parse_spec
    from clipdq.io import storage
    from clipdq.model import towers

    spec, options = parse_spec(storage.read_bytes(args.spec).decode()), _options(args, FinetuneOptions)
    return towers.save_model(towers.init_model(spec, options.arch, seed=options.seed), args.output)


def run_learning_curve(args: argparse.Namespace) -> str:
    from clipdq.core.spec import parse_spec
    from clipdq.io import catalog, sources, storage
    from clipdq.model import towers
    from clipdq.training import curves, labeled, train, views

    spec, o = parse_spec(storage.read_bytes(args.spec).decode()), _options(args, FinetuneOptions)
    frame = catalog.read_catalog(args.catalog)
    catalog.check_schema(frame.schema, spec)

    def make_model() -> towers.Clip:
        return towers.load_model(o.base_model) if o.base_model else towers.init_model(spec, o.arch, seed=o.seed)

    first = make_model()
    config = train.config_for(first, **o.config_options())
    data = labeled.load_labeled(
        frame,
        spec,
        access=sources.catalog_access(args.catalog, spec),
        pixel_spec=views.loading_spec(first, config),
        group_column=o.group_column,
    )
    sizes = tuple(int(n) for n in args.sizes.split(","))
    table = curves.learning_curve(
        make_model, data, spec, config=config, splits=labeled.default_splits(data, config), sizes=sizes
    )
    text = curves.markdown(table)
    print(text)
    csv = io.BytesIO()
    table.write_csv(csv)
    storage.write_bytes(storage.join(args.output, "learning_curve.csv"), csv.getvalue())
    storage.write_bytes(storage.join(args.output, "learning_curve.md"), text.encode())
    title = f"{config.mode} training, {o.base_model or o.arch}"
    storage.write_bytes(storage.join(args.output, "learning_curve.png"), curves.plot_png(table, title=title))
    return args.output


def run_demo(args: argparse.Namespace) -> str:
    from clipdq.io import storage
    from flows.early_server import started_early

    with started_early() as server_is_up:  # one temporary Prefect server for the training and the audit
        folder = _demo_audit(Path(args.data_dir), args, server_is_up)
    summary = json.loads(storage.read_bytes(storage.join(folder, "summary.json")))
    t = summary["totals"]
    print(
        f"\n{summary['products']} products audited: {t['conflict']} conflicts, {t['gap']} gaps with a suggestion, "
        f"{t['invalid_value']} invalid values, {t['image_error']} image errors, {t['uncertain']} uncertain."
    )
    text = summary["text_agreement"]
    if text["checked"]:
        print(
            f"{text['flagged']} of the conflicts are images that may not show the product their {text['column']} names."
        )
    if summary["duplicates"]["checked"]:
        print(
            f"{summary['duplicates']['products']} products in {summary['duplicates']['groups']} groups of duplicate "
            "listings."
        )
    if summary["changes"]:
        c = summary["changes"]["totals"]
        print(
            f"Since the previous run: {c['new']} new, {c['resolved']} resolved, {c['persisting']} persisting problems."
        )
    print(f"Report: {storage.join(folder, 'report.html')}")
    return folder


def _demo_audit(data: Path, args: argparse.Namespace, server_is_up) -> str:
    """The sample data and the demo model, made where missing, then the audit's run folder."""
    from clipdq.sample_data import generate

    catalog, spec, model = data / "catalog.parquet", data / "spec.yaml", data / "model"
    if not catalog.exists():
        print(f"[1/3] generating the sample catalog in {data}/", flush=True)
        generate(data)
    else:
        print(f"[1/3] sample catalog found in {data}/", flush=True)
    server_is_up()
    if not (model / "clipdq.json").exists():
        print(
            f"[2/3] training the demo model (pretrained EfficientNet-Lite0 tower, locked; up to {args.epochs} "
            f"epochs) into {model}/",
            flush=True,
        )
        _train_demo_model(data, model, epochs=args.epochs, max_minutes=args.max_minutes)
        training = json.loads((model / "clipdq.json").read_text())["training"]
        print(
            f"      {training['epochs_run']} epochs, stopped by {training['stopped_by']}; "
            f"{training['total_minutes']:g} min with reading the images",
            flush=True,
        )
    else:
        print(f"[2/3] demo model found in {model}/", flush=True)
    print("[3/3] auditing the sample catalog", flush=True)
    return run_audit(str(catalog), str(spec), str(model), args.output)


def run_report(args: argparse.Namespace) -> str:
    """Print the latest run's summary or a diff; a ``--fail-on`` condition that holds ends in FAIL_ON_EXIT."""
    from clipdq.io import storage
    from clipdq.reporting import runs, terminal

    done = runs.complete_runs(args.output)
    if not done:
        raise LookupError(f"no complete run under {args.output}")
    if args.diff is not None and len(args.diff) not in (0, 2):
        raise ValueError("--diff takes no run id (the latest against the one before) or two (older first)")
    newer = runs.find_run(args.output, args.diff[1]) if args.diff else done[-1]
    summary = json.loads(storage.read_bytes(storage.join(newer, "summary.json")))
    if "totals" not in summary:
        raise LookupError(
            f"run {summary['run_id']} is not an audit (a clipdq match run?): give each job its own output"
        )
    counts = dict(summary["totals"]) | ((summary.get("changes") or {}).get("totals") or {})
    if args.diff is None:
        print(terminal.text(summary, newer))
    else:
        older = (
            runs.find_run(args.output, args.diff[0])
            if args.diff
            else runs.previous_run(args.output, summary["catalog"], before=newer)
        )
        if older is None:
            raise LookupError(f"no complete run of {summary['catalog']} before run {summary['run_id']} to compare with")
        changes = runs.changed(runs.read_problems(newer).lazy(), runs.read_problems(older))
        print(terminal.diff_text(changes, older, newer))
        counted = runs.change_counts(changes, older)
        assert counted is not None  # None only without a previous run
        counts |= counted["totals"]
    _fail_on(args.fail_on, counts, summary["run_id"], newer)
    return newer


def _fail_on(conditions: list[tuple[str, str, int]], counts: dict, run_id: str, folder: str) -> None:
    """Raise ConditionHeld when any ``--fail-on`` condition holds for the run's counts."""
    unknown = [name for name, _, _ in conditions if name not in counts]
    if unknown:
        raise ValueError(f"--fail-on {', '.join(unknown)}: run {run_id} has no earlier run to count changes against")
    held = [
        f"{name}{op}{bound} ({name} = {counts[name]})"
        for name, op, bound in conditions
        if _COMPARISONS[op](counts[name], bound)
    ]
    if held:
        _LAST_WORDS.append(f"clipdq report: failing on {'; '.join(held)}")
        raise ConditionHeld(folder)


class ConditionHeld(Exception):
    """A ``--fail-on`` condition held: the run folder is still printed, the exit status says so."""


class ProgressBar(logging.Filter):
    """On a terminal, log records that carry ``extra={"progress": (done, total)}`` redraw one bar
    line instead of printing a line each; every other record passes as it is."""

    WIDTH = 30

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream, self.open = stream, False

    def filter(self, record: logging.LogRecord) -> bool:
        progress = getattr(record, "progress", None)
        if progress is None:
            self._end_line()
            return True
        done, total = progress
        filled = self.WIDTH * done // max(total, 1)
        self.stream.write(f"\r{record.getMessage()[:70]:<70} [{'#' * filled}{'.' * (self.WIDTH - filled)}]")
        self.stream.flush()
        self.open = True
        if done >= total:
            self._end_line()
        return False

    def _end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False


_LAST_WORDS: list[str] = []


@atexit.register  # registered before Prefect's shutdown handlers, so it runs after them
def _print_last_words() -> None:
    for line in _LAST_WORDS:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log.setLevel(logging.INFO)  # Prefect's console handler shows these inside flows
    if sys.stderr.isatty():  # else progress stays log lines, as a log file wants it
        logging.getLogger("clipdq.progress").addFilter(ProgressBar(sys.stderr))
    commands = {
        "demo": run_demo,
        "audit": lambda a: run_audit(a.catalog, a.spec, a.model, a.output, _options(a, AuditOptions)),
        "finetune": run_finetune,
        "match": lambda a: _run_flow(
            "flows.match",
            "match_catalogs",
            a.references,
            a.queries,
            a.spec,
            a.model,
            a.output,
            _options(a, MatchOptions),
        ),
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
