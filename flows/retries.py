"""Retry policy shared by the flows' I/O tasks."""

from __future__ import annotations

from clipdq.catalog import CatalogError
from clipdq.spec import SpecError


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, not bad input: a malformed spec or catalog fails the same way again."""
    try:
        state.result()
    except (SpecError, CatalogError, FileNotFoundError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _transient}
