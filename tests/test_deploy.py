"""The deployments in deploy/prefect.yaml on a served Prefect: registered with their schedule,
and a run of the nightly audit picked up by a worker writes a complete run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
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


def test_nightly_audit_deployment_is_scheduled_and_runs_on_a_worker(served_prefect, sample_dir, trained_model_dir,
                                                                   tmp_path):
    output = tmp_path / "reports"
    env = served_prefect | {
        "CLIPDQ_HOME": str(ROOT), "CLIPDQ_CATALOG": str(sample_dir / "catalog.parquet"),
        "CLIPDQ_SPEC": str(sample_dir / "spec.yaml"), "CLIPDQ_MODEL": str(trained_model_dir),
        "CLIPDQ_OUTPUT": str(output), "CLIPDQ_LABELED": str(sample_dir / "labeled.parquet"),
    }
    prefect(env, "work-pool", "create", "clipdq", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")

    inspected = prefect(env, "deployment", "inspect", "clipdq-audit/nightly-audit").stdout
    assert "'cron': '0 2 * * *'" in inspected
    assert str(sample_dir / "catalog.parquet") in inspected
    prefect(env, "deployment", "inspect", "clipdq-finetune/finetune")

    prefect(env, "deployment", "run", "clipdq-audit/nightly-audit")
    prefect(env, "worker", "start", "--pool", "clipdq", "--run-once")

    manifests = list(output.glob("run_date=*/run_id=*/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["rows"] > 0
