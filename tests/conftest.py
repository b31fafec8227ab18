"""Shared fixtures: an isolated POINTFLOW_HOME, real S3 (moto server) and PostgreSQL on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from pipelines.accounts import AccountRecord, upsert_accounts
from pipelines.airflow_local import DAGS_FOLDER, PLUGINS_FOLDER
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pointflow_dev.scene import make_scene, write_scene
from pointflow_dev.stack_plan import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
POSTGRES_ADMIN_URL = os.environ.get("POINTFLOW_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")

POINTFLOW_VARIABLES = [name for name in os.environ if name.startswith("POINTFLOW_")]


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data {relative} not found in {SHARED_DATA}")
    return path


def stop_processes(processes: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process still running, then SIGKILL each one that outlives `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def abandoned_work_dir(
    scratch: Path,
    kind: str,
    account_id: str | None = None,
    job_id: str | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """A scratch work folder as a killed process leaves it: made by pipelines.scratch.work_dir in a
    child process that dies inside the block (its lock is released, the folder stays)."""
    code = (
        "import json, os, sys; from pathlib import Path; from pipelines.scratch import work_dir\n"
        "scratch, kind, account, job, files = sys.argv[1:]\n"
        "with work_dir(Path(scratch), kind, account or None, job or None) as folder:\n"
        "    [(folder / name).write_bytes(bytes.fromhex(data)) for name, data in json.loads(files).items()]\n"
        "    print(folder, flush=True); os._exit(9)\n"
    )
    import json

    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(scratch),
            kind,
            account_id or "",
            job_id or "",
            json.dumps({k: v.hex() for k, v in (files or {}).items()}),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 9, run.stderr
    return Path(run.stdout.strip())


@pytest.fixture
def home(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh POINTFLOW_HOME with embedded defaults; other POINTFLOW_* variables are cleared.

    Sources may come from the tests' temporary folders and the shared real data, as an operator
    would allow an incoming folder (POINTFLOW_INPUT_DIRS); the home itself never is one.
    """
    for name in POINTFLOW_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "home"
    monkeypatch.setenv("POINTFLOW_HOME", str(path))
    monkeypatch.setenv("POINTFLOW_WORKERS", "2")
    monkeypatch.setenv("POINTFLOW_INPUT_DIRS", os.pathsep.join([str(tmp_path_factory.getbasetemp()), str(SHARED_DATA)]))
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings.from_env()


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.catalog.dispose()


def make_account(account_id: str = "acme", plan: str = "professional", email: str | None = None) -> AccountRecord:
    return AccountRecord(
        account_id, f"{account_id} GmbH", email or f"ops@{account_id}.example", "DE", plan, date(2026, 1, 1)
    )


@pytest.fixture
def account(runtime: Runtime) -> str:
    upsert_accounts(runtime.catalog, [make_account()])
    return "acme"


@pytest.fixture(scope="session")
def scene_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled synthetic scene (classes written) as LAZ."""
    return write_scene(
        make_scene(size=120, density=6, buildings=3, trees=25, seed=7),
        tmp_path_factory.mktemp("scene") / "scene.laz",
        with_labels=True,
    )


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Airflow's own metadata DB for the test session (Airflow reads these variables at import)."""
    home = tmp_path_factory.mktemp("airflow")
    os.environ.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS_FOLDER),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
    )
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ.copy()
    )
    return home


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint on loopback (moto in server mode)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"pf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; skips where no server is reachable."""
    if not _postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = f"pointflow_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # noqa: BLE001 - any refusal means "no usable server here"
        admin.dispose()
        pytest.skip(f"cannot create a PostgreSQL test database: {error}")
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, home: Path) -> str:
    """Run a catalog test on both databases."""
    if request.param == "sqlite":
        return f"sqlite:///{home / 'catalog.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def catalog_runtime(home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A runtime whose catalog is SQLite or PostgreSQL, with the account acme."""
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", database_url)
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    yield runtime
    runtime.catalog.dispose()


class SmtpSink:
    """A real SMTP server on loopback that keeps what it receives, or refuses everything."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[bytes] = []
        self.refusing = False
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.refusing:
            return "451 4.3.0 mailbox temporarily unavailable"
        self.messages.append(envelope.content)
        return "250 OK"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def parsed(self) -> list:
        from email import message_from_bytes, policy

        return [message_from_bytes(m, policy=policy.default) for m in self.messages]


@pytest.fixture
def smtp_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    """POINTFLOW_SMTP_URL pointed at a live SMTP server on loopback."""
    sink = SmtpSink()
    sink.controller.start()
    monkeypatch.setenv("POINTFLOW_SMTP_URL", sink.url)
    yield sink
    sink.controller.stop()


@pytest.fixture
def load_test_dag(airflow_home: Path):
    """Load a DAG of dags/ with retry delays removed: tests exercise retries, not the waiting."""
    from datetime import timedelta

    from pipelines.airflow_local import load_dag

    def load(dag_id: str):
        dag = load_dag(dag_id)
        for task in dag.tasks:
            task.retry_delay = timedelta(0)
        return dag

    return load
