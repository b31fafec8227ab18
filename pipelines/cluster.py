"""The Dask cluster a classification runs on: a local one started for the run (scheduler in this
process, workers that end with their owner), or the remote scheduler the settings name."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
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
    """A local cluster that classifies `workers` tiles at once (POINTFLOW_WORKERS by default): worker
    processes of THREADS_PER_PROCESS threads each (the last one fewer when `workers` is odd).

    The scheduler runs in this process (one Python process fewer to start and import); the workers are `python -m dask spec` subprocesses, not
    multiprocessing children: spawned children re-import the parent's __main__, and inside an
    Airflow task that is the `airflow` script, which refuses to start without its database. They
    run without nannies (a process fewer each, about half a CPU-second of imports a run): a worker
    that dies is replaced from here (`_replace_dead_workers`), its tasks rerun on the others and the
    replacement, and once the replacements are used up a run left with no worker at all fails after
    NO_WORKERS_TIMEOUT.
    """
    import dask
    from distributed import Scheduler, SpecCluster
    from distributed.worker_memory import parse_memory_limit

    count = workers or settings.workers
    worker_process = _worker_process()
    config = _local_config()
    scheduler_config = {key: _lookup(config, key) for key in _SCHEDULER_CONFIG_KEYS}
    # A nanny would set these in its worker's environment (pre-spawn-environ): the workers inherit them from here.
    malloc = local_malloc_settings()

    def worker(name: int, threads: int) -> dict[str, Any]:
        return {
            "cls": worker_process,
            "options": {
                "worker_class": "distributed.Worker",
                "worker_kwargs": {
                    # The scheduler knows a worker by this name (SubprocessWorker passes on no other).
                    "name": name,
                    "host": "127.0.0.1",
                    "nthreads": threads,
                    "silence_logs": logging.ERROR,
                    "memory_limit": parse_memory_limit("auto", threads, count, logger=log),
                },
            },
        }

    processes = [min(THREADS_PER_PROCESS, count - start) for start in range(0, count, THREADS_PER_PROCESS)]
    scheduler = {
        "cls": Scheduler,
        # Without the dashboard unless asked for: Bokeh's import and server cost the command about
        # 0.35 CPU-s, and the workers start once the scheduler is up (POINTFLOW_DASHBOARD).
        "options": {"host": "127.0.0.1", "port": 0, "dashboard": settings.dashboard, "dashboard_address": ":0"},
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
            workers={i: worker(i, threads) for i, threads in enumerate(processes)},
            scheduler=scheduler,
            silence_logs=logging.ERROR,
            name="pointflow",
        ) as cluster,
    ):
        plugin = _replace_dead_workers(cluster, REPLACEMENTS_PER_PROCESS * len(processes))
        cluster.sync(_add_plugin, cluster.scheduler, plugin)
        yield cluster


def _worker_process() -> type:
    """distributed's SubprocessWorker, whose close also copes with a process that is already gone.

    Its close looks the process's children up with psutil when asyncio has not yet seen the process
    end; a killed worker, reaped meanwhile, made that raise NoSuchProcess inside SpecCluster's scale,
    and the replacement `_replace_dead_workers` asked for was never started (the killed-worker test
    failed 2 runs in 9, waiting for a worker that never came)."""
    import psutil
    from distributed.deploy.spec import ProcessInterface
    from distributed.deploy.subprocess import SubprocessWorker

    class WorkerProcess(SubprocessWorker):
        async def close(self) -> None:
            try:
                await super().close()
            except (psutil.NoSuchProcess, ProcessLookupError):
                self.process = None
                await ProcessInterface.close(self)

    return WorkerProcess


async def _add_plugin(scheduler: Any, plugin: Any) -> None:
    # In the scheduler's event loop, like every change to its state.
    scheduler.add_plugin(plugin)


# Tiles a local worker process classifies at once, one per thread: the standard classifier's loops
# are compiled without the GIL and NumPy releases it, so two threads classified two 1.4 M point
# tiles in 0.48 s where one took 0.79-0.93 for both, and a second process would cost another
# second of CPU (Python, distributed, the tile code and numba's compiled loops imported and loaded
# again). More threads per process are unmeasured.
THREADS_PER_PROCESS = 2


# How many times a local cluster replaces a dead worker process, per process it starts with.
REPLACEMENTS_PER_PROCESS = 1


def _replace_dead_workers(cluster: Any, replacements: int) -> Any:
    """A scheduler plugin (the local cluster's scheduler runs in this process): a worker process that
    dies (killed, out of memory) is replaced by a new one with the same threads, up to `replacements`
    times, so its tiles are rerun whatever number of processes the cluster has. A worker that
    leaves because the cluster closes is not replaced."""
    from distributed.core import Status
    from distributed.diagnostics.plugin import SchedulerPlugin

    class ReplaceDeadWorkers(SchedulerPlugin):
        name = "pointflow-replace-dead-workers"

        def __init__(self) -> None:
            self.left = replacements
            self.names: dict[str, Any] = {}  # worker address -> its name, its key in the cluster's spec
            self.next_name = max(cluster.worker_spec) + 1

        def add_worker(self, scheduler: Any, worker: str) -> None:
            self.names[worker] = scheduler.workers[worker].name

        def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
            name = self.names.pop(worker, None)
            if cluster.status != Status.running or name not in cluster.worker_spec or not self.left:
                return
            self.left -= 1
            log.warning("a worker process of the local Dask cluster died: starting another in its place")
            spec = copy.deepcopy(cluster.worker_spec.pop(name))
            spec["options"]["worker_kwargs"]["name"] = self.next_name
            cluster.worker_spec[self.next_name] = spec
            self.next_name += 1
            # SpecCluster's own way to bring its processes in line with its specs.
            cluster.scale(len(cluster.worker_spec))

    return ReplaceDeadWorkers()


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
        Client(running) as client,
    ):
        # The cluster returns once its scheduler is up, before its workers have registered: counted
        # then, 2 workers were reported (and the in-flight window sized) as 1.
        wait_for_workers(client, wanted, WORKER_START_SECONDS, "the local Dask cluster")
        yield client


def dashboard_link(client: Any, settings: Settings) -> str | None:
    """The link to the Dask dashboard of the run's scheduler: a remote one's, or the local cluster's
    when POINTFLOW_DASHBOARD asks for it (without it, the local scheduler's HTTP port serves only
    its health and metrics)."""
    if not (settings.dask_address or settings.dashboard):
        return None
    try:
        return client.dashboard_link
    except KeyError:  # a remote scheduler that runs no HTTP server
        return None


# How long a local cluster's workers may take to start: a few seconds, longer on a loaded machine.
WORKER_START_SECONDS = 120.0


def wait_for_workers(client: Any, wanted: int, timeout: float, where: str) -> int:
    """Block until the client's scheduler has workers with `wanted` threads in all (tiles they
    classify at once); their number."""
    deadline = time.monotonic() + timeout
    while (threads := _threads(client)) < wanted:
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"{where} has {threads} of the {wanted} worker(s) asked for after {timeout:.0f} s: the machine may be short of "
                f"memory or processes; ask for fewer (--workers, POINTFLOW_WORKERS) or retry"
            )
        time.sleep(0.05)
    return threads


def _threads(client: Any) -> int:
    return sum(worker["nthreads"] for worker in client.scheduler_info(n_workers=-1).get("workers", {}).values())
