"""The demo: a synthetic scene classified by the real DAG on embedded defaults."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipelines.accounts import AccountRecord, upsert_accounts
from pipelines.airflow_local import load_dag, prepare_airflow
from pipelines.export import MANIFEST_NAME, read_manifest
from pipelines.logfile import output_to
from pipelines.notify import outbox_messages
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.ingest import upload
from pipelines.steps.record import JobRecord, job_id_for, job_view
from pointflow_dev.scene import make_scene, write_scene

DEMO_ACCOUNT = AccountRecord(
    account_id="demo",
    name="Demo Surveying Ltd",
    email="ops@demo.example",
    country="DE",
    plan="professional",
    started_at=date(2026, 1, 1),
)
DAG_ID = "pointflow_classify"


@dataclass(frozen=True)
class DemoResult:
    job: JobRecord
    input_location: str  # the input as stored in the demo account's raw area
    export_url: str | None
    manifest_url: str | None
    preview_url: str | None
    email_path: Path | None
    log_path: Path


def run_demo(
    settings: Settings, classifier: str = "standard", input_path: Path | None = None, verbose: bool = False
) -> DemoResult:
    """Run the demo; Airflow's own output goes to the log file unless `verbose`."""
    log_path = settings.logs_dir / "demo.log"
    prepare_airflow(settings, log_path)
    # Uploaded first, as a customer would: the run reads it from the account's own area (the
    # service's own folder, POINTFLOW_HOME, is never a source, so the scene is made outside it).
    with tempfile.TemporaryDirectory() as folder:
        source = (
            Path(input_path) if input_path is not None else write_scene(make_scene(), Path(folder) / "demo-scene.laz")
        )
        runtime = Runtime.from_settings(settings.allowing(source))
        upsert_accounts(runtime.catalog, [DEMO_ACCOUNT])
        stored = upload(runtime, DEMO_ACCOUNT.account_id, source)
    input_location = runtime.store.location(stored.key)

    dag = load_dag(DAG_ID)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with output_to(log_path, enabled=not verbose):
            run = dag.test(
                run_conf={"account_id": DEMO_ACCOUNT.account_id, "source": input_location, "classifier": classifier}
            )
    finally:
        root.removeHandler(handler)
        handler.close()
    job = job_view(runtime, job_id_for(DAG_ID, run.run_id))
    export_url = manifest_url = preview_url = None
    manifest = read_manifest(runtime.store, job.export_prefix) if job.export_prefix else None
    if manifest:
        urls = {a["kind"]: runtime.store.location(a["key"]) for a in manifest["artifacts"]}
        export_url, preview_url = urls["points"], urls["preview"]
        manifest_url = runtime.store.location(job.export_prefix + MANIFEST_NAME)
    messages = outbox_messages(settings)
    return DemoResult(
        job, input_location, export_url, manifest_url, preview_url, messages[-1] if messages else None, log_path
    )
