"""Where shards run: one after another in the flow's process, or at once on a Dask cluster.

Why through Prefect's task runners: a team that outgrows one machine points distill at the
Dask cluster it already runs (``runtime.dask_address``) or lets prefect-dask start a
local one (``runtime.task_runner: dask``); the flow code is the same ``.map`` over shards
either way, and each shard is a Prefect task run with its own state and logs. In-process
stays the default (a single worker thread: shards run one after another, as on a laptop).
"""

from __future__ import annotations

from typing import Any


def task_runner_for(runtime: Any) -> Any:
    """The Prefect task runner a ``RuntimeConfig`` asks for."""
    if runtime.task_runner.value == "dask":
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        # processes, one thread each: the shards' teacher clients and student models do not share a GIL
        return DaskTaskRunner(cluster_kwargs={"n_workers": runtime.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def workers(runtime: Any) -> int:
    """Shards that may run at once under ``runtime`` (what rate-limit shares divide by): 1 in-process,
    ``dask_workers`` on Dask (for a cluster given by address, the number of its workers to plan for)."""
    return runtime.dask_workers if runtime.task_runner.value == "dask" else 1
