"""The nightly benchmark at a test's size: whole ``clipdq audit`` processes on a generated catalog,
an unchanged rerun reading no image and reporting the first run's findings, a rerun after 1% of the
images changed embedding exactly those (``benchmarks/nightly.py --check``, 600 rows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_nightly_benchmark_reuses_unchanged_rows_and_embeds_only_changed_images(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nightly.py"), "--rows", "600", "--folder", str(tmp_path)]
        + ["--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "findings identical to the first run: True" in result.stdout
    assert "rerun, 6 images changed" in result.stdout and "reuse and findings: as expected" in result.stdout
