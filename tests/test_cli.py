"""The ``clipdq`` console script, run as a real child process.

Commands that run a flow start Prefect's temporary server (no PREFECT_API_URL), so each takes
about half a minute. All are marked ``subprocess``; they stay in the default run.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_flow import assert_planted_flags_found

from clipdq import cli
from clipdq.model import towers

pytestmark = pytest.mark.subprocess

ERROR_PREFIX = "clipdq {command}: error: "


def clipdq(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipdq.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def reason_lines(result: subprocess.CompletedProcess, command: str) -> list[str]:
    prefix = ERROR_PREFIX.format(command=command)
    return [line for line in result.stderr.splitlines() if line.startswith(prefix)]


def test_init_model_prints_the_folder_it_wrote(cli_env, sample_dir, tmp_path):
    output = tmp_path / "init-model"

    result = clipdq(
        cli_env, "init-model", "--spec", str(sample_dir / "spec.yaml"), "--output", str(output), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == str(output)
    clip = towers.load_model(str(output), device="cpu")
    assert clip.meta.arch == "tiny" and clip.meta.trained is False


def test_init_model_with_bad_yaml_fails_with_a_one_line_reason(cli_env, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("attributes: [unclosed\n")

    result = clipdq(cli_env, "init-model", "--spec", str(spec), "--output", str(tmp_path / "m"), cwd=tmp_path)

    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith("clipdq init-model: error: SpecError: spec is not valid YAML")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def finetuned(cli_env, sample_dir, flagging_labeled_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``clipdq init-model --arch efficientnet-lite0``, then ``clipdq finetune`` from it (locked mode)."""
    folder = tmp_path_factory.mktemp("cli-finetune")
    init = clipdq(
        cli_env,
        "init-model",
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--arch",
        "efficientnet-lite0",
        "--output",
        str(folder / "init"),
        cwd=folder,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    result = clipdq(
        cli_env,
        "finetune",
        "--catalog",
        str(flagging_labeled_dir / "labeled.parquet"),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--base-model",
        str(folder / "init"),
        "--output",
        str(folder / "model"),
        "--mode",
        "locked",
        "--views",
        "1",
        "--val-fraction",
        "0.5",
        "--test-fraction",
        "0",
        cwd=folder,
    )
    return result, folder / "model"


def test_finetune_prints_the_model_folder_it_wrote(finetuned, spec):
    result, output = finetuned

    assert result.returncode == 0, result.stderr[-3000:]
    assert last_line(result.stdout) == str(output)
    clip = towers.load_model(str(output), device="cpu")
    assert clip.meta.train_config["mode"] == "locked"  # the preset for a pretrained tower with a new text tower
    assert clip.meta.training["stopped_by"] in ("epochs", "patience")
    assert set(clip.meta.metrics) == set(spec.names)
    assert clip.meta.calibration["color"].conflict_threshold is not None  # colour can flag conflicts
    assert clip.meta.calibration["color"].conflict_rows > 100
    assert "locked" in (output / "README.md").read_text()


def test_audit_prints_the_run_folder_it_wrote(finetuned, cli_env, sample_dir, tmp_path):
    _, model_dir = finetuned
    output = tmp_path / "reports"

    result = clipdq(
        cli_env,
        "audit",
        "--catalog",
        str(sample_dir / "catalog.parquet"),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--model",
        str(model_dir),
        "--output",
        str(output),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(last_line(result.stdout))
    assert folder.parent.parent == output
    assert folder.parent.name.startswith("run_date=") and folder.name.startswith("run_id=")
    assert (folder / "manifest.json").is_file()
    findings = pl.read_parquet(folder / "findings.parquet")
    truth = pl.read_parquet(sample_dir / "ground_truth.parquet")
    assert findings.height == truth.height
    assert_planted_flags_found(findings, truth)


def test_audit_of_a_missing_catalog_fails_with_a_one_line_reason(cli_env, sample_dir, tmp_path):
    missing = tmp_path / "no-such-catalog.parquet"

    result = clipdq(
        cli_env,
        "audit",
        "--catalog",
        str(missing),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--model",
        "unused-model",
        "--output",
        str(tmp_path / "reports"),
        cwd=tmp_path,
    )

    assert result.returncode != 0
    assert "run_id=" not in result.stdout
    reasons = reason_lines(result, "audit")
    assert len(reasons) == 1, result.stderr[-3000:]
    assert last_line(result.stderr) == reasons[0]
    assert reasons[0] == f"clipdq audit: error: CatalogError: catalog not found: {missing}"
    assert not (tmp_path / "reports").exists()


def test_demo_trains_a_model_audits_and_prints_the_run_folder(cli_env, sample_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)  # a small sample in place: the demo reuses it rather than generating

    result = clipdq(
        cli_env, "demo", "--data-dir", str(data), "--output", str(tmp_path / "reports"), "--epochs", "1", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/3] training the demo model" in result.stdout
    assert "1 epochs, stopped by epochs;" in result.stdout  # the budget is epochs, not the clock
    folder = Path(last_line(result.stdout))
    assert (folder / "manifest.json").is_file()
    assert f"Report: {folder / 'report.html'}" in result.stdout
    assert (data / "model" / towers.META_FILE).is_file()
    text = json.loads((folder / "summary.json").read_text())["text_agreement"]
    title_line = f"{text.get('flagged')} of the conflicts are images that may not show the product their title names."
    assert (title_line in result.stdout) == text["checked"]


def test_learning_curve_writes_table_and_plot(cli_env, sample_dir, tmp_path):
    result = clipdq(
        cli_env,
        "learning-curve",
        "--catalog",
        str(sample_dir / "labeled.parquet"),
        "--spec",
        str(sample_dir / "spec.yaml"),
        "--output",
        str(tmp_path / "curve"),
        "--mode",
        "prototype",
        "--sizes",
        "2,5",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(tmp_path / "curve")
    table = pl.read_csv(tmp_path / "curve" / "learning_curve.csv")
    assert table["per_value"].unique().sort().to_list() == [2, 5]
    assert (tmp_path / "curve" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| labeled per value |" in (tmp_path / "curve" / "learning_curve.md").read_text()


def test_a_fixed_value_shows_as_resolved_in_the_next_run_and_in_report_diff(finetuned, cli_env, sample_dir, tmp_path):
    _, model_dir = finetuned
    data, output = tmp_path / "data", tmp_path / "reports"
    shutil.copytree(sample_dir, data)
    audit = [
        "audit",
        "--catalog",
        str(data / "catalog.parquet"),
        "--spec",
        str(data / "spec.yaml"),
        "--model",
        str(model_dir),
        "--output",
        str(output),
    ]
    first = clipdq(cli_env, *audit, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    conflicts = pl.read_parquet(Path(last_line(first.stdout)) / "suggested_fixes.parquet").filter(
        pl.col("status") == "conflict"
    )
    pid, attribute, _, suggested, *_ = conflicts.row(0)
    catalog = pl.read_parquet(data / "catalog.parquet")
    catalog.with_columns(
        pl.when(pl.col("product_id") == pid).then(pl.lit(suggested)).otherwise(pl.col(attribute)).alias(attribute)
    ).write_parquet(data / "catalog.parquet")  # the steward applies the fix

    second = clipdq(cli_env, *audit, cwd=tmp_path)
    diff = clipdq(cli_env, "report", str(output), "--diff", cwd=tmp_path)
    gate = clipdq(cli_env, "report", str(output), "--fail-on", "conflict>0", "--fail-on", "resolved>1000", cwd=tmp_path)
    passed = clipdq(cli_env, "report", str(output), "--fail-on", "new>100000", cwd=tmp_path)

    assert second.returncode == 0, second.stderr[-3000:]
    folder = Path(last_line(second.stdout))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["changes"]["previous_run"] == Path(last_line(first.stdout)).name.removeprefix("run_id=")
    assert summary["changes"]["totals"]["resolved"] >= 1
    by_attribute = {row["attribute"]: row for row in summary["changes"]["by_attribute"]}
    assert by_attribute[attribute]["resolved"] >= 1
    assert (
        f'<td>{pid}</td><td class="text">{attribute}</td><td class="text">conflict</td>'
        in (folder / "report.html").read_text()
    )
    assert diff.returncode == 0, diff.stderr[-3000:]
    assert f"resolved: {pid} {attribute} conflict" in diff.stdout
    assert last_line(diff.stdout) == str(folder)
    assert gate.returncode == 3 and last_line(gate.stdout) == str(folder)
    conflicts = summary["totals"]["conflict"]
    assert last_line(gate.stderr) == f"clipdq report: failing on conflict>0 (conflict = {conflicts})"
    assert passed.returncode == 0 and f"{conflicts} conflicts" in passed.stdout


def test_progress_records_redraw_one_bar_and_other_records_pass():
    stream = io.StringIO()
    bar = cli.ProgressBar(stream)
    logger = logging.getLogger("clipdq.test-progress")

    def record(message: str, progress=None) -> logging.LogRecord:
        extra = {} if progress is None else {"progress": progress}
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None, extra=extra)

    passed = [
        bar.filter(record("scored 1/4", (1, 4))),
        bar.filter(record("scored 2/4", (2, 4))),
        bar.filter(record("a warning")),
        bar.filter(record("scored 4/4", (4, 4))),
    ]

    assert passed == [False, False, True, False]  # progress is drawn, not logged; the rest is logged
    lines = stream.getvalue().split("\n")
    assert lines[0].startswith("\rscored 1/4") and "[" + "#" * 7 + "." * 23 + "]" in lines[0]
    assert lines[0].endswith("#" * 15 + "." * 15 + "]")  # redrawn in place, then ended before the warning
    assert lines[1].startswith("\rscored 4/4") and lines[1].endswith("#" * 30 + "]") and lines[2] == ""
