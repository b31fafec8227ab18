"""The classify step: the validated file, tiled on Dask, to the account's classified area."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipelines.abort import AbortWatch
from pipelines.catalog.models import JobState
from pipelines.classify import ClassificationAborted, classify_file
from pipelines.gate import NotPointCloudError
from pipelines.runtime import Runtime
from pipelines.scratch import work_dir
from pipelines.sources import readable_path
from pipelines.steps.record import JobAborted, JobRecord, job_row, job_view, set_state, stored_file
from pipelines.steps.validate import quarantine
from pipelines.storage import AccountArea
from pipelines.training import resolve_classifier
from pipelines.validate import Finding, ValidationReport

log = logging.getLogger(__name__)

# How often the log notes a classification's progress (tiles classified of the file's).
PROGRESS_LOG_SECONDS = 5.0


class _ProgressLog:
    """The classification's progress in the log: the first tile, then at most every PROGRESS_LOG_SECONDS."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.logged_at = job_id, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != "classify" or (self.logged_at is not None and now - self.logged_at < PROGRESS_LOG_SECONDS):
            return
        self.logged_at = now
        log.info("job %s: %d of %d tiles classified", self.job_id, done, total)


def classify_step(runtime: Runtime, job_id: str, workers: int | None = None, client: Any = None) -> JobRecord:
    """Classify the validated file; points the sample-based validation could not see are checked
    here, and a file found bad now is quarantined like one refused by validation."""
    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        if (
            JobState(job.state) in (JobState.CLASSIFIED, JobState.EXPORTED)
            and job.classified_key
            and runtime.store.exists(job.classified_key)
        ):
            return job_view(runtime, job_id)
        set_state(job, JobState.CLASSIFYING)
        stored = stored_file(session, job)
        file_key, name, account_id, classifier = stored.key, stored.original_name, job.account_id, job.classifier

    refused: NotPointCloudError | None = None
    aborted: ClassificationAborted | None = None
    with work_dir(runtime.settings.scratch_dir, "job", account_id, job_id) as work:
        output = work / (Path(name).stem + ".laz")
        with readable_path(runtime.store, file_key, runtime.settings.scratch_dir) as path:
            model = resolve_classifier(runtime, account_id, classifier)
            try:
                result = classify_file(
                    path,
                    output,
                    runtime.settings,
                    classifier=model,
                    workers=workers,
                    client=client,
                    account_id=account_id,
                    job_id=job_id,
                    should_stop=AbortWatch(runtime, job_id),
                    progress=_ProgressLog(job_id),
                )
            except NotPointCloudError as error:
                refused = NotPointCloudError(str(error).replace(path.name, name), error.check)
            except ClassificationAborted as stopped:
                aborted = stopped
        if refused is None and aborted is None:
            classified_key = AccountArea(account_id).key("classified", job_id, output.name)
            runtime.store.put_file(classified_key, output)
    if aborted is not None:
        # Nothing was stored and the work folders are gone; the tiles classified before the stop are billed.
        with runtime.catalog.session() as session:
            job = job_row(session, job_id)
            job.points_processed = aborted.points
            job.error = (
                f"aborted on request while classifying: {aborted.points:,} points ({aborted.tiles} tiles) classified"
            )
            set_state(job, JobState.ABORTED)
        raise JobAborted(job_id)
    if refused is not None:
        finding = Finding("gate", refused.check, "error", str(refused), "found while classifying every point")
        report = ValidationReport(name, False, "full", 0, None, errors=[finding])
        report_key = AccountArea(account_id).key("reports", f"{job_id}-classification.json")
        runtime.store.put_bytes(report_key, report.to_json())
        runtime.store.put_bytes(report_key.replace(".json", ".html"), report.to_html())
        quarantine(runtime, job_id, account_id, file_key, name, report, report_key)

    with runtime.catalog.session() as session:
        job = job_row(session, job_id)
        job.classified_key = classified_key
        job.points_processed = result.output_points
        job.classifier_version = result.classifier_version
        job.classifier_params = result.classifier_params
        job.summary = {
            **(job.summary or {}),
            **{
                "input_points": result.input_points,
                "output_points": result.output_points,
                "class_counts": {str(k): v for k, v in result.class_counts.items()},
                "classifier": result.classifier,
                "classifier_version": result.classifier_version,
                "classifier_params": result.classifier_params,
                "tiles": result.tiles,
                "tile_size": result.tile_size,
                "tile_buffer": result.tile_buffer,
                "sparse_points": result.sparse_points,
                "workers": result.workers,
                "units": result.units.to_dict(),
                "timings": result.timings,
            },
        }
        set_state(job, JobState.CLASSIFIED)
    return job_view(runtime, job_id)
