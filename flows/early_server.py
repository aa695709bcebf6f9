"""A temporary Prefect server started before the command that needs it has loaded.

Where no Prefect API is configured, a flow starts a temporary server when it begins and waits
for it: the server process imports Prefect's server and migrates its database, about 5 s that a
short audit spends after importing its own libraries. ``started_early`` starts the same server
first, so that its start-up overlaps those imports, and points the flow at it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def started_early(*, timeout_s: float = 60.0) -> Iterator[Callable[[], None]]:
    """Within it, flows use a temporary server started on entry (and stopped when the process
    exits); yields a function that waits until it answers. Where a Prefect API is configured,
    nothing is started."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        yield lambda: None
        return
    port = _free_port()
    server = subprocess.Popen(_server_command(port), env=_server_env(settings))
    atexit.register(_stop, server)  # after Prefect's exit handlers, which send the flow's last logs
    url = f"http://127.0.0.1:{port}/api"
    # It serves no UI, and nothing watches it for crashed runs: without heartbeats, whose thread
    # sleeps a second at a time, a flow run does not wait up to a second more to end.
    updates = {PREFECT_API_URL: url, PREFECT_UI_URL: "", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    with temporary_settings(updates=updates):
        yield lambda: _wait_until_up(url, server, timeout_s)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _server_command(port: int) -> list[str]:
    """The command Prefect runs for its temporary server (``SubprocessASGIServer``)."""
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _server_env(settings) -> dict[str, str]:
    ephemeral = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return {**os.environ, **ephemeral, **settings.to_environment_variables(exclude_unset=True)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")
