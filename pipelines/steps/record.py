"""The job record and its state machine, the refusals that end a job, and running one step of it.

Every step reads the job's state first and skips work already done, so a retried task never
writes an output twice or meters a job twice; the catalog enforces the state machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select

from pipelines.catalog import CatalogError
from pipelines.catalog.models import JOB_TRANSITIONS, TERMINAL_JOB_STATES, Job, JobState, StoredFile, utcnow
from pipelines.errors import USER_ERRORS, PointflowError
from pipelines.runtime import Runtime


class IllegalTransition(CatalogError):
    pass


class AdmissionRefusedJob(PointflowError):
    """The account's limits refused the file before anything was stored; nothing is charged."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id}: {reason}")


class ValidationFailed(PointflowError):
    """The input was quarantined; nothing downstream may run."""

    def __init__(self, job_id: str, reason: str, report_key: str | None) -> None:
        super().__init__(f"job {job_id}: input refused: {reason}")
        self.reason = reason
        self.report_key = report_key


class JobAborted(PointflowError):
    """The job was aborted on request (pipelines.abort): nothing downstream may run; the meter step
    bills the points classified before it stopped."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: aborted on request")


def job_id_for(dag_id: str, run_id: str) -> str:
    """Stable across task retries, unique per DAG run, and safe in object keys."""
    return "job-" + uuid.uuid5(uuid.NAMESPACE_URL, f"pointflow:{dag_id}:{run_id}").hex[:20]


def set_state(job: Job, state: JobState) -> None:
    current = JobState(job.state)
    if state != current and state not in JOB_TRANSITIONS[current]:
        raise IllegalTransition(f"job {job.job_id}: cannot go from {current.value} to {state.value}")
    job.state = state.value
    if state in TERMINAL_JOB_STATES and job.finished_at is None:
        job.finished_at = utcnow()


def job_row(session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise CatalogError(f"unknown job {job_id!r}")
    return job


def job_file_name(source: str) -> str:
    """The name the job's file was submitted under: the last part of its source (a local path, or a
    store location such as the drop-zone object it was uploaded as). The same bytes stored once may
    have come under another name first, which the stored file keeps."""
    path = unquote(urlsplit(source).path) if "://" in source else source.split("?", 1)[0]
    return PurePosixPath(path.replace("\\", "/")).name or source


def stored_file(session, job: Job) -> StoredFile:
    if job.file_id is None:
        raise CatalogError(f"job {job.job_id} has no ingested file yet")
    return session.get(StoredFile, job.file_id)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of a stored summary that `cls` has a field for (a catalog may hold older ones)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass(frozen=True)
class ValidationSummary:
    """What validation found, as the job's summary and the manifest give it."""

    mode: str
    points_checked: int
    warnings: list[str]
    report_key: str | None = None  # jobs validated before 9970d29 have none


@dataclass(frozen=True)
class JobSummary:
    """A job's `summary` JSON, typed: validation's figures once validated, the classification's
    once classified (None until then). The class counts keep JSON's string keys, as the manifest."""

    validation: ValidationSummary | None = None
    input_points: int | None = None
    output_points: int | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    classifier: str | None = None
    classifier_version: str | None = None
    classifier_params: dict[str, Any] | None = None
    tiles: int | None = None
    tile_size: float | None = None
    tile_buffer: float | None = None
    sparse_points: int | None = None
    workers: int | None = None
    units: dict[str, Any] | None = None
    timings: dict[str, float] | None = None

    @classmethod
    def of(cls, summary: dict[str, Any] | None) -> JobSummary:
        data = _known(cls, summary or {})
        validation = data.pop("validation", None)
        return cls(ValidationSummary(**_known(ValidationSummary, validation)) if validation else None, **data)


def held_out_scores(classifier_params: dict[str, Any] | None) -> tuple[float, float] | None:
    """A custom model's macro F1 and standard's on the customer's held-out labels, the figures it
    was offered on (`TrainedClassifier.params`); None for the built-in classifiers."""
    params = classifier_params or {}
    mine, theirs = params.get("held_out_macro_f1"), params.get("standard_held_out_macro_f1")
    return None if mine is None or theirs is None else (float(mine), float(theirs))


