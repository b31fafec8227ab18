"""What the local stack is (`StackPlan`): its folders, ports and two PostgreSQL databases, and the
environment every one of its processes gets. `stack.LocalStack` runs it.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.airflow_local import DAGS_FOLDER, PLUGINS_FOLDER
from pipelines.catalog.db import normalise_url
from pipelines.cluster import LOCAL_DASK_CONFIG
from pipelines.keys import kept_secret


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class StackPlan:
    """Where the stack lives and what it connects to.

    ``postgres`` is a server URL (no database): the stack uses two databases on it, ``<name>_airflow``
    for Airflow's metadata and ``<name>_catalog`` for pointflow's, and creates them when missing.
    """

    base: Path
    postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    name: str = "pointflow_stack"
    api_port: int = 8080
    dask_port: int = 8786
    dask_workers: int = 2
    # Task processes at once. Each is CPU-bound (imports, validation, tile I/O): far more than the
    # cores starves the scheduler and api-server, and Airflow then resets "orphaned" tasks.
    parallelism: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    max_active_runs: int = 16
    admin_user: str = "admin"
    admin_password: str | None = None  # None: keep the one from an earlier start, or make one
    extra_env: dict[str, str] = field(default_factory=dict)

    def database_url(self, purpose: str) -> str:
        parts = urlsplit(self.postgres)
        return urlunsplit(parts._replace(path=f"/{self.name}_{purpose}"))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dask_address(self) -> str:
        return f"tcp://127.0.0.1:{self.dask_port}"

    @property
    def pointflow_home(self) -> Path:
        return self.base / "pointflow"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def incoming(self) -> Path:
        """Where sources given to the DAGs by path are read from, unless POINTFLOW_INPUT_DIRS says otherwise."""
        return self.base / "incoming"


@contextmanager
def _server_cursor(server_url: str) -> Iterator[Any]:
    """A cursor outside any transaction, as CREATE and DROP DATABASE need."""
    import psycopg2

    connection = psycopg2.connect(urlunsplit(urlsplit(server_url)._replace(scheme="postgresql")))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def ensure_databases(plan: StackPlan) -> None:
    """Create the stack's two databases when they do not exist yet."""
    from psycopg2 import sql

    with _server_cursor(plan.postgres) as cursor:
        for purpose in ("airflow", "catalog"):
            database = _database_name(plan.database_url(purpose))
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def drop_databases(plan: StackPlan) -> None:
    """Remove the stack's two databases (scratch stacks: tests, the load benchmark)."""
    from psycopg2 import sql

    with _server_cursor(plan.postgres) as cursor:
        for purpose in ("airflow", "catalog"):
            database = _database_name(plan.database_url(purpose))
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def stack_environment(plan: StackPlan) -> dict[str, str]:
    """Environment shared by every process of the stack (Airflow, Dask, the tasks): this process's,
    with the stack's own services wired in; POINTFLOW_STORAGE_URL, SMTP and the like pass through."""
    airflow_home = plan.base / "airflow"
    passwords = airflow_home / "passwords.json"
    environment = {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(plan.parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": str(plan.max_active_runs),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{plan.api_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{plan.admin_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": normalise_url(plan.database_url("airflow")),
        "AIRFLOW__API__BASE_URL": plan.api_url,
        "AIRFLOW__API__PORT": str(plan.api_port),
        "AIRFLOW__API_AUTH__JWT_SECRET": kept_secret(airflow_home / "jwt_secret"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(plan.logs / "airflow"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        # One machine runs everything: a scheduler slowed by a burst of tasks is not a dead one.
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "120",
        "POINTFLOW_HOME": str(plan.pointflow_home),
        "POINTFLOW_DATABASE_URL": plan.database_url("catalog"),
        "POINTFLOW_DASK_ADDRESS": plan.dask_address,
        "POINTFLOW_INPUT_DIRS": os.environ.get("POINTFLOW_INPUT_DIRS") or str(plan.incoming),
        # Customers' download links point at this api-server's plugin endpoint.
        "POINTFLOW_PUBLIC_URL": plan.api_url,
        "DASK_CONFIG": str(LOCAL_DASK_CONFIG),
        # Airflow's components start more `airflow` processes: they must find this environment's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    environment.update(plan.extra_env)
    return environment
