"""Load: many classification runs triggered at once on the multi-service stack (LocalExecutor).

Run from the repository root:  python -m benchmarks.load [--runs 50] [--size 80] [--postgres URL]

Starts the stack of `pointflow stack up` in a scratch folder with fresh databases on the PostgreSQL
server (Airflow's api-server, scheduler, dag-processor and triggerer; a Dask scheduler and two
workers), writes --runs small synthetic scenes, triggers one pointflow_classify run per scene through
Airflow's REST API in one burst, and waits for all of them. Prints throughput, the median and the
slowest run, each task's median time, and the usage audit: every run must have exactly one usage event and one export in the
catalog, none lost, none duplicated. Exits 1 when a run failed or the audit does not balance.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import uuid
from datetime import date
from pathlib import Path

from tqdm import tqdm

from pipelines.accounts import AccountRecord, upsert_accounts
from pipelines.catalog import Catalog
from pointflow_dev.batch import BatchReport, run_batch
from pointflow_dev.scene import make_scene, write_scene
from pointflow_dev.stack import LocalStack
from pointflow_dev.stack_plan import StackPlan, drop_databases, free_port

ACCOUNT = AccountRecord(
    "loadtest", "Load Test Surveying", "ops@loadtest.example", "DE", "professional", date(2026, 1, 1)
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=50, help="classification runs triggered at once (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=float,
        default=80.0,
        help="side of each synthetic scene in metres; 80 m is about 50,000 points (default: %(default)s)",
    )
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server for Airflow and the catalog (default: %(default)s)",
    )
    parser.add_argument(
        "--parallelism",
        type=int,
        default=None,
        help="Airflow's core.parallelism: task processes at once (default: twice the CPU cores)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for all runs (default: %(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder and the two databases for inspection"
    )
    return parser.parse_args(argv)


def print_report(report: BatchReport) -> None:
    durations = report.run_seconds
    slowest = max(durations, key=durations.get)
    runs = len(report.runs)
    print(
        f"runs:        {runs} triggered at once, {len(report.succeeded)} succeeded, {runs - len(report.succeeded)} failed"
    )
    print(f"wall time:   {report.wall_seconds:.1f} s from the first trigger to the last run finished")
    print(
        f"throughput:  {runs / report.wall_seconds * 60:.1f} runs/min, {report.points / report.wall_seconds:,.0f} points/s ({report.points:,} points)"
    )
    print(
        f"run time:    median {statistics.median(durations.values()):.1f} s, slowest {durations[slowest]:.1f} s ({slowest})"
    )
    print("task medians: " + ", ".join(f"{task} {seconds:.1f} s" for task, seconds in report.task_medians.items()))
    events = sum(report.usage_events.values())
    print(
        f"usage:       {events} classification events for {runs} runs; lost {len(report.lost_usage)}, duplicated {len(report.duplicated_usage)}"
    )
    print(f"exports:     {sum(1 for n in report.exports.values() if n == 1)} runs with exactly one export")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pointflow-load-"))
    plan = StackPlan(
        base=base,
        postgres=args.postgres,
        name=f"pf_load_{uuid.uuid4().hex[:8]}",
        api_port=free_port(),
        dask_port=free_port(),
        **({"parallelism": args.parallelism} if args.parallelism else {}),
        max_active_runs=args.runs,
    )
    sources = [
        write_scene(make_scene(size=args.size, seed=seed), plan.incoming / f"scene-{seed:03d}.laz")
        for seed in range(args.runs)
    ]
    print(f"stack in {base}; {args.runs} scenes of {args.size:.0f} m written", file=sys.stderr)
    try:
        with LocalStack(plan) as stack:
            catalog = Catalog(plan.database_url("catalog"))
            upsert_accounts(catalog, [ACCOUNT])
            catalog.dispose()
            with tqdm(total=args.runs, desc="runs finished", unit="run") as bar:
                report = run_batch(
                    stack,
                    ACCOUNT.account_id,
                    sources,
                    args.timeout,
                    prefix="load",
                    on_finished=lambda run: bar.update(),
                )
    finally:
        if not args.keep:
            drop_databases(plan)
            shutil.rmtree(base, ignore_errors=True)
    print_report(report)
    if args.keep:
        print(f"kept: {base} and databases {plan.name}_airflow, {plan.name}_catalog")
    balanced = len(report.succeeded) == len(report.runs) and not report.lost_usage and not report.duplicated_usage
    return 0 if balanced else 1


if __name__ == "__main__":
    sys.exit(main())