@dataclass(frozen=True)
class JobRecord:
    """A job as the catalog holds it, read in one transaction: what every step returns."""

    job_id: str
    account_id: str
    file_id: int | None
    source: str
    state: str
    classifier: str
    classifier_version: str | None
    classifier_params: dict[str, Any] | None
    points_processed: int
    classified_key: str | None
    export_prefix: str | None
    report_key: str | None
    # Classification figures and validation warnings as the catalog stores them (JSON), which
    # `--json` prints; the steps read them typed (`figures`).
    summary: dict[str, Any] | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    abort_requested_at: datetime | None  # `pointflow jobs abort` (pipelines.abort)
    metered_at: datetime | None  # when its usage event was recorded (steps.meter)
    working_objects_held_at: datetime | None  # closed under legal hold, its working objects kept (lifecycle.sweeps)

    @classmethod
    def of(cls, row: Job) -> JobRecord:
        return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})

    @property
    def figures(self) -> JobSummary:
        """The summary, typed."""
        return JobSummary.of(self.summary)

    @property
    def class_counts(self) -> dict[int, int]:
        """Points per ASPRS class once classified (the summary keeps JSON's string keys)."""
        return {int(code): points for code, points in self.figures.class_counts.items()}

    def to_dict(self) -> dict[str, Any]:
        """The record as `--json` prints it: one key per catalog column."""
        return asdict(self)


def job_view(runtime: Runtime, job_id: str) -> JobRecord:
    with runtime.catalog.session() as session:
        return JobRecord.of(job_row(session, job_id))


def refuse_job(runtime: Runtime, job_id: str, reason: str) -> None:
    """End a job whose input was refused before it was stored; raises AdmissionRefusedJob."""
    with runtime.catalog.session() as session:
        record = job_row(session, job_id)
        record.error = reason
        set_state(record, JobState.FAILED)
    raise AdmissionRefusedJob(job_id, reason) from None


def cause(error: BaseException) -> str:
    """One line for the job's record: what went wrong, without a traceback."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}".rstrip(": ")


def run_step(runtime: Runtime, job_id: str, step: Callable[..., JobRecord], **options: Any) -> JobRecord:
    """Run one step for the job; a failure's cause is recorded on the job before it propagates,
    so `pointflow jobs show` and the meter step can tell it. A job aborted on request (pipelines.abort)
    runs no step but the meter step: JobAborted."""
    if step.__name__ != "meter_step":
        honour_abort(runtime, job_id)
    try:
        return step(runtime, job_id, **options)
    except (AdmissionRefusedJob, ValidationFailed, JobAborted):
        raise  # the step recorded why
    except Exception as error:
        with runtime.catalog.session() as session:
            job = job_row(session, job_id)
            aborted = JobState(job.state) == JobState.ABORTED
            if JobState(job.state) not in TERMINAL_JOB_STATES:
                job.error = f"{step.__name__.removesuffix('_step')}: {cause(error)}"
        if aborted:  # ended by `jobs abort` while the step ran: what it did next was refused
            raise JobAborted(job_id) from error
        raise


def honour_abort(runtime: Runtime, job_id: str) -> None:
    """Raise JobAborted when the job was aborted, or its abort requested (then it ends aborted here,
    with the points it has processed so far)."""
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        state = JobState(job.state)
        if state == JobState.ABORTED:
            raise JobAborted(job_id)
        if job.abort_requested_at is None or state in TERMINAL_JOB_STATES:
            return
        job.error = f"aborted on request while {state.value}"
        set_state(job, JobState.ABORTED)
    raise JobAborted(job_id)


def list_jobs(runtime: Runtime, account_id: str | None = None, state: JobState | None = None) -> list[JobRecord]:
    """Jobs oldest first, of one account or all, in one state or any."""
    query = select(Job).order_by(Job.created_at, Job.job_id)
    if account_id is not None:
        query = query.where(Job.account_id == account_id)
    if state is not None:
        query = query.where(Job.state == state.value)
    with runtime.catalog.session() as session:
        return [JobRecord.of(row) for row in session.scalars(query)]
