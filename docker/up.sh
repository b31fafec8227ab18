#!/usr/bin/env bash
# Bring the pointflow stack up: docker/up.sh
#
# The first run writes docker/.env from docker/.env.example, giving every setting left empty there
# (the secrets) a fresh random value; later runs keep docker/.env as it is. Then it builds the
# pointflow image and starts every service, waiting until all are healthy.
#   docker/up.sh --env-only     only write docker/.env
#   docker/up.sh ARGS...        extra arguments for `docker compose up`, e.g. --scale dask-worker=4
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${here}/.env"

random_hex() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
# Fernet keys are 32 random bytes in URL-safe base64.
random_fernet() { head -c 32 /dev/urandom | base64 | tr -d '\n' | tr '+/' '-_'; }

if [[ ! -f "${env_file}" ]]; then
    umask 077
    while IFS= read -r line || [[ -n "${line}" ]]; do
        if [[ "${line}" =~ ^([A-Z0-9_]+)=$ ]]; then
            name="${BASH_REMATCH[1]}"
            if [[ "${name}" == "AIRFLOW_FERNET_KEY" ]]; then
                line="${name}=$(random_fernet)"
            else
                line="${name}=$(random_hex)"
            fi
        fi
        printf '%s\n' "${line}"
    done <"${here}/.env.example" >"${env_file}"
    echo "wrote ${env_file} with new secrets (keep it private; the Airflow password is AIRFLOW_ADMIN_PASSWORD)"
fi

if [[ "${1:-}" == "--env-only" ]]; then
    exit 0
fi

if ! docker info >/dev/null 2>&1; then
    echo "docker/up.sh: no Docker engine answers ('docker info' failed): start Docker, or check that you" \
        "may use it. Without Docker, 'make stack' runs the same services as local processes." >&2
    exit 2
fi
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "docker/up.sh: needs Docker Compose v2 ('docker compose' or 'docker-compose'): install Docker Engine" \
        "with its compose plugin. Without Docker, 'make stack' runs the same services as local processes." >&2
    exit 2
fi
"${compose[@]}" -f "${here}/compose.yaml" up -d --build --wait "$@"
echo "Airflow: http://localhost:8080 (user admin, password: AIRFLOW_ADMIN_PASSWORD in ${env_file})"
