"""`pointflow demo`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.common import settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the classification DAG end to end on a generated scene",
        description=(
            "Create the demo account, generate a synthetic scene (terrain, buildings, trees), and run the "
            "pointflow_classify DAG with Airflow's dag.test() on embedded defaults: SQLite, a local object "
            "store and a Dask LocalCluster under POINTFLOW_HOME. Prints where the export, its manifest and "
            "the run's log are."
        ),
    )
    parser.add_argument(
        "--input", type=Path, default=None, help="classify this LAS/LAZ file instead of a generated scene"
    )
    parser.add_argument(
        "--classifier", default="standard", help="standard (default), ground, or a trained model id of the demo account"
    )
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipelines.classifiers import describe_classifier
    from pointflow_dev.demo import run_demo

    if not args.classifier.startswith("model-"):
        # The DAG's own check of a built-in name, before minutes of Airflow start and retries.
        describe_classifier(args.classifier)
    settings = settings_from_env()
    print(f"pointflow demo in {settings.home} (set POINTFLOW_HOME to use another folder)")
    print(
        f"running the pointflow_classify DAG with dag.test(); Airflow's log: {settings.logs_dir / 'demo.log'}",
        flush=True,
    )
    result = run_demo(settings, classifier=args.classifier, input_path=args.input, verbose=args.verbose)
    job = result.job
    print(f"input:    {result.input_location}")
    print(f"job:      {job.job_id} -> {job.state}" + (f" ({job.error})" if job.error else ""))
    if result.export_url:
        counts = ", ".join(f"{k}: {v:,}" for k, v in job.class_counts.items())
        print(f"classes:  {counts}")
        print(f"export:   {result.export_url}")
        print(f"manifest: {result.manifest_url}")
        print(f"preview:  {result.preview_url}")
    if result.email_path:
        print(f"email:    {result.email_path}")
    print(f"log:      {result.log_path}")
    return 0 if job.state == "exported" else 1
