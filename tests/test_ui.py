"""The pointflow page in the Airflow UI, against a real `airflow api-server` and real data.

One module-wide setup: a POINTFLOW_HOME seeded by the real pipeline (a classified job on the
synthetic scene, imported usage, a billing run with its documents, a lifecycle run that sends
notices and locks a trial, a legal hold), and an api-server with the simple auth manager and a
known password (an admin, and a viewer who may read but not change). The HTTP tests check that
every plugin route enforces Airflow's authentication, that one account's URL never reaches another
account's objects, and what the abort of a job requires; the browser test logs in through Airflow's
login page with Debian's chromium, aborts a job from the framed page and saves a screenshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from pipelines.accounts import AccountRecord, upsert_accounts
from pipelines.billing.delivery import MonthlyBilling, email_invoices, publish_documents
from pipelines.billing.invoicing import run_billing
from pipelines.billing.periods import Period, add_months
from pipelines.catalog.models import Job, SentMessage, TrainedModelRecord, UsageEvent
from pipelines.export import export_prefix, read_manifest
from pipelines.jobs import run_job
from pipelines.lifecycle import place_hold, run_lifecycle, terminate_account
from pipelines.lifecycle.models import LifecycleAction
from pipelines.links import DOWNLOAD_PATH, LinkClaim, LinkSigner
from pipelines.metering import UsageRecord, record_usage
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.ingest import create_job
from pipelines.steps.record import JobRecord, job_view
from tests.conftest import REPO, free_port, stop_processes

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
# WebGL (the 3D view) without a GPU: Chromium's software renderer, allowed for this trusted page.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UTC = UTC


@dataclass(frozen=True)
class Seeded:
    job_id: str
    locked_job_id: str  # a job of the account whose contract ended
    classes: list[str]  # class names of the job's summary
    invoices: dict[str, str]  # account id -> its invoice number for last month (free plans get none)
    months: list[str]  # the months with usage, oldest first
    hold_reason: str


@dataclass(frozen=True)
class Server:
    url: str
    password: str
    viewer_password: str  # user "viewer", role VIEWER
    log: Path


def seed(runtime: Runtime, scene: Path) -> Seeded:
    now = datetime.now(UTC)
    this_month = Period.of(now.date())
    last_month = Period.of(add_months(this_month.first_day, -1))
    month_before = Period.of(add_months(this_month.first_day, -2))
    upsert_accounts(
        runtime.catalog,
        [
            AccountRecord(
                "acme",
                "Acme Surveying GmbH",
                "ops@acme.example",
                "DE",
                "professional",
                date(2026, 1, 1),
                last_login_at=now - timedelta(days=2),
            ),
            # Free, and no login for 14 months: the lifecycle run sends its inactivity notice.
            AccountRecord(
                "northwind",
                "Northwind Mapping",
                "it@northwind.example",
                "GB",
                "free",
                (now - timedelta(days=800)).date(),
                last_login_at=now - timedelta(days=430),
            ),
            # Ended its contract on the 1st: closed, data locked, deletion due after the grace period (on hold).
            AccountRecord(
                "tidewater",
                "Tidewater Drones",
                "hello@tidewater.example",
                "NL",
                "professional",
                (now - timedelta(days=200)).date(),
                last_login_at=now - timedelta(days=30),
            ),
        ],
    )
    record_usage(
        runtime.catalog,
        [
            UsageRecord(
                "seed-acme-1",
                "acme",
                "classification",
                month_before.start + timedelta(days=3),
                3_400_000,
                "succeeded",
                "standard",
                "1",
            ),
            UsageRecord(
                "seed-acme-2",
                "acme",
                "classification",
                last_month.start + timedelta(days=9),
                5_250_000,
                "succeeded",
                "standard",
                "1",
            ),
            UsageRecord(
                "seed-north-1",
                "northwind",
                "classification",
                last_month.start + timedelta(days=4),
                1_200_000,
                "succeeded",
                "csf",
                "1",
            ),
            UsageRecord(
                "seed-north-2",
                "northwind",
                "classification",
                last_month.start + timedelta(days=5),
                800_000,
                "failed",
                "csf",
                "1",
            ),
        ],
    )
    job = run_job(runtime, "acme", str(scene), classifier="standard", job_id="job-ui-acme-1", workers=1)
    assert job.state == "exported", job.error
    # Classified before its contract ended: afterwards its results are locked, not served.
    locked_job = run_job(
        runtime, "tidewater", str(scene), classifier="standard", job_id="job-ui-tidewater-1", workers=1
    )
    assert locked_job.state == "exported", locked_job.error

    billing = MonthlyBilling.open(runtime.settings, last_month.label)
    try:
        invoices = run_billing(billing.catalog, last_month, billing.pricebook).invoices
        publish_documents(billing)
        email_invoices(billing)
    finally:
        billing.catalog.dispose()

    terminate_account(runtime.catalog, "tidewater", "customer", effective=this_month.first_day)
    actions = {(a.account_id, a.action) for a in run_lifecycle(runtime, now)}
    assert {("northwind", "inactivity_notice"), ("tidewater", "terminated"), ("tidewater", "data_locked")} <= actions, (
        actions
    )
    reason = "case 2026-117: records requested by the aviation authority"
    place_hold(runtime.catalog, "tidewater", reason)
    # Inactive for 13 months, added after the nightly run: its notice is due at the next one.
    upsert_accounts(
        runtime.catalog,
        [
            AccountRecord(
                "oldfield",
                "Oldfield Archaeology",
                "dig@oldfield.example",
                "IE",
                "free",
                (now - timedelta(days=900)).date(),
                last_login_at=now - timedelta(days=400),
            )
        ],
    )
    # Acme's own classifiers: one in use, one deleted (a tombstone, not counted).
    with runtime.catalog.session() as session:
        for version, deleted_at in ((1, now), (2, None)):
            session.add(
                TrainedModelRecord(
                    model_id=f"model-acme{version}",
                    account_id="acme",
                    version=version,
                    key=f"accounts/acme/models/model-acme{version}.pfmodel",
                    sha256="0" * 64,
                    evaluation={},
                    training_files=[],
                    deleted_at=deleted_at,
                )
            )
    names = [row["name"] for row in _classes(job)]
    return Seeded(
        job.job_id,
        locked_job.job_id,
        names,
        {i.account_id: i.invoice_number for i in invoices},
        [month_before.label, last_month.label, this_month.label],
        reason,
    )


def _classes(job: dict) -> list[dict]:
    from pipelines.class_table import class_summary

    return class_summary({int(k): v for k, v in job.summary["class_counts"].items()})


@pytest.fixture(scope="module")
def pointflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The POINTFLOW_* environment of the server, with nothing inherited from the developer's."""
    home = tmp_path_factory.mktemp("ui-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    # The seeded jobs read their scene from the tests' temporary folders, an allowed input folder.
    env.update(
        POINTFLOW_HOME=str(home), POINTFLOW_WORKERS="1", POINTFLOW_INPUT_DIRS=str(tmp_path_factory.getbasetemp())
    )
    return env


@pytest.fixture(scope="module")
def seeded(pointflow_env: dict[str, str], scene_path: Path) -> Seeded:
    runtime = Runtime.from_settings(Settings.from_env(pointflow_env))
    try:
        return seed(runtime, scene_path)
    finally:
        runtime.catalog.dispose()


@pytest.fixture(scope="module")
def server(
    airflow_home: Path, pointflow_env: dict[str, str], seeded: Seeded, tmp_path_factory: pytest.TempPathFactory
) -> Server:
    """`airflow api-server` on a free loopback port, simple auth manager, user admin with a known password."""
    work = tmp_path_factory.mktemp("api-server")
    password, viewer_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    passwords = work / "passwords.json"
    passwords.write_text(json.dumps({"admin": password, "viewer": viewer_password}))
    port = free_port()
    # Only this server's Airflow settings: none inherited from the developer's shell or other tests.
    env = {
        **{k: v for k, v in pointflow_env.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }
    log = work / "api-server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airflow",
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"airflow api-server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"airflow api-server did not answer within 90 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Server(url, password, viewer_password, log)
    finally:
        stop_processes([process], grace=20)


def sign_in(server: Server, username: str, password: str) -> str:
    response = requests.post(f"{server.url}/auth/token", json={"username": username, "password": password}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    return sign_in(server, "admin", server.password)


@pytest.fixture(scope="module")
def viewer_token(server: Server) -> str:
    return sign_in(server, "viewer", server.viewer_password)


def plugin_urls(seeded: Seeded) -> list[str]:
    return [
        "/pointflow/",
        f"/pointflow/accounts/acme/jobs/{seeded.job_id}/preview.png",
        f"/pointflow/accounts/acme/jobs/{seeded.job_id}/preview-3d.ply",
        f"/pointflow/accounts/acme/invoices/{seeded.invoices['acme']}.html",
        "/pointflow/static/pointflow-3d.js",
        "/pointflow/static/vendor/three/three.module.js",
    ]


def test_plugin_routes_refuse_requests_without_a_valid_token(server: Server, seeded: Seeded) -> None:
    for path in plugin_urls(seeded):
        response = requests.get(server.url + path, allow_redirects=False, timeout=10)
        assert response.status_code == 401, (path, response.status_code, response.text[:200])
        assert b"PNG" not in response.content[:8] and b"Invoice" not in response.content
    # A forged token (signed with another secret) is refused as well, by cookie and by header.
    import jwt

    forged = jwt.encode(
        {"sub": "admin", "role": "ADMIN", "exp": int(time.time()) + 600}, "not-the-secret", algorithm="HS512"
    )
    for kwargs in ({"headers": {"Authorization": f"Bearer {forged}"}}, {"cookies": {"_token": forged}}):
        response = requests.get(f"{server.url}/pointflow/", allow_redirects=False, timeout=10, **kwargs)
        assert response.status_code in (401, 403), response.status_code
        assert "Acme Surveying" not in response.text


def test_a_browser_without_a_session_is_sent_to_airflows_login(server: Server) -> None:
    response = requests.get(
        f"{server.url}/pointflow/", headers={"Accept": "text/html"}, allow_redirects=False, timeout=10
    )
    assert response.status_code == 303
    assert response.headers["location"].startswith("/api/v2/auth/login?next=")
    # Airflow's own login redirect accepts our "next" (same site) and leads to its login page.
    followed = requests.get(server.url + response.headers["location"], allow_redirects=False, timeout=10)
    assert followed.status_code == 307 and "/auth/login" in followed.headers["location"]


def test_plugin_routes_serve_an_authenticated_user(server: Server, seeded: Seeded, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    page = requests.get(f"{server.url}/pointflow/", headers=bearer, timeout=60)
    assert page.status_code == 200, page.text[:500]
    for expected in (
        "Acme Surveying GmbH",
        "Northwind Mapping",
        "Tidewater Drones",
        seeded.job_id,
        seeded.invoices["acme"],
        seeded.hold_reason,
    ):
        assert expected in page.text, expected
    # Acme's models column counts its model in use, not the deleted one; Northwind has none.
    rows = {a: re.search(rf'<tr id="account-{a}">.*?</tr>', page.text, re.S)[0] for a in ("acme", "northwind")}
    assert '<td class="n models">1</td>' in rows["acme"] and '<td class="n models">0</td>' in rows["northwind"]
    assert "frame-ancestors 'self'" in page.headers["content-security-policy"]

    preview = requests.get(
        f"{server.url}/pointflow/accounts/acme/jobs/{seeded.job_id}/preview.png", headers=bearer, timeout=10
    )
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert preview.content.startswith(b"\x89PNG\r\n\x1a\n")
    sample = requests.get(
        f"{server.url}/pointflow/accounts/acme/jobs/{seeded.job_id}/preview-3d.ply", headers=bearer, timeout=10
    )
    assert sample.status_code == 200 and sample.content.startswith(b"ply\nformat binary_little_endian 1.0\n")
    script = requests.get(f"{server.url}/pointflow/static/vendor/three/three.module.js", headers=bearer, timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    # The page allows scripts from this server only, and the one inline import map by its hash.
    policy = page.headers["content-security-policy"]
    assert (
        "script-src 'self' 'sha256-" in policy and "unsafe-inline" not in policy.split("script-src", 1)[1].split(";")[0]
    )

    document = requests.get(
        f"{server.url}/pointflow/accounts/acme/invoices/{seeded.invoices['acme']}.html", headers=bearer, timeout=10
    )
    assert document.status_code == 200 and f"Invoice {seeded.invoices['acme']}" in document.text
    lines = requests.get(
        f"{server.url}/pointflow/accounts/acme/invoices/{seeded.invoices['acme']}.csv", headers=bearer, timeout=10
    )
    assert lines.status_code == 200 and lines.text.startswith("invoice_number,kind,")
    # The session cookie the UI holds works the same as the header.
    assert requests.get(f"{server.url}/pointflow/", cookies={"_token": token}, timeout=60).status_code == 200


def test_results_of_a_closed_account_are_not_served(server: Server, seeded: Seeded, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    response = requests.get(
        f"{server.url}/pointflow/accounts/tidewater/jobs/{seeded.locked_job_id}/preview.png", headers=bearer, timeout=10
    )
    assert response.status_code == 403 and "closed" in response.json()["detail"]
    assert "Results locked" in requests.get(f"{server.url}/pointflow/", headers=bearer, timeout=60).text


def test_the_lifecycle_queue_is_a_dry_run(
    server: Server, seeded: Seeded, token: str, pointflow_env: dict[str, str]
) -> None:
    """The page lists the notice due for oldfield, and showing it sends and records nothing."""
    page = requests.get(f"{server.url}/pointflow/", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    due = page.text.split('class="due-now"', 1)[1].split("</table>", 1)[0]
    assert "oldfield" in due and "inactivity notice" in due
    runtime = Runtime.from_settings(Settings.from_env(pointflow_env))
    try:
        with runtime.catalog.session() as session:
            assert session.scalars(select(LifecycleAction).where(LifecycleAction.account_id == "oldfield")).all() == []
            assert session.scalars(select(SentMessage).where(SentMessage.account_id == "oldfield")).all() == []
    finally:
        runtime.catalog.dispose()
    assert not any(b"dig@oldfield.example" in path.read_bytes() for path in runtime.settings.outbox_dir.glob("*.eml"))


def test_one_accounts_url_never_reaches_another_accounts_objects(server: Server, seeded: Seeded, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    refused = [
        # acme's job and invoice asked for under northwind's and tidewater's names
        f"/pointflow/accounts/northwind/jobs/{seeded.job_id}/preview.png",
        f"/pointflow/accounts/northwind/invoices/{seeded.invoices['acme']}.html",
        f"/pointflow/accounts/tidewater/invoices/{seeded.invoices['acme']}.json",
        f"/pointflow/accounts/acme/invoices/{seeded.invoices['tidewater']}.csv",
        # keys smuggled into the names
        "/pointflow/accounts/..%2Facme/invoices/" + seeded.invoices["acme"] + ".html",
        f"/pointflow/accounts/acme/jobs/..%2F..%2Fnorthwind%2Fexports%2F{seeded.job_id}/preview.png",
        f"/pointflow/accounts/acme/invoices/..%2F..%2Ftidewater%2Finvoices%2F{seeded.invoices['tidewater']}.html",
        f"/pointflow/accounts/acme/invoices/{seeded.invoices['acme']}.pdf",
        f"/pointflow/accounts/northwind/jobs/{seeded.job_id}/preview-3d.ply",
        # only the previews of a job, not its other files, and only files under static/
        f"/pointflow/accounts/acme/jobs/{seeded.job_id}/manifest.json",
        f"/pointflow/accounts/acme/jobs/{seeded.job_id}/scene.laz",
        "/pointflow/static/..%2Fpointflow_ui.py",
        "/pointflow/static/../templates/pointflow_dashboard.html",
        "/pointflow/static/%2Fetc%2Fpasswd",
    ]
    for path in refused:
        response = requests.get(server.url + path, headers=bearer, timeout=10)
        assert response.status_code in (400, 404), (path, response.status_code)
        assert not response.content.startswith((b"\x89PNG", b"ply", b"LASF")) and b'"artifacts"' not in response.content
        assert "<h1>Invoice" not in response.text and "import " not in response.text
    # The same objects under their own account's name are served: the refusals are about ownership.
    own = requests.get(
        f"{server.url}/pointflow/accounts/tidewater/invoices/{seeded.invoices['tidewater']}.html",
        headers=bearer,
        timeout=10,
    )
    assert own.status_code == 200


def published(pointflow_env: dict[str, str], account_id: str, job_id: str, kind: str) -> tuple[LinkSigner, dict]:
    """The server's own link signer (same POINTFLOW_HOME, so the same secret) and one artifact of a job."""
    runtime = Runtime.from_settings(Settings.from_env(pointflow_env))
    try:
        manifest = read_manifest(runtime.store, export_prefix(account_id, job_id))
    finally:
        runtime.catalog.dispose()
    return LinkSigner.from_settings(runtime.settings), next(a for a in manifest["artifacts"] if a["kind"] == kind)


def test_a_download_link_needs_no_airflow_login_and_opens_only_its_file(
    server: Server, seeded: Seeded, pointflow_env: dict[str, str]
) -> None:
    signer, points = published(pointflow_env, "acme", seeded.job_id, "points")
    soon = datetime.now(UTC) + timedelta(hours=1)
    token = signer.token(LinkClaim("acme", points["key"], soon))
    response = requests.get(f"{server.url}{DOWNLOAD_PATH}{token}", allow_redirects=False, timeout=30)
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == points["sha256"]
    assert response.headers["content-disposition"] == f'attachment; filename="{points["name"]}"'

    _, locked = published(pointflow_env, "tidewater", seeded.locked_job_id, "preview")
    refused = {
        "tampered": (token[:10] + ("A" if token[10] != "A" else "B") + token[11:], 403),
        "expired": (signer.token(LinkClaim("acme", points["key"], datetime.now(UTC) - timedelta(seconds=1))), 410),
        "another account's object": (signer.token(LinkClaim("northwind", points["key"], soon)), 403),
        "a closed account's": (signer.token(LinkClaim("tidewater", locked["key"], soon)), 403),
        "not an export": (signer.token(LinkClaim("acme", "accounts/acme/reports/x.html", soon)), 403),
    }
    for what, (bad, status) in refused.items():
        response = requests.get(f"{server.url}{DOWNLOAD_PATH}{bad}", allow_redirects=False, timeout=30)
        assert response.status_code == status, (what, response.status_code, response.text)
        assert response.content.rstrip() and not response.content.startswith(b"LASF")
    # The token opens that file and nothing else: not the page, as a header or a cookie.
    for kwargs in ({"headers": {"Authorization": f"Bearer {token}"}}, {"cookies": {"_token": token}}, {}):
        page = requests.get(f"{server.url}/pointflow/", allow_redirects=False, timeout=30, **kwargs)
        assert page.status_code in (401, 403) and "Acme Surveying" not in page.text
    assert requests.get(f"{server.url}{DOWNLOAD_PATH}", allow_redirects=False, timeout=30).status_code in (401, 404)


def test_no_credentials_in_the_server_log(
    server: Server, seeded: Seeded, token: str, pointflow_env: dict[str, str]
) -> None:
    requests.get(f"{server.url}/pointflow/", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    # A download link is a credential for a customer's file too.
    signer, preview = published(pointflow_env, "acme", seeded.job_id, "preview")
    link = signer.token(LinkClaim("acme", preview["key"], datetime.now(UTC) + timedelta(hours=1)))
    assert requests.get(f"{server.url}{DOWNLOAD_PATH}{link}", timeout=30).status_code == 200
    text = server.log.read_text(errors="replace")
    assert server.password not in text
    assert token not in text
    assert link.split(".")[1] not in text, "the server log holds a download link's signature"


CSRF = {"X-Pointflow-CSRF": "1"}


def unfinished_job(pointflow_env: dict[str, str], job_id: str, state: str = "received") -> None:
    """A job of acme recorded as its ingest task records it, then put in `state` (no file is read)."""
    runtime = Runtime.from_settings(Settings.from_env(pointflow_env))
    try:
        create_job(runtime, job_id, "acme", "/nowhere/scene.laz", "standard")
        with runtime.catalog.session() as session:
            session.execute(update(Job).where(Job.job_id == job_id).values(state=state))
    finally:
        runtime.catalog.dispose()


def job_now(pointflow_env: dict[str, str], job_id: str) -> tuple[JobRecord, list[tuple[str, int]]]:
    """The job as the catalog holds it, and its usage events."""
    runtime = Runtime.from_settings(Settings.from_env(pointflow_env))
    try:
        with runtime.catalog.session() as session:
            usage = [
                (e.status, e.points) for e in session.scalars(select(UsageEvent).where(UsageEvent.job_id == job_id))
            ]
        return job_view(runtime, job_id), usage
    finally:
        runtime.catalog.dispose()


def abort_url(server: Server, job_id: str) -> str:
    return f"{server.url}/pointflow/jobs/{job_id}/abort"


def test_an_abort_needs_a_post_by_an_editor_with_the_csrf_header(
    server: Server, token: str, viewer_token: str, pointflow_env: dict[str, str]
) -> None:
    job_id = "job-ui-guarded"
    unfinished_job(pointflow_env, job_id, "classifying")
    before = job_now(pointflow_env, job_id)
    url, bearer, cookie = abort_url(server, job_id), {"Authorization": f"Bearer {token}"}, {"_token": token}
    import jwt

    forged = jwt.encode(
        {"sub": "admin", "role": "ADMIN", "exp": int(time.time()) + 600}, "not-the-secret", algorithm="HS512"
    )
    refused = {
        "no credentials": ("POST", {"headers": CSRF}, (401,)),
        "a forged token": ("POST", {"headers": {**CSRF, "Authorization": f"Bearer {forged}"}}, (401, 403)),
        "a GET": ("GET", {"headers": {**CSRF, **bearer}}, (405,)),
        "a GET with the cookie (a link, an image)": ("GET", {"headers": CSRF, "cookies": cookie}, (405,)),
        "no CSRF header": ("POST", {"headers": bearer}, (403,)),
        "a cross-site form (the cookie, no header)": ("POST", {"cookies": cookie, "data": {"job": job_id}}, (403,)),
        "another header value": ("POST", {"headers": {"X-Pointflow-CSRF": "yes"}, "cookies": cookie}, (403,)),
        "a script of another site": (
            "POST",
            {"headers": {**CSRF, "Sec-Fetch-Site": "same-site"}, "cookies": cookie},
            (403,),
        ),
        "a viewer (may read the page, not change a job)": (
            "POST",
            {"headers": {**CSRF, "Authorization": f"Bearer {viewer_token}"}},
            (403,),
        ),
    }
    for what, (method, kwargs, statuses) in refused.items():
        response = requests.request(method, url, allow_redirects=False, timeout=30, **kwargs)
        assert response.status_code in statuses, (what, response.status_code, response.text)
        assert "Acme" not in response.text and "/nowhere" not in response.text, what
        assert job_now(pointflow_env, job_id) == before, what
    assert before[0].abort_requested_at is None and before[0].state == "classifying"

    # The viewer reads the page without an Abort button; the admin gets one for this job.
    viewer_page = requests.get(
        f"{server.url}/pointflow/", headers={"Authorization": f"Bearer {viewer_token}"}, timeout=60
    )
    assert viewer_page.status_code == 200 and f"job-{job_id}" in viewer_page.text
    assert 'class="abort"' not in viewer_page.text
    page = requests.get(f"{server.url}/pointflow/", headers=bearer, timeout=60).text
    assert f'data-url="/pointflow/jobs/{job_id}/abort"' in page


def test_an_abort_of_an_unknown_or_malformed_job_id_is_refused_and_tells_nothing(
    server: Server, token: str, pointflow_env: dict[str, str]
) -> None:
    headers = {**CSRF, "Authorization": f"Bearer {token}"}
    unknown = requests.post(abort_url(server, "job-nobody-knows"), headers=headers, timeout=30)
    assert unknown.status_code == 404 and unknown.json() == {"detail": "unknown job job-nobody-knows"}
    for bad in ("j" * 129, "-job", "job%20x", "job%3Cscript%3E", "job'--"):
        response = requests.post(abort_url(server, bad), headers=headers, timeout=30)
        assert response.status_code == 400 and response.json() == {"detail": "not a job id"}, (bad, response.text)
    # A path in the id never reaches the route.
    smuggled = requests.post(abort_url(server, "..%2F..%2Fjob-ui-acme-1"), headers=headers, timeout=30)
    assert smuggled.status_code in (404, 405) and "acme" not in smuggled.text


def test_an_abort_of_an_ended_job_says_so_and_changes_nothing(
    server: Server, seeded: Seeded, token: str, pointflow_env: dict[str, str]
) -> None:
    before = job_now(pointflow_env, seeded.job_id)
    response = requests.post(
        abort_url(server, seeded.job_id), headers={**CSRF, "Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"job {seeded.job_id} has already ended exported: nothing to abort, nothing changed"
    }
    assert job_now(pointflow_env, seeded.job_id) == before


def test_an_editor_aborts_an_unfinished_job(server: Server, token: str, pointflow_env: dict[str, str]) -> None:
    """Through the api-server as the page sends it: Airflow's cookie and the header."""
    waiting, classifying = "job-ui-abort-waiting", "job-ui-abort-classifying"
    unfinished_job(pointflow_env, waiting, "validated")
    unfinished_job(pointflow_env, classifying, "classifying")
    page_sends = {"headers": {**CSRF, "Sec-Fetch-Site": "same-origin"}, "cookies": {"_token": token}}

    # Not classifying yet: aborted at once and metered with 0 points.
    response = requests.post(abort_url(server, waiting), timeout=30, **page_sends)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "job_id": waiting,
        "state": "aborted",
        "message": f"job {waiting}: aborted, 0 points metered",
    }
    job, usage = job_now(pointflow_env, waiting)
    assert job.state == "aborted" and job.abort_requested_at is not None and usage == [("aborted", 0)]
    # Asked again: it has ended, nothing changes.
    again = requests.post(abort_url(server, waiting), timeout=30, **page_sends)
    assert again.status_code == 409 and "already ended aborted: nothing to abort, nothing changed" in again.text
    assert job_now(pointflow_env, waiting) == (job, usage)

    # Classifying: the request is recorded; the running classification stops between tiles.
    response = requests.post(abort_url(server, classifying), timeout=30, **page_sends)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "job_id": classifying,
        "state": "classifying",
        "message": f"job {classifying}: abort requested; it stops between tiles and ends aborted",
    }
    asked, usage = job_now(pointflow_env, classifying)
    assert asked.state == "classifying" and asked.abort_requested_at is not None and usage == []
    again = requests.post(abort_url(server, classifying), timeout=30, **page_sends)
    assert again.status_code == 200 and again.json() == response.json()
    assert job_now(pointflow_env, classifying) == (asked, [])

    # The page shows the request instead of the button.
    page = requests.get(f"{server.url}/pointflow/", cookies={"_token": token}, timeout=60).text
    box = page.split(f'id="job-{classifying}"', 1)[1].split("</article>", 1)[0]
    assert "abort requested" in box and 'class="abort"' not in box
    ended = page.split(f'id="job-{waiting}"', 1)[1].split("</article>", 1)[0]
    assert "abort-box" not in ended


def test_page_in_a_real_browser(server: Server, seeded: Seeded, pointflow_env: dict[str, str]) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian package 'chromium'): the browser test needs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "pointflow-ui.png"
    waiting = "job-ui-browser-abort"
    unfinished_job(pointflow_env, waiting)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # Airflow's own login page, then the "pointflow" entry of the Airflow navigation.
            page.goto(f"{server.url}/")
            page.wait_for_url(re.compile(r"/auth/login"), timeout=30_000)
            page.get_by_label(re.compile("username", re.IGNORECASE)).fill("admin")
            page.get_by_label(re.compile("password", re.IGNORECASE)).fill(server.password)
            page.get_by_role("button", name=re.compile("sign in|log ?in", re.IGNORECASE)).click()
            page.get_by_role("link", name="pointflow").click()
            page.wait_for_url(re.compile(r"/plugin/pointflow"), timeout=30_000)

            # The Airflow UI frames the page; the frame carries Airflow's session cookie.
            frame = page.frame_locator("iframe")
            sync_api.expect(frame.locator("h1")).to_contain_text("pointflow", timeout=60_000)
            sync_api.expect(frame.locator("#account-acme")).to_contain_text("Acme Surveying GmbH")
            page.screenshot(path=str(ARTIFACTS / "pointflow-ui-in-airflow.png"))
            abort_in_the_frame(frame, waiting, seeded, sync_api.expect)
            # Airflow's frame allows no pop-ups (a target=_blank link does nothing there) but downloads.
            with page.expect_download() as downloaded:
                frame.locator(f"#invoice-{seeded.invoices['acme']} a.document", has_text="HTML").click()
            assert f"Invoice {seeded.invoices['acme']}" in Path(downloaded.value.path()).read_text()
            page.screenshot(path=str(ARTIFACTS / "pointflow-ui-abort.png"))

            # The page itself, full length, for the checks and the screenshot.
            page.goto(f"{server.url}/pointflow/")
            check_page(page, seeded, sync_api.expect)
            page.screenshot(path=str(screenshot), full_page=True)
            check_3d_view(page, seeded, sync_api.expect, ARTIFACTS / "pointflow-3d.png")

            # The invoice document link downloads the invoice the billing run published.
            link = page.locator(f"#invoice-{seeded.invoices['acme']} a.document", has_text="HTML")
            with page.expect_download() as downloaded:
                link.click()
            assert f"Invoice {seeded.invoices['acme']}" in Path(downloaded.value.path()).read_text()
        finally:
            browser.close()
    print(f"\nscreenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000


def abort_in_the_frame(frame, job_id: str, seeded: Seeded, expect) -> None:
    """The Abort button inside Airflow's sandboxed frame (no dialogs there): asked on the page, then done."""
    assert frame.locator(f"#job-{seeded.job_id} button.abort").count() == 0, "an exported job offers an abort"
    job = frame.locator(f"#job-{job_id}")
    job.locator("button.abort").click()
    expect(job.locator(".abort-confirm")).to_be_visible()
    expect(job.locator(".abort-confirm")).to_contain_text("it ends aborted now, 0 points billed")
    job.locator("button.abort-no").click()
    expect(job.locator(".abort-confirm")).to_be_hidden()
    expect(job.locator(".meta .state")).to_have_text("received")
    job.locator("button.abort").click()
    job.locator("button.abort-yes").click()
    expect(job.locator(".abort-result")).to_have_text(f"job {job_id}: aborted, 0 points metered")
    expect(job.locator(".meta .state")).to_have_text("aborted")
    expect(job.locator("button.abort")).to_be_hidden()


def test_the_vendored_viewer_is_three_js_as_published() -> None:
    """static/vendor/three holds files copied unchanged from the npm package (see its README)."""
    vendor = REPO / "plugins" / "static" / "vendor" / "three"
    for line in (vendor / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (vendor / "LICENSE").read_text()


def check_3d_view(page, seeded: Seeded, expect, screenshot: Path) -> None:
    """The job's "3D view" button draws its thinned sample in the class colours of the map."""
    import numpy as np
    from PIL import Image

    from pipelines.class_table import CLASS_COLOURS

    page.locator(f"#job-{seeded.job_id} button.view3d").click()
    viewer = page.locator("#viewer")
    expect(viewer).to_have_attribute("data-state", "ready", timeout=60_000)
    expect(page.locator("#viewer-caption")).to_contain_text(seeded.job_id)
    assert int(viewer.get_attribute("data-points")) > 10_000
    page.locator("#view3d").screenshot(path=str(screenshot))
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3).astype(int)
    for name, cls in (("ground", 2), ("building", 6), ("high vegetation", 5)):
        colour = np.array([int(CLASS_COLOURS[cls][i : i + 2], 16) for i in (1, 3, 5)])
        drawn = int((np.abs(pixels - colour).sum(axis=1) < 30).sum())
        assert drawn > 500, f"the 3D view shows {drawn} pixels of {name}'s colour"


def check_page(page, seeded: Seeded, expect) -> None:
    accounts = page.locator("#accounts")
    expect(accounts.locator("#account-acme")).to_contain_text("professional")
    expect(accounts.locator("#account-northwind")).to_contain_text("inactivity notice sent")
    expect(accounts.locator("#account-tidewater")).to_contain_text("closed (customer), data locked")
    expect(accounts.locator("#account-tidewater")).to_contain_text("legal hold")

    expect(page.locator(f"#job-{seeded.locked_job_id}")).to_contain_text("Results locked")
    assert page.locator(f"#job-{seeded.locked_job_id} img").count() == 0
    job = page.locator(f"#job-{seeded.job_id}")
    expect(job).to_contain_text("exported")
    for name in seeded.classes:
        expect(job.locator("table.classes")).to_contain_text(name)
    image = job.locator("img.preview")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0, "the preview image did not load"

    chart = page.locator("#usage svg")
    expect(chart).to_be_visible()
    for month in seeded.months[:2]:
        assert chart.locator(f"[id='usage-acme-{month}']").count() == 1, f"no bar for acme in {month}"
    assert chart.locator(f"[id='usage-northwind-{seeded.months[1]}']").count() == 1

    invoices = page.locator("#invoices")
    for number in seeded.invoices.values():
        expect(invoices).to_contain_text(number)

    lifecycle = page.locator("#lifecycle")
    expect(lifecycle.locator("table.due-now")).to_contain_text("oldfield")
    expect(lifecycle.locator("table.notices")).to_contain_text("inactivity notice")
    expect(lifecycle.locator("table.notices")).to_contain_text("data locked")
    expect(lifecycle.locator("table.scheduled")).to_contain_text("blocked by legal hold")
    expect(lifecycle.locator("table.scheduled")).to_contain_text("closure")
    expect(lifecycle.locator("table.holds")).to_contain_text(seeded.hold_reason)


def test_the_page_shows_the_latest_notices_not_every_notice_ever_sent(runtime: Runtime) -> None:
    """Notices only accumulate: the page's table used to hold every one ever sent."""
    from pipelines.dashboard import build_dashboard
    from pipelines.lifecycle.models import LifecycleNotice

    upsert_accounts(
        runtime.catalog, [AccountRecord("acme", "Acme", "ops@acme.example", "DE", "free", date(2020, 1, 1))]
    )
    start = datetime(2021, 1, 1, tzinfo=UTC)
    with runtime.catalog.session() as session:
        for n in range(120):
            session.add(
                LifecycleNotice(
                    key=f"notice-{n}",
                    account_id="acme",
                    kind="overdue_notice",
                    sent_at=start + timedelta(days=n),
                    message_id=f"<{n}@pointflow>",
                    recipient="ops@acme.example",
                    detail={},
                )
            )
    queue = build_dashboard(runtime, as_of=start + timedelta(days=200)).lifecycle
    assert len(queue.notices) == 50 and queue.notices_sent == 120
    assert queue.notices[0].sent_at == start + timedelta(days=119)
