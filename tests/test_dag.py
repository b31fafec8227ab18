"""The classification DAG, run for real with dag.test() on embedded defaults and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.airflow_local import DAGS_FOLDER
from pipelines.catalog.models import UsageEvent
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.record import job_id_for, job_view
from tests.conftest import make_account

DAG_ID = "pointflow_classify"


@pytest.fixture
def dag(load_test_dag):
    return load_test_dag(DAG_ID)


def run(dag, account_id: str, source: Path) -> tuple[object, dict, Runtime]:
    dag_run = dag.test(run_conf={"account_id": account_id, "source": str(source), "classifier": "standard"})
    runtime = Runtime.from_settings(Settings.from_env())
    return dag_run, job_view(runtime, job_id_for(DAG_ID, dag_run.run_id)), runtime


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def usage(runtime: Runtime) -> list[tuple[str, int]]:
    with runtime.catalog.session() as session:
        return [(e.status, e.points) for e in session.scalars(select(UsageEvent))]


def test_dag_is_a_thin_table_of_contents(dag) -> None:
    assert [t.task_id for t in dag.topological_sort()][:4] == ["ingest", "validate", "classify", "export"]
    # Metered first, then the ready e-mail: no customer is told of a job that is not billed.
    assert dag.get_task("export").downstream_task_ids == {"meter"}
    assert dag.get_task("meter").downstream_task_ids == {"deliver"}
    assert dag.get_task("meter").trigger_rule == "all_done"
    assert len(Path(DAGS_FOLDER / "pointflow_classify.py").read_text().splitlines()) < 100


def test_dag_classifies_a_scene_end_to_end(dag, runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    dag_run, job, runtime = run(dag, "acme", scene_path)
    assert str(dag_run.state) == "success", task_states(dag_run)
    assert job.state == "exported"
    manifest = json.loads(runtime.store.get_bytes(job.export_prefix + "manifest.json"))
    assert manifest["points"]["output"] == manifest["points"]["input"] > 0
    assert usage(runtime) == [("succeeded", manifest["points"]["output"])]


def test_dag_on_s3(dag, home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, scene_path: Path) -> None:
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    dag_run, job, runtime = run(dag, "acme", scene_path)
    assert str(dag_run.state) == "success", task_states(dag_run)
    assert runtime.store.exists(job.export_prefix + "manifest.json")
    assert runtime.store.url.startswith("s3://")


def test_corrupt_file_fails_the_run_at_validation(dag, runtime: Runtime, tmp_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    source = tmp_path / "renamed.las"
    source.write_text("this is a text file")
    dag_run, job, runtime = run(dag, "acme", source)
    states = task_states(dag_run)
    assert str(dag_run.state) == "failed"
    assert (
        states["validate"] == "failed"
        and states["classify"] == "upstream_failed"
        and states["export"] == "upstream_failed"
    )
    assert job.state == "quarantined" and "not a LAS/LAZ file" in job.error
    assert list(runtime.store.list("accounts/acme/exports/")) == []
    assert usage(runtime) == [("failed", 0)]


def test_export_crash_between_artifacts_and_manifest_is_retried_once(
    dag, runtime: Runtime, scene_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.export as export

    upsert_accounts(runtime.catalog, [make_account("acme")])
    real_put_bytes = type(runtime.store).put_bytes
    crashes = []

    def crash_on_first_manifest(store, key, data):
        if key.endswith("manifest.json") and not crashes:
            crashes.append(key)
            raise OSError("disk vanished while publishing")
        return real_put_bytes(store, key, data)

    monkeypatch.setattr(type(runtime.store), "put_bytes", crash_on_first_manifest)
    dag_run, job, runtime = run(dag, "acme", scene_path)
    assert crashes and str(dag_run.state) == "success", task_states(dag_run)
    [ti] = [ti for ti in dag_run.get_task_instances() if ti.task_id == "export"]
    assert ti.try_number == 2
    assert export.read_manifest(runtime.store, job.export_prefix) is not None
    assert len(usage(runtime)) == 1


def test_service_dags_are_active_on_deployment(load_test_dag) -> None:
    """A trigger from the README runs at once (a paused DAG queues it for good); only the monthly
    billing waits for the operator, since unpausing it invoices every month since its start."""
    for dag_id in ("pointflow_classify", "pointflow_intake", "pointflow_train", "lifecycle_nightly"):
        assert load_test_dag(dag_id).is_paused_upon_creation is False, dag_id
    assert load_test_dag("billing_monthly").is_paused_upon_creation is True
