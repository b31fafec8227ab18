"""Runs hostile files through `pointflow classify`, `pointflow ingest --run` and `pointflow train` in one process,
as tests/test_hostile.py's driver: `python -m tests.hostile_run CASES_DIR RESULTS.jsonl`.

One process and one Dask cluster (its children) for all files, so the suite costs seconds per
file, not a Python start-up and a cluster per command; each command still runs through the CLI's
own `main()`, with its stdout and stderr captured at the file-descriptor level (Rust panics and
native libraries write there too). One JSON line per file goes to RESULTS, a "start" line before
each, so the watchdog knows which file a hang or a blow-up belongs to.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from tests.hostile import CASES

ACCOUNT = "hostile"


@contextlib.contextmanager
def captured() -> Iterator[dict[str, str]]:
    """stdout and stderr of everything inside, at the descriptor level."""
    result: dict[str, str] = {}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
            for name, handle in (("out", out), ("err", err)):
                handle.seek(0)
                result[name] = handle.read().decode(errors="replace")


def command(*args: str) -> dict:
    from pipelines.cli import main

    with captured() as output:
        try:
            code = main(list(args))
        except BaseException:  # noqa: BLE001 - a traceback is exactly what the suite looks for
            traceback.print_exc()
            code = "uncaught"
    return {"code": code, **output}


def run_case(name: str, path: Path, outputs: Path) -> dict:
    import laspy
    from sqlalchemy import select

    from pipelines.catalog.models import Job, UsageEvent
    from pipelines.notify import outbox_messages
    from pipelines.runtime import Runtime
    from pipelines.scratch import folders
    from pipelines.settings import Settings

    output = outputs / (path.name + ".classified.laz")
    classify = command("classify", str(path), str(output))
    classify["output_points"] = laspy.open(output).header.point_count if output.exists() else None
    runtime = Runtime.from_settings(Settings.from_env())
    mails_before = len(outbox_messages(runtime.settings))
    ingest = command("ingest", str(path), "--account", ACCOUNT, "--run", "--json")
    with runtime.catalog.session() as session:
        job = session.scalars(select(Job).where(Job.source == str(path.resolve()))).one_or_none()
        usage = (
            [(e.status, e.points) for e in session.scalars(select(UsageEvent).where(UsageEvent.job_id == job.job_id))]
            if job
            else []
        )
        ingest["job"] = (
            {"state": job.state, "error": job.error, "points": job.points_processed, "export_prefix": job.export_prefix}
            if job
            else None
        )
    ingest["usage"] = usage
    ingest["exports"] = [
        o.key for o in runtime.store.list(f"accounts/{ACCOUNT}/exports/") if job and job.job_id in o.key
    ]
    ingest["mails"] = len(outbox_messages(runtime.settings)) - mails_before
    # Class 1 is learnt too: the sound files label ground (2) and the rest (1), so they reach the
    # features and the fitting, not only the gate.
    models_before = len(list(runtime.store.list(f"accounts/{ACCOUNT}/models/")))
    train = command("train", str(path), "--account", ACCOUNT, "--ignore-class", "0")
    train["objects_stored"] = len(list(runtime.store.list(f"accounts/{ACCOUNT}/models/"))) - models_before
    runtime.catalog.dispose()
    return {
        "name": name,
        "classify": classify,
        "ingest": ingest,
        "train": train,
        "scratch_left": [str(f.path) for f in folders(runtime.settings.scratch_dir)],
    }


def main() -> None:
    cases_dir, results = Path(sys.argv[1]), Path(sys.argv[2])
    from distributed import LocalCluster

    from pipelines.cli import main as pointflow

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        os.environ["POINTFLOW_DASK_ADDRESS"] = cluster.scheduler_address
        with captured():
            pointflow(
                [
                    "accounts",
                    "add",
                    ACCOUNT,
                    "--name",
                    "Hostile Ltd",
                    "--email",
                    "ops@hostile.example",
                    "--country",
                    "DE",
                    "--plan",
                    "professional",
                ]
            )
        outputs = Path(tempfile.mkdtemp(prefix="hostile-out-"))
        with open(results, "a") as log:
            for case in CASES:
                log.write(json.dumps({"start": case.name}) + "\n")
                log.flush()
                log.write(json.dumps(run_case(case.name, cases_dir / case.name, outputs)) + "\n")
                log.flush()


if __name__ == "__main__":
    main()
