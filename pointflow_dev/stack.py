"""The multi-service deployment without Docker: every service a separate process on loopback.

The same shape as docker/compose.yaml: Airflow's api-server, scheduler, dag-processor and triggerer
(LocalExecutor) on PostgreSQL, the pointflow catalog on PostgreSQL, and a Dask scheduler with its
own worker processes that the classification tasks send their tiles to. Objects go to a local folder
unless POINTFLOW_STORAGE_URL says otherwise; mail to the outbox unless POINTFLOW_SMTP_URL is set.
Used by `pointflow stack up`, the load benchmark and the multi-service test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from pipelines.airflow_local import DAGS_FOLDER, PLUGINS_FOLDER
from pipelines.catalog.db import Catalog, normalise_url
from pipelines.cluster import LOCAL_DASK_CONFIG
from pipelines.errors import UserError
from pipelines.keys import kept_secret


class StackError(UserError):
    """A service of the stack did not come up, or refused a request; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refused API request


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


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self, environment: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # Own process group: stopping the service also stops what it started (task processes, nannies).
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        if not self.running():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class LocalStack:
    """Start with ``with LocalStack(plan) as stack:``; everything stops on exit, logs stay in plan.logs."""

    def __init__(self, plan: StackPlan, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> None:
        self.plan = plan
        self.say = log
        self.environment = stack_environment(plan)
        self.passwords_file = Path(self.environment["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
        self.password = plan.admin_password or self._kept_password() or secrets.token_urlsafe(12)
        self.services: list[Service] = []

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 240.0) -> None:
        plan = self.plan
        self._write_passwords()
        ensure_databases(plan)
        self.say("migrating Airflow's and pointflow's databases")
        self._run_once("airflow-db-migrate", [sys.executable, "-m", "airflow", "db", "migrate"])
        catalog = Catalog(plan.database_url("catalog"))
        catalog.migrate()
        catalog.dispose()

        python = sys.executable
        self._start(
            "dask-scheduler",
            [
                python,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(plan.dask_port),
                "--dashboard-address",
                ":0",
            ],
        )
        self._wait("dask-scheduler", lambda: _port_open(plan.dask_port), timeout)
        for number in range(1, plan.dask_workers + 1):
            self._start(
                f"dask-worker-{number}",
                [
                    python,
                    "-m",
                    "distributed.cli.dask_worker",
                    plan.dask_address,
                    "--nthreads",
                    "1",
                    "--name",
                    f"worker-{number}",
                    "--no-dashboard",
                    "--local-directory",
                    str(plan.base / "dask"),
                ],
            )
        self._wait(f"{plan.dask_workers} Dask workers", lambda: self.dask_worker_count() >= plan.dask_workers, timeout)

        self._start(
            "api-server", [python, "-m", "airflow", "api-server", "--port", str(plan.api_port), "--host", "127.0.0.1"]
        )
        self._wait("api-server", lambda: _get_ok(f"{plan.api_url}/api/v2/monitor/health"), timeout)
        for component in ("scheduler", "dag-processor", "triggerer"):
            self._start(component, [python, "-m", "airflow", component])
        self._wait("scheduler, dag-processor and triggerer", self._components_healthy, timeout)
        self.say(f"stack up: Airflow {plan.api_url}, Dask {plan.dask_address}, logs in {plan.logs}")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def client(self) -> AirflowClient:
        return AirflowClient(self.plan.api_url, self.plan.admin_user, self.password)

    def dask_worker_count(self) -> int:
        from distributed import Client

        try:
            with Client(self.plan.dask_address, timeout="5s") as client:
                return len(client.scheduler_info()["workers"])
        except OSError:
            return 0

    def _components_healthy(self) -> bool:
        try:
            health = requests.get(f"{self.plan.api_url}/api/v2/monitor/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        return all(
            health.get(part, {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor", "triggerer")
        )

    def _kept_password(self) -> str | None:
        if not self.passwords_file.exists():
            return None
        return json.loads(self.passwords_file.read_text()).get(self.plan.admin_user)

    def _write_passwords(self) -> None:
        self.passwords_file.parent.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({self.plan.admin_user: self.password}))
        self.passwords_file.chmod(0o600)

    def _run_once(self, name: str, argv: list[str]) -> None:
        log = self.plan.logs / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            completed = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=self.environment)
        if completed.returncode != 0:
            raise StackError(f"{name} failed (exit {completed.returncode}); see {log}")

    def _start(self, name: str, argv: list[str]) -> None:
        service = Service(name, argv, self.plan.logs / f"{name}.log")
        service.start(self.environment)
        self.services.append(service)

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [s for s in self.services if not s.running()]
            if dead:
                raise StackError(f"{dead[0].name} exited (code {dead[0].process.returncode}); see {dead[0].log}")
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {timeout:.0f} s; see the logs in {self.plan.logs}")
            time.sleep(1)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


class AirflowClient:
    """Airflow's public REST API (v2) with a token from the simple auth manager."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        response = self.http.post(
            f"{self.base_url}/auth/token", json={"username": username, "password": password}, timeout=30
        )
        if response.status_code != 201:
            raise StackError(f"Airflow refused the login for {username!r} (HTTP {response.status_code})")
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _call(self, method: str, path: str, attempts: int = 5, **kwargs) -> Any:
        """One API call; a busy server's 5xx or timeout is retried with backoff. Safe for POST too:
        the only POST names its run id, so a retry of one that did arrive gets 409 (see trigger)."""
        for attempt in range(1, attempts + 1):
            try:
                response = self.http.request(method, f"{self.base_url}/api/v2{path}", timeout=60, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = f"{type(error).__name__}"
            else:
                if response.status_code < 500:
                    if not response.ok:
                        raise StackError(
                            f"{method} {path}: HTTP {response.status_code} {response.text[:300]}", response.status_code
                        )
                    return response.json()
                failure = f"HTTP {response.status_code} {response.text[:300]}"
            if attempt < attempts:
                time.sleep(2**attempt)
        raise StackError(f"{method} {path}: {failure} after {attempts} attempts")

    def wait_for_dag(self, dag_id: str, timeout: float = 180.0) -> None:
        """Wait until the dag-processor has parsed the DAG, then make sure it is not paused."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.http.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=30)
            if response.ok:
                break
            if time.monotonic() > deadline:
                raise StackError(f"DAG {dag_id} not parsed after {timeout:.0f} s (HTTP {response.status_code})")
            time.sleep(2)
        self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> str:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        try:
            return self._call("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]
        except StackError as error:
            if error.status == 409:  # an earlier attempt of ours arrived after all
                return run_id
            raise

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def finished_runs(self, dag_id: str) -> dict[str, dict[str, Any]]:
        """Every finished (success or failed) run of the DAG, by run id, a page at a time."""
        finished: dict[str, dict[str, Any]] = {}
        while True:
            page = self._call(
                "GET",
                f"/dags/{dag_id}/dagRuns",
                params={"state": ["success", "failed"], "limit": 100, "offset": len(finished), "order_by": "id"},
            )
            finished.update((run["dag_run_id"], run) for run in page["dag_runs"])
            if not page["dag_runs"] or len(finished) >= page["total_entries"]:
                return finished

    def wait_for_runs(
        self, dag_id: str, run_ids: list[str], timeout: float, on_finished: Callable[[dict], None] = lambda run: None
    ) -> dict[str, dict[str, Any]]:
        """Poll until every run has finished (success or failed); returns each run's final record."""
        finished: dict[str, dict[str, Any]] = {}
        wanted = set(run_ids)
        deadline = time.monotonic() + timeout
        while True:
            for run_id, run in self.finished_runs(dag_id).items():
                if run_id in wanted and run_id not in finished:
                    finished[run_id] = run
                    on_finished(run)
            if len(finished) == len(wanted):
                return finished
            if time.monotonic() > deadline:
                raise StackError(
                    f"{len(wanted) - len(finished)} of {len(wanted)} runs unfinished after {timeout:.0f} s"
                )
            time.sleep(5)
