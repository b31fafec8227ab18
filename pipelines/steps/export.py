"""The export step: the classified points, class summaries, preview and report, manifest last."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.catalog.models import JobState, utcnow
from pipelines.export import MANIFEST_NAME, build_artifacts, build_manifest, export_prefix, publish, read_manifest
from pipelines.runtime import Runtime
from pipelines.scratch import work_dir
from pipelines.sources import readable_path
from pipelines.steps.record import (
    IllegalTransition,
    JobRecord,
    job_file_name,
    job_row,
    job_view,
    set_state,
    stored_file,
)
from pipelines.storage import safe_name

log = logging.getLogger(__name__)


def export_step(runtime: Runtime, job_id: str, export_format: str = "laz") -> JobRecord:
    """Publish the classified points, class summaries, preview and report; manifest last."""
    job = job_view(runtime, job_id)
    prefix = export_prefix(job.account_id, job_id)
    if job.state == JobState.EXPORTED.value and read_manifest(runtime.store, prefix) is not None:
        return job
    if job.state != JobState.CLASSIFIED.value:
        raise IllegalTransition(f"job {job_id} is {job.state}, not classified: nothing to export")
    with runtime.catalog.session() as session:
        stored = stored_file(session, job_row(session, job_id))
        input_file = {
            "key": stored.key,
            "name": job_file_name(job.source),  # the job's own name: the stored file keeps its first
            "sha256": stored.sha256,
            "size": stored.size,
            "points": stored.point_count,
            "crs": stored.crs,
        }
    stem = Path(safe_name(input_file["name"])).stem
    report_key = job.report_key.replace(".json", ".html") if job.report_key else None
    report_html = runtime.store.get_bytes(report_key) if report_key and runtime.store.exists(report_key) else None
    counts = job.class_counts
    scratch = runtime.settings.scratch_dir
    with (
        readable_path(runtime.store, job.classified_key, scratch) as path,
        work_dir(scratch, "export", job.account_id, job_id) as work,
    ):
        artifacts, coordinates = build_artifacts(
            path, work, stem, export_format, counts, report_html, f"{input_file['name']}: classes"
        )
        publish(
            runtime.store,
            job.account_id,
            job_id,
            artifacts,
            lambda described: build_manifest(job, input_file, described, job.figures, coordinates, utcnow()),
        )
    with runtime.catalog.session() as session:
        record = job_row(session, job_id)
        record.export_prefix = prefix
        set_state(record, JobState.EXPORTED)
    log.info("export published: %s", runtime.store.location(prefix + MANIFEST_NAME))
    return job_view(runtime, job_id)
