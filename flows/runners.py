"""Where a flow's tasks run: here, one at a time, or on a Dask cluster (prefect-dask)."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner


def task_runner(dask_address: str | None, workers: int):
    """Where shards run: an existing Dask cluster, a local one of ``workers`` processes, or here."""
    if not dask_address and workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1)  # one shard at a time: each uses every core already
    from prefect_dask import DaskTaskRunner  # imports dask: only when it is used

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)
