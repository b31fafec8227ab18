"""The Dask cluster a classification runs on: a local one started for the run (scheduler in this
process, workers that end with their owner), or the remote scheduler the settings name."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.orphans import OWNER_VARIABLE
from pipelines.settings import ClusterStartError, Settings

log = logging.getLogger(__name__)

# Read by the local cluster's subprocesses (see the file for why).
LOCAL_DASK_CONFIG = Path(__file__).with_name("data") / "dask-local.yaml"


@contextlib.contextmanager
def _environment(defaults: dict[str, str], fixed: dict[str, str]) -> Iterator[None]:
    """Variables the local cluster's subprocesses inherit: `defaults` unless the user set them, `fixed` always."""
    saved = {name: os.environ.get(name) for name in [*defaults, *fixed]}
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ} | fixed)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# The in-process scheduler's share of dask-local.yaml (its housekeeping intervals), and how long its
# tasks may wait with no worker at all: nanny-less workers are not restarted, so a run whose every
# worker died fails after this instead of waiting for ever.
_SCHEDULER_CONFIG_KEYS = (
    "distributed.admin.tick.interval",
    "distributed.admin.system-monitor.interval",
    "distributed.scheduler.work-stealing-interval",
)
NO_WORKERS_TIMEOUT = "60s"


def _local_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(LOCAL_DASK_CONFIG.read_text())


@contextlib.contextmanager
def local_cluster(settings: Settings, workers: int | None = None) -> Iterator[Any]:
    """A local cluster of `workers` processes (POINTFLOW_WORKERS by default), one thread each.

    The scheduler runs in this process (one Python process fewer to start and import); the workers are `python -m dask spec` subprocesses, not
    multiprocessing children: spawned children re-import the parent's __main__, and inside an
    Airflow task that is the `airflow` script, which refuses to start without its database. They
    run without nannies (two processes fewer, about 1 CPU-second of imports a run): a worker that
    dies is not restarted, its tasks are rerun on the others, and if none is left the run fails
    after NO_WORKERS_TIMEOUT.
    """
    import dask
    from distributed import Scheduler, SpecCluster
    from distributed.deploy.subprocess import SubprocessWorker
    from distributed.worker_memory import parse_memory_limit

    count = workers or settings.workers
    config = _local_config()
    scheduler_config = {key: _lookup(config, key) for key in _SCHEDULER_CONFIG_KEYS}
    # A nanny would set these in its worker's environment (pre-spawn-environ): the workers inherit them from here.
    malloc = local_malloc_settings()
    worker = {
        "cls": SubprocessWorker,
        "options": {
            "worker_class": "distributed.Worker",
            "worker_kwargs": {
                "host": "127.0.0.1",
                "nthreads": 1,
                "silence_logs": logging.ERROR,
                "memory_limit": parse_memory_limit("auto", 1, count, logger=log),
            },
        },
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "port": 0, "dashboard": True, "dashboard_address": ":0"},
    }
    # The cluster's processes end when this one does (pipelines/orphans.py, loaded by the config).
    with (
        _environment({"DASK_CONFIG": str(LOCAL_DASK_CONFIG), **malloc}, {OWNER_VARIABLE: str(os.getpid())}),
        dask.config.set(
            {
                **scheduler_config,
                "distributed.scheduler.no-workers-timeout": NO_WORKERS_TIMEOUT,
                # Never the orphan watch in here (a DASK_CONFIG of dask-local.yaml would load it):
                # it would end this process with its parent.
                "distributed.scheduler.preload": [],
            }
        ),
        SpecCluster(
            workers={i: worker for i in range(count)},
            scheduler=scheduler,
            worker=worker,
            silence_logs=logging.ERROR,
            name="pointflow",
        ) as cluster,
    ):
        yield cluster


def local_malloc_settings() -> dict[str, str]:
    """The malloc variables of the local cluster's workers (dask-local.yaml), by name."""
    return {k: str(v) for k, v in _local_config()["distributed"]["nanny"]["pre-spawn-environ"].items()}


def _lookup(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


@contextlib.contextmanager
def dask_client(settings: Settings, workers: int | None = None, cluster: Any = None) -> Iterator[Any]:
    """A client on POINTFLOW_DASK_ADDRESS, or on a local cluster of `workers` processes: `cluster`
    when it is already started (`local_cluster`), else one started here."""
    from distributed import Client

    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    wanted = workers or settings.workers
    with (
        contextlib.nullcontext(cluster) if cluster is not None else local_cluster(settings, workers) as running,
        Client(_in_process_address(running)) as client,
    ):
        # The cluster returns once its scheduler is up, before its workers have registered: counted
        # then, 2 workers were reported (and the in-flight window sized) as 1.
        wait_for_workers(client, wanted, WORKER_START_SECONDS, "the local Dask cluster")
        yield client


def _in_process_address(cluster: Any) -> str:
    """An in-process address of the local cluster's scheduler (it runs in this process), for this
    process's client: over it a task's tile travels to the scheduler as the object it is, where
    over TCP it was pickled, written to a socket, read back and unpickled by the same process (0.3
    of the 1.0-1.2 CPU-s of the 10 M point benchmark's scheduler thread). The workers still reach
    the scheduler over TCP. (Listening in-process from the start fails: the scheduler's dashboard
    link needs its first address to be TCP.)"""

    async def listen() -> None:
        await cluster.scheduler.listen("inproc://")

    cluster.sync(listen)
    addresses = (listener.contact_address for listener in cluster.scheduler.listeners)
    return next(address for address in addresses if address.startswith("inproc://"))


# How long a local cluster's workers may take to start: a few seconds, longer on a loaded machine.
WORKER_START_SECONDS = 120.0


def wait_for_workers(client: Any, wanted: int, timeout: float, where: str) -> int:
    """Block until `wanted` workers are registered with the client's scheduler; their number."""
    try:
        client.wait_for_workers(wanted, timeout=timeout)
    except TimeoutError:
        started = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        raise ClusterStartError(
            f"{where} has {started} of the {wanted} worker(s) asked for after {timeout:.0f} s: the machine may be short of "
            f"memory or processes; ask for fewer (--workers, POINTFLOW_WORKERS) or retry"
        ) from None
    return len(client.scheduler_info(n_workers=-1).get("workers", {}))
