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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from pipelines.catalog.db import Catalog
from pipelines.errors import UserError
from pointflow_dev.stack_plan import StackPlan, ensure_databases, stack_environment


class StackError(UserError):
    """A service of the stack did not come up, or refused a request; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refused API request


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
