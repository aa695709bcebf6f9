"""The deployments in deploy/prefect.yaml on a served Prefect: registered with their schedule and
concurrency, a nightly run picked up by a worker, a run started as the UI's Run button starts one
(with edited parameters), its artifacts and event, and the UI itself in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout} s")


@pytest.fixture(scope="module")
def served_prefect(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on a free loopback port, with its own home; yields the env to use it."""
    home = tmp_path_factory.mktemp("served-prefect")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(env["PREFECT_API_URL"], server)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def prefect(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([*PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def api(env: dict, method: str, path: str, body: dict | None = None, attempts: int = 10):
    """A call to the served Prefect's REST API, as its UI makes them; retried while the server
    answers 503 (its SQLite database busy with its own services), as Prefect's clients do."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


@pytest.fixture(scope="module")
def deployed(served_prefect, sample_dir, flagging_model_dir, tmp_path_factory) -> dict:
    """The served Prefect with a process work pool and deploy/prefect.yaml deployed; the env to use them."""
    output = tmp_path_factory.mktemp("deployed-reports")
    env = served_prefect | {
        "CLIPDQ_HOME": str(ROOT),
        "CLIPDQ_CATALOG": str(sample_dir / "catalog.parquet"),
        "CLIPDQ_SPEC": str(sample_dir / "spec.yaml"),
        "CLIPDQ_MODEL": str(flagging_model_dir),
        "CLIPDQ_OUTPUT": str(output),
        "CLIPDQ_LABELED": str(sample_dir / "labeled.parquet"),
    }
    prefect(env, "work-pool", "create", "clipdq", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    return env


def test_nightly_audit_deployment_is_scheduled_one_at_a_time_and_runs_on_a_worker(deployed):
    nightly = api(deployed, "GET", "/deployments/name/clipdq-audit/nightly-audit")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert nightly["global_concurrency_limit"]["limit"] == 1  # nights never overlap
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["parameters"]["catalog_uri"] == deployed["CLIPDQ_CATALOG"]
    api(deployed, "GET", "/deployments/name/clipdq-finetune/finetune")
    matching = api(deployed, "GET", "/deployments/name/clipdq-match/match")
    assert matching["parameters"]["references_uri"] == deployed["CLIPDQ_CATALOG"]
    assert "queries_uri" in matching["parameter_openapi_schema"]["required"]  # the run form asks for it

    prefect(deployed, "deployment", "run", "clipdq-audit/nightly-audit")
    prefect(deployed, "worker", "start", "--pool", "clipdq", "--run-once")

    manifests = list(Path(deployed["CLIPDQ_OUTPUT"]).glob("run_date=*/run_id=*/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["rows"] > 0


@pytest.fixture(scope="module")
def ui_run(deployed, tmp_path_factory) -> dict:
    """An on-demand audit started as the UI's Run button starts one, with edited parameters, run by a worker."""
    deployment = api(deployed, "GET", "/deployments/name/clipdq-audit/on-demand-audit")
    edited = tmp_path_factory.mktemp("edited-output")
    parameters = deployment["parameters"] | {"output_uri": str(edited), "options": {"batch_size": 16, "workers": 0}}
    flow_run = api(
        deployed,
        "POST",
        f"/deployments/{deployment['id']}/create_flow_run",
        {"parameters": parameters, "state": {"type": "SCHEDULED"}, "enforce_parameter_schema": True},
    )
    prefect(deployed, "worker", "start", "--pool", "clipdq", "--run-once")
    return {
        "deployment": deployment,
        "flow_run": api(deployed, "GET", f"/flow_runs/{flow_run['id']}"),
        "output": edited,
    }


def test_a_run_from_the_ui_form_uses_its_edited_parameters_and_leaves_artifacts(deployed, ui_run):
    flow_run = ui_run["flow_run"]
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
    summaries = list(ui_run["output"].glob("run_date=*/run_id=*/summary.json"))
    assert len(summaries) == 1  # the edited output, not the deployment's
    summary = json.loads(summaries[0].read_text())
    assert summary["options"]["batch_size"] == 16
    assert summary["totals"]["conflict"] > 0  # the flagging model finds the sample's planted conflicts

    artifacts = api(deployed, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    assert {"clipdq-audit-counts", "clipdq-top-problems", "clipdq-audit-report", "clipdq-report-link"} <= set(by_key)
    assert str(summaries[0].parent / "report.html") in by_key["clipdq-audit-report"]["data"]
    assert (summaries[0].parent / "report.html").as_uri() in by_key["clipdq-report-link"]["data"]
    payloads = _event_payloads(deployed, "clipdq.audit.completed", f"clipdq.audit.{summary['run_id']}")
    assert payloads and payloads[0]["totals"] == summary["totals"]


def _event_payloads(env: dict, name: str, resource: str, timeout: float = 60) -> list[dict]:
    """Payloads of the events ``name`` about ``resource``, once the server has stored them (it
    persists events in batches, a few seconds after they arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        events = api(env, "POST", "/events/filter", {"filter": {"event": {"name": [name]}}})["events"]
        payloads = [e["payload"] for e in events if e["resource"]["prefect.resource.id"] == resource]
        if payloads or time.monotonic() > deadline:
            return payloads
        time.sleep(1)


def _browse(url: str, screenshot: Path | None = None, *, height: int = 1300) -> str:
    """The DOM of a page once its scripts settle, and a screenshot of it."""
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size=1400,{height}",
        "--virtual-time-budget=20000",
    ]
    if screenshot:
        subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed: run scripts/install-chromium.sh"
)
def test_the_prefect_ui_shows_the_run_form_with_help_the_run_and_its_artifacts(deployed, ui_run, tmp_path):
    shots = Path(os.environ.get("CLIPDQ_SCREENSHOTS", tmp_path))  # docs/screenshots refreshes the README's
    ui, run_id = deployed["PREFECT_API_URL"].removesuffix("/api"), ui_run["flow_run"]["id"]
    top = api(
        deployed,
        "POST",
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["clipdq-top-problems"]}}},
    )[0]

    form = _browse(f"{ui}/deployments/deployment/{ui_run['deployment']['id']}/run", shots / "prefect-run-form.png")
    run = _browse(f"{ui}/runs/flow-run/{run_id}", shots / "prefect-flow-run.png")
    artifact = _browse(f"{ui}/artifacts/artifact/{top['id']}", shots / "prefect-top-problems.png")
    report = next(ui_run["output"].glob("run_date=*/run_id=*/report.html"))
    page = _browse(report.as_uri(), shots / "report.png", height=2400)

    assert "The catalog to audit: a Parquet file, local or s3://." in form  # the parameter's help
    assert "Images per model call." in form  # the options' help
    assert "products in 1 shards" in run  # the flow run's logs
    assert "The 25 most confident problems" in artifact and json.loads(top["data"])[0]["product_id"] in artifact
    assert re.search(r'data-shown="[1-9]\d*"', page)  # the report's problem table is drawn
    for name in ("prefect-run-form", "prefect-flow-run", "prefect-top-problems", "report"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
