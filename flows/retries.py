"""Retry policy shared by the flows' I/O tasks."""

from __future__ import annotations

from typing import Any

from clipdq.core.spec import SpecError
from clipdq.io.catalog import CatalogError
from clipdq.io.storage import StorageError, is_permanent


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, not bad input: a malformed spec or catalog fails the same way again."""
    try:
        state.result()
    except (SpecError, CatalogError, FileNotFoundError, StorageError):
        return False
    except Exception as error:  # noqa: BLE001 - anything else may be transient, but a refusal from S3 is not
        return not is_permanent(error)
    return False


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _transient}
