"""Small runtime helpers shared by tasks and flows: the run logger, secrets, offline env, where shards run.

Why: tasks must be callable without Prefect (tests, notebooks), so the logger falls back
to plain logging outside a run; and the API key is read at the last moment from an env
var or a Prefect Secret block, so it never sits in a config, a parameter or a log.

Where shards run (:func:`task_runner_for`): one after another in the flow's process, or at
once on a Dask cluster through Prefect's task runners. A team that outgrows one machine
points distill at the Dask cluster it already runs (``runtime.dask_address``) or lets
prefect-dask start a local one (``runtime.task_runner: dask``); the code is the same
``.map`` over shards either way, and each shard is a Prefect task run with its own state
and logs. In-process stays the default (a single worker thread, as on a laptop).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, cast

if TYPE_CHECKING:  # the config imports nothing of this module; annotations only
    from distill.config import RuntimeConfig

# never sent anywhere, online or not: analytics and telemetry (set unless the shell says otherwise)
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
# what keeps the Hugging Face libraries off the hub: a setting of the host, not of distill. `make demo`, `make test`
# and the docker images set them (their models are bundled); a library or CLI user on a machine with internet gets
# hub students (student.model_path: distilroberta-base) unless they set HF_HUB_OFFLINE=1 themselves.
HF_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
OFFLINE_ENV = {**QUIET_ENV, **HF_OFFLINE_ENV}  # what an offline host sets (tests, benchmarks)


def set_quiet_env() -> None:
    """Default analytics and telemetry off (users may still override them in their shell); the hub stays reachable."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def set_offline_env() -> None:
    """Default every offline variable, the hub's too: for the tests and benchmarks, whose models are bundled."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def hf_offline() -> bool:
    """Whether this process keeps the Hugging Face libraries off the hub (HF_HUB_OFFLINE, as huggingface_hub reads)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def long_lived_heap_frozen() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects alive on entry while a bulk loop runs.

    Why: a loop over a million items allocates millions of small objects, and every full
    collection CPython triggers then re-walks the whole heap, mostly the ~10^6 objects that
    importing Prefect, pandas and pydantic left behind. ``gc.freeze`` moves those out of the
    collector's reach; measured on 100,000 items, the loader and the plan take about half as
    long (bench/million.py prints the 1M figures). Objects made inside the block are still
    collected as usual, and ``gc.unfreeze`` on exit hands the frozen ones back, so nothing
    leaks; with threads it can only end a freeze early, which costs speed, never memory safety.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_logger() -> Any:
    """Prefect's run logger inside a flow or task run, else a plain logger."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return logging.getLogger("distill")


class SecretError(RuntimeError):
    pass


def resolve_api_key(api_key_env: Optional[str], secret_block: Optional[str]) -> Optional[str]:
    """The teacher's API key from the named env var, else the named Prefect Secret block, else None."""
    if api_key_env:
        val = os.environ.get(api_key_env)
        if val:
            return val
        if not secret_block:
            raise SecretError(f"teacher.api_key_env names ${api_key_env}, which is not set")
    if secret_block:
        from prefect.blocks.system import Secret

        try:
            block = cast(Secret, Secret.load(secret_block))  # a sync call returns the block (Prefect dispatches)
            return block.get()
        except Exception as e:  # the block's value never appears in the message
            raise SecretError(
                f"teacher.api_key_secret_block: cannot load Prefect Secret block {secret_block!r} ({type(e).__name__})"
            ) from None
    return None


def task_runner_for(runtime: RuntimeConfig) -> Any:
    """The Prefect task runner a ``RuntimeConfig`` asks for."""
    if runtime.task_runner.value == "dask":
        from prefect_dask.task_runners import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        # processes, one thread each: the shards' teacher clients and student models do not share a GIL
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runtime.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def workers(runtime: RuntimeConfig) -> int:
    """Shards that may run at once under ``runtime`` (what rate-limit shares divide by): 1 in-process,
    ``dask_workers`` on Dask (for a cluster given by address, the number of its workers to plan for)."""
    return runtime.dask_workers if runtime.task_runner.value == "dask" else 1
