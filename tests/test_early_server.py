"""The temporary Prefect server a CLI audit starts before it loads its libraries."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
from flows.early_server import started_early
from prefect import flow
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

@flow
def three():
    return 3

with started_early() as server_is_up:
    server_is_up()
    print(PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value(), PREFECT_API_URL.value(), three(), flush=True)
"""


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.subprocess
def test_a_flow_runs_on_the_early_server_which_stops_with_the_process(cli_env):  # noqa: F811
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )

    assert child.returncode == 0, child.stderr
    heartbeats, url, result = child.stdout.split()[-3:]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and result == "3"
    assert heartbeats == "None"  # nothing watches a temporary server for crashed runs
    assert "Starting temporary server" not in child.stderr  # Prefect did not start a second one
    assert "Error logging to API" not in child.stderr + child.stdout  # the last logs reached it
    assert not answers(url)  # stopped when the process exited


def test_nothing_is_started_where_an_api_is_configured(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from flows.early_server import started_early

    configured = PREFECT_API_URL.value()
    with started_early() as server_is_up:
        server_is_up()
        assert PREFECT_API_URL.value() == configured
