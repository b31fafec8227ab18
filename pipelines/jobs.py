"""A classification job from start to finish in one process, as the DAG runs it step by step;
used by the CLI (`ingest --run`, `intake run --run`) and tests. Each step lives in pipelines/steps/.
"""

from __future__ import annotations

import logging
import uuid

from pipelines.catalog.models import JobState
from pipelines.notify import DeliveryError
from pipelines.runtime import Runtime
from pipelines.steps.classify import classify_step
from pipelines.steps.deliver import deliver_step
from pipelines.steps.export import export_step
from pipelines.steps.ingest import create_job, ingest_step
from pipelines.steps.meter import meter_step
from pipelines.steps.record import AdmissionRefusedJob, JobAborted, JobRecord, ValidationFailed, run_step
from pipelines.steps.validate import validate_step

log = logging.getLogger(__name__)


def run_job(
    runtime: Runtime,
    account_id: str,
    source: str,
    classifier: str = "standard",
    job_id: str | None = None,
    workers: int | None = None,
    export_format: str = "laz",
) -> JobRecord:
    """All steps in this process, as the DAG runs them; used by the CLI and tests."""
    job_id = job_id or "job-" + uuid.uuid4().hex[:20]
    create_job(runtime, job_id, account_id, source, classifier)
    return run_steps(runtime, job_id, workers, export_format)


def run_steps(runtime: Runtime, job_id: str, workers: int | None = None, export_format: str = "laz") -> JobRecord:
    """Every step of a created job in this process, metered once as soon as it ends (whatever
    happened), then the ready e-mail for an exported job: never an e-mail for a job not metered.
    The ingest step is a no-op for a job whose file is already stored (a drop-zone job)."""
    try:
        run_step(runtime, job_id, ingest_step)
        run_step(runtime, job_id, validate_step)
        run_step(runtime, job_id, classify_step, workers=workers)
        run_step(runtime, job_id, export_step, export_format=export_format)
    except (AdmissionRefusedJob, ValidationFailed, JobAborted):
        pass  # the job records why; nothing more runs
    finally:
        final = meter_step(runtime, job_id)
    if final.state == JobState.EXPORTED.value:
        try:
            run_step(runtime, job_id, deliver_step)
        except DeliveryError as error:
            # The export is published and metered either way; only the e-mail is missing.
            log.warning(
                "job %s is exported, but the ready e-mail was not sent: %s; check POINTFLOW_SMTP_URL", job_id, error
            )
    return final
