#!/usr/bin/env bash
# One-shot setup that the compose service `airflow-init` runs before anything else starts:
# POINTFLOW_HOME's folders and the input folders, the Airflow admin password, Airflow's metadata
# database and pointflow's catalog. Every step is idempotent, so running it again (every `up`) is safe.
set -euo pipefail

: "${POINTFLOW_HOME:?POINTFLOW_HOME is not set}"
: "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD in docker/.env (docker/up.sh generates one)}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE is not set}"

mkdir -p "${POINTFLOW_HOME}/scratch" "${POINTFLOW_HOME}/logs"
# Sources given by path are read from POINTFLOW_INPUT_DIRS (':'-separated), never from POINTFLOW_HOME.
IFS=: read -r -a input_dirs <<< "${POINTFLOW_INPUT_DIRS:-}"
for folder in "${input_dirs[@]}"; do
    if [ -n "$folder" ]; then
        mkdir -p "$folder"
    fi
done

# Airflow's simple auth manager keeps {"user": "password"} in this file and generates a password
# for any user missing from it. Writing it here makes the password the one in docker/.env.
python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(descriptor, "w") as handle:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, handle)
PY

airflow db migrate

pointflow db upgrade

echo "pointflow init: Airflow database, pointflow catalog and admin password are ready"
