"""The HTML report of a catalog full of script-injection strings, opened in headless Chromium
(Debian's package; ``scripts/install-chromium.sh``, run by ``make test``): no script runs, and the
strings show as text."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
from PIL import Image

from clipdq import sample_data
from clipdq.checks import schemas
from clipdq.reporting import report
from flows.audit import audit_catalog

CHROMIUM = shutil.which("chromium")
# each payload, if it ran, would write PWNED-<n> into the page: the escaped text never holds that string
PAYLOADS = [
    "<script>document.body.append('PW'+'NED-1')</script>",
    "\"><img src=x onerror=\"document.body.append('PW'+'NED-2')\">",
    "'><svg onload=document.body.append('PW'+'NED-3')>",
    "</code></p><iframe srcdoc=\"<script>parent.document.body.append('PW'+'NED-4')</script>\"></iframe>",
    "javascript:document.body.append('PW'+'NED-5')",
    "{{ 7 * 7 }} {% raw %}",
]


def _dom_after_load(path, fragment: str = "") -> str:
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
            path.as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run scripts/install-chromium.sh")
def test_a_report_of_injection_strings_runs_no_script(trained_model_dir, prefect_harness, tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.jpg")
    rows = [
        {
            "product_id": payload,
            "image": "a.jpg" if i % 2 else "missing-" + payload.replace("/", "_"),
            "product_type": "apparel",
            "color": payload,
            "sleeve_length": None,
            "neckline": "v-neck",
        }
        for i, payload in enumerate(PAYLOADS)
    ]
    pl.DataFrame(rows).write_parquet(folder / "catalog.parquet")
    (folder / "spec.yaml").write_text(sample_data.SPEC_YAML)

    run = audit_catalog(
        str(folder / "catalog.parquet"), str(folder / "spec.yaml"), str(trained_model_dir), str(tmp_path / "out")
    )

    report = tmp_path / "out" / run.split("/out/", 1)[1] / "report.html"
    dom = _dom_after_load(report)
    assert "PWNED" not in dom
    assert "&lt;script&gt;document.body.append('PW'+'NED-1')" in dom  # shown, as text
    assert "{{ 7 * 7 }} {% raw %}" in dom  # data is never template
    assert "Content-Security-Policy" in report.read_text()


def _problems(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    statuses = rng.choice(["conflict", "gap", "match", "uncertain"], n)
    return pl.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(n)],
            "attribute": rng.choice(["color", "neckline"], n),
            "existing_value": np.where(statuses == "gap", None, "red"),
            "predicted_value": "blue",
            "confidence": rng.random(n),
            "status": statuses,
            "detail": "x" * 400,  # a long text wraps, not overflows
        },
        schema=schemas.FINDINGS_SCHEMA,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run scripts/install-chromium.sh")
def test_the_problem_table_filters_from_a_link_and_pages(tmp_path):
    findings = _problems(2_000)
    summary = report.summarize(findings, products=2_000, run={"run_id": "r1"}, validation={})
    page = tmp_path / "report.html"
    page.write_text(report.render_html(findings, summary, thumbnails={}))

    dom = _dom_after_load(page, "#status=conflict&attribute=color&text=p1")

    expected = findings.filter(
        (pl.col("status") == "conflict") & (pl.col("attribute") == "color") & pl.col("product_id").str.contains("p1")
    )
    assert f'data-shown="{expected.height}"' in dom
    assert f"{expected.height} of {findings.filter(pl.col('status').is_in(['conflict', 'gap'])).height} problems" in dom
    shown_rows = re.findall(r"<tr><td></td><td>(p\d+)</td>", dom)
    assert len(shown_rows) == min(50, expected.height)  # one page
    best = expected.sort("confidence", descending=True)["product_id"].head(50).to_list()
    assert shown_rows == best  # the most confident first
