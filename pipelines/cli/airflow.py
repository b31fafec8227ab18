"""`pointflow airflow ...`: Airflow's own CLI with this project's DAGs, plugins and home wired in."""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.cli.common import CommandError, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "airflow",
        help="run Airflow's CLI wired to this project (e.g. 'pointflow airflow standalone')",
        description=(
            "Run the `airflow` command with AIRFLOW_HOME under POINTFLOW_HOME, the DAGs folder set to this "
            "project's dags/ and the plugins folder to plugins/, and example DAGs off. "
            "'pointflow airflow standalone' starts the UI on http://localhost:8080 (the admin password is "
            "printed, and kept in AIRFLOW_HOME/simple_auth_manager_passwords.json.generated); "
            '\'pointflow airflow dags trigger pointflow_classify -c \'{"account_id": "demo", "source": "/path/f.laz"}\'\' '
            "triggers a run. Variables you set yourself (AIRFLOW_HOME, AIRFLOW__*) win."
        ),
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for airflow, e.g. standalone")
    parser.set_defaults(handler=_airflow)


def _airflow(args: argparse.Namespace) -> int:
    from pipelines.airflow_local import airflow_environment

    if not args.args:
        raise CommandError("say what Airflow should do, e.g. 'pointflow airflow standalone'")
    environment = airflow_environment(settings_from_env())
    os.makedirs(environment["AIRFLOW_HOME"], exist_ok=True)
    print(f"AIRFLOW_HOME={environment['AIRFLOW_HOME']}", file=sys.stderr)
    # `airflow standalone` starts its components as `airflow ...` subprocesses: find ours first.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    os.execvpe(
        sys.executable, [sys.executable, "-m", "airflow", *args.args], {**os.environ, **environment, "PATH": path}
    )
