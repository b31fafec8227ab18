"""The load audit of `benchmarks.load` and the stack test: trigger classification runs on a running
stack through Airflow's REST API, wait for them, and check the catalog: one usage event and one
export per run, none lost, none duplicated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pointflow_dev.stack import LocalStack


@dataclass(frozen=True)
class BatchReport:
    """What a batch of classification runs did, read back from Airflow and the catalog."""

    runs: dict[str, dict[str, Any]]  # run id -> Airflow's final run record
    wall_seconds: float
    points: int
    usage_events: dict[str, int]  # job id -> classification usage events recorded for it
    exports: dict[str, int]  # job id -> manifests published for it
    task_seconds: dict[str, list[float]]  # task id -> how long each run's instance of it took

    @property
    def task_medians(self) -> dict[str, float]:
        """Median seconds per task, in the DAG's order."""
        return {task: statistics.median(seconds) for task, seconds in self.task_seconds.items() if seconds}

    @property
    def succeeded(self) -> list[str]:
        return [run_id for run_id, run in self.runs.items() if run["state"] == "success"]

    @property
    def run_seconds(self) -> dict[str, float]:
        return {run_id: _seconds(run["start_date"], run["end_date"]) for run_id, run in self.runs.items()}

    @property
    def lost_usage(self) -> list[str]:
        return [job for job, count in self.usage_events.items() if count == 0]

    @property
    def duplicated_usage(self) -> list[str]:
        return [job for job, count in self.usage_events.items() if count > 1]


def _seconds(start: str, end: str) -> float:

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def run_batch(
    stack: LocalStack,
    account_id: str,
    sources: list[Path],
    timeout: float,
    prefix: str = "batch",
    on_finished: Callable[[dict], None] = lambda run: None,
) -> BatchReport:
    """Trigger one pointflow_classify run per source, all at once, wait for all, then audit
    Airflow's outcome against the catalog: one usage event and one export per job."""
    from sqlalchemy import func, select

    from pipelines.catalog.models import Job, UsageEvent
    from pipelines.export import MANIFEST_NAME
    from pipelines.lasio import read_info
    from pipelines.runtime import Runtime
    from pipelines.settings import Settings
    from pipelines.steps.record import job_id_for

    dag_id = "pointflow_classify"
    client = stack.client()
    client.wait_for_dag(dag_id)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    started = time.monotonic()
    run_ids = [
        client.trigger(
            dag_id, f"{prefix}-{stamp}-{number:03d}", {"account_id": account_id, "source": str(source.resolve())}
        )
        for number, source in enumerate(sources)
    ]
    runs = client.wait_for_runs(dag_id, run_ids, timeout, on_finished)
    wall = time.monotonic() - started
    task_seconds: dict[str, list[float]] = {}
    for run_id in run_ids:
        for instance in client.task_instances(dag_id, run_id):
            if instance.get("duration") is not None:
                task_seconds.setdefault(instance["task_id"], []).append(float(instance["duration"]))

    runtime = Runtime.from_settings(Settings.from_env(stack.environment))
    job_ids = [job_id_for(dag_id, run_id) for run_id in run_ids]
    try:
        with runtime.catalog.session() as session:
            counted = dict(
                session.execute(
                    select(UsageEvent.job_id, func.count())
                    .where(UsageEvent.job_id.in_(job_ids), UsageEvent.kind == "classification")
                    .group_by(UsageEvent.job_id)
                ).all()
            )
            prefixes = dict(session.execute(select(Job.job_id, Job.export_prefix).where(Job.job_id.in_(job_ids))).all())
    finally:
        runtime.catalog.dispose()
    exports = {
        job: sum(1 for info in runtime.store.list(prefixes[job]) if info.key.endswith(MANIFEST_NAME))
        if prefixes.get(job)
        else 0
        for job in job_ids
    }
    points = sum(read_info(source).point_count for source in sources)
    return BatchReport(runs, wall, points, {job: counted.get(job, 0) for job in job_ids}, exports, task_seconds)
