"""Dask preload for the local cluster (see `pipelines/data/dask-local.yaml`): a scheduler, nanny
or worker whose owner or parent process dies ends itself.

The local cluster's workers are children of the process that classifies (`pointflow classify`,
an Airflow task), whose scheduler runs inside it; when that process is killed outright (SIGKILL,
the OOM killer) nobody closes the cluster, and its workers would live on under init. Each one
watches the owner (OWNER_VARIABLE, set by `pipelines.cluster.local_cluster`) and its own parent
(the owner itself, or a nanny where a cluster has them). A process that starts after its owner
died ends at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

OWNER_VARIABLE = "POINTFLOW_CLUSTER_OWNER"
POLL_SECONDS = 0.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dask_setup(server) -> None:
    parent = os.getppid()
    owner = int(os.environ.get(OWNER_VARIABLE) or parent)

    def orphaned() -> bool:
        return os.getppid() != parent or not _alive(owner)

    def watch() -> None:
        while not orphaned():
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    if orphaned():
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="pointflow-orphan-watch", daemon=True).start()
