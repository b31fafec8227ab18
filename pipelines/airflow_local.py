"""Airflow wired to this project for local runs: its DAGs and plugins, its home under POINTFLOW_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipelines.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = PROJECT_ROOT / "dags"
PLUGINS_FOLDER = PROJECT_ROOT / "plugins"


def airflow_environment(settings: Settings) -> dict[str, str]:
    """Variables Airflow reads at import time; values the user already set are kept."""
    defaults = {
        "AIRFLOW_HOME": str(settings.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.logs_dir / "airflow"),
        "POINTFLOW_HOME": str(settings.home),
    }
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def prepare_airflow(settings: Settings, log_path: Path) -> dict[str, str]:
    """Set the environment for this process and create or upgrade Airflow's metadata database."""
    environment = airflow_environment(settings)
    os.environ.update(environment)
    Path(environment["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    if completed.returncode != 0:
        raise RuntimeError(f"'airflow db migrate' failed; see {log_path}")
    return environment


def load_dag(dag_id: str):
    """The DAG object from this project's dags/ folder (call after prepare_airflow)."""
    import importlib.util

    from airflow.sdk import DAG

    for path in sorted(DAGS_FOLDER.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"pointflow_dags.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, DAG) and value.dag_id == dag_id:
                return value
    raise RuntimeError(f"no DAG {dag_id!r} in {DAGS_FOLDER}")
