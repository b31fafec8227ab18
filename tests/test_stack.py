"""The multi-service shape of docker/compose.yaml, without Docker: Airflow's api-server, scheduler,
dag-processor and triggerer (LocalExecutor) on PostgreSQL, and a Dask scheduler with two worker
processes, each a separate process on loopback. Runs go in through Airflow's REST API."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from distributed import Client

from pipelines.accounts import upsert_accounts
from pipelines.catalog import Catalog
from pointflow_dev.batch import run_batch
from pointflow_dev.scene import make_scene, write_scene
from pointflow_dev.stack import LocalStack
from pointflow_dev.stack_plan import StackPlan, drop_databases, free_port
from tests.conftest import POSTGRES_ADMIN_URL, _postgres_reachable, make_account

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if not _postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    plan = StackPlan(
        base=tmp_path_factory.mktemp("stack"),
        postgres=POSTGRES_ADMIN_URL,
        name=f"pf_stack_{uuid.uuid4().hex[:8]}",
        api_port=free_port(),
        dask_port=free_port(),
        extra_env={"POINTFLOW_TILE_SIZE": "60", "POINTFLOW_TILE_BUFFER": "10"},
    )
    try:
        with LocalStack(plan) as running:
            yield running
    finally:
        drop_databases(plan)


def _executed_per_worker(stack: LocalStack) -> dict[str, int]:
    with Client(stack.plan.dask_address, timeout="10s") as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


def test_runs_through_airflow_on_postgres_and_dask_workers(stack: LocalStack, tmp_path: Path) -> None:
    catalog = Catalog(stack.plan.database_url("catalog"))
    upsert_accounts(catalog, [make_account("acme")])
    catalog.dispose()
    sources = [
        write_scene(make_scene(size=120.0, seed=seed), stack.plan.incoming / f"scene-{seed}.laz") for seed in (1, 2)
    ]
    before = _executed_per_worker(stack)

    report = run_batch(stack, "acme", sources, timeout=600, prefix="stack-test")

    failed = {run_id: run["state"] for run_id, run in report.runs.items() if run["state"] != "success"}
    assert not failed, f"runs did not succeed: {failed}; logs in {stack.plan.logs}"
    assert set(report.usage_events.values()) == {1}
    assert set(report.exports.values()) == {1}
    after = _executed_per_worker(stack)
    assert len(after) == 2
    # Tiles went to the stack's own Dask workers, not to a cluster started inside the task.
    assert sum(after.values()) > sum(before.values())
    client = stack.client()
    task_states = {
        ti["task_id"]: ti["state"] for ti in client.task_instances("pointflow_classify", report.succeeded[0])
    }
    assert task_states == dict.fromkeys(["ingest", "validate", "classify", "export", "deliver", "meter"], "success")

    # The api-server serves the pointflow page from the same PostgreSQL catalog the tasks wrote.
    job_id = next(iter(report.usage_events))
    page = client.http.get(f"{stack.plan.api_url}/pointflow/", timeout=60)
    assert page.status_code == 200 and job_id in page.text
    preview = client.http.get(f"{stack.plan.api_url}/pointflow/accounts/acme/jobs/{job_id}/preview.png", timeout=30)
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")


def test_a_file_put_in_the_drop_zone_is_exported_without_a_trigger(stack: LocalStack, tmp_path: Path) -> None:
    import shutil
    import time

    from sqlalchemy import select

    from pipelines.catalog.models import Job

    catalog = Catalog(stack.plan.database_url("catalog"))
    upsert_accounts(catalog, [make_account("dropper")])
    scene = write_scene(make_scene(size=100.0, seed=11), tmp_path / "survey.laz")
    zone = stack.plan.pointflow_home / "objects" / "incoming" / "dropper"
    zone.mkdir(parents=True, exist_ok=True)
    # As a customer's upload tool does: copy under a temporary dot-name, then rename.
    shutil.copyfile(scene, zone / ".survey.laz.part")
    (zone / ".survey.laz.part").rename(zone / "survey.laz")
    deadline = time.monotonic() + 420
    state = None
    while time.monotonic() < deadline and state != "exported":
        time.sleep(5)
        with catalog.session() as session:
            state = session.scalar(select(Job.state).where(Job.account_id == "dropper"))
    catalog.dispose()
    assert state == "exported", f"the dropped file's job is {state}; logs in {stack.plan.logs}"
    assert not zone.exists() or list(zone.iterdir()) == []  # an emptied folder is pruned


def test_stack_refuses_a_wrong_password(stack: LocalStack) -> None:
    from pointflow_dev.stack import AirflowClient, StackError

    with pytest.raises(StackError, match="refused the login"):
        AirflowClient(stack.plan.api_url, stack.plan.admin_user, "not-the-password")
