"""Security: one account never reaches another's objects, no credentials in logs or task output,
hostile names and LAS headers refused cleanly.

Already covered elsewhere (not repeated here): traversal in keys and names (test_storage), another
account's model (test_training), another account's export links (test_export), credentials in
SMTP errors (test_notify).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import laspy
import numpy as np
import pytest
from sqlalchemy import select

from pipelines.accounts import upsert_accounts
from pipelines.catalog.models import UsageEvent
from pipelines.cli import main
from pipelines.export import DownloadRefused, ExportNotReady, artifact_link
from pipelines.jobs import run_job
from pipelines.links import LinkSigner
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.ingest import create_job, ingest_step
from pipelines.steps.record import AdmissionRefusedJob
from pipelines.steps.validate import validate_step
from pipelines.storage import AccountArea, UnsafeKeyError, check_key, safe_name
from pipelines.validate import validate_file
from tests.conftest import make_account
from tests.lasfiles import patch, write_points


def usage(runtime: Runtime) -> list[tuple[str, str, int]]:
    with runtime.catalog.session() as session:
        return [(e.account_id, e.status, e.points) for e in session.scalars(select(UsageEvent))]


def cli_json(capsys: pytest.CaptureFixture, *args: str):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- isolation between accounts ----------------------------------------------------------------


@pytest.fixture
def two_accounts(runtime: Runtime, scene_path: Path) -> tuple[Runtime, dict]:
    """acme with an exported job; mallory with nothing of its own yet."""
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("mallory")])
    job = run_job(runtime, "acme", str(scene_path), job_id="job-acme", workers=1)
    assert job.state == "exported"
    return runtime, job


def test_no_command_lists_or_bundles_another_accounts_objects(two_accounts, capsys: pytest.CaptureFixture) -> None:
    runtime, _ = two_accounts
    assert [f["key"] for f in cli_json(capsys, "files", "list", "--account", "acme")]
    assert cli_json(capsys, "files", "list", "--account", "mallory") == []
    assert cli_json(capsys, "models", "list", "--account", "mallory") == []
    bundle = cli_json(capsys, "accounts", "export-all", "mallory")
    listed = runtime.store.get_bytes(bundle["key"]) if bundle["objects"] else b""
    assert b"accounts/acme/" not in listed and b"scene" not in listed
    # Deleting mallory's data leaves every acme object in place.
    before = sorted(o.key for o in runtime.store.list("accounts/acme/"))
    assert main(["accounts", "delete", "mallory", "--confirm"]) == 0
    assert sorted(o.key for o in runtime.store.list("accounts/acme/")) == before


def test_another_accounts_stored_object_cannot_be_a_job_source(two_accounts, capsys: pytest.CaptureFixture) -> None:
    runtime, job = two_accounts
    with runtime.catalog.session() as session:
        from pipelines.catalog.models import StoredFile

        key = session.get(StoredFile, job.file_id).key
    stolen = runtime.store.local_path(key)
    for source in (str(stolen), stolen.as_uri(), str(stolen.parent / ".." / ".." / "raw" / stolen.name)):
        create_job(runtime, f"job-steal-{len(source)}", "mallory", source, "standard")
        with pytest.raises(AdmissionRefusedJob, match="outside account mallory's area"):
            ingest_step(runtime, f"job-steal-{len(source)}")
    assert main(["ingest", str(stolen), "--account", "mallory"]) == 2
    assert "outside account mallory's area" in capsys.readouterr().err
    assert list(runtime.store.list("accounts/mallory/raw/")) == []
    # The refusals are recorded as failed jobs with nothing processed, nothing charged for points.
    assert {(a, s, p) for a, s, p in usage(runtime) if a == "mallory"} <= {("mallory", "failed", 0)}


def test_training_sources_pass_the_same_ownership_check(two_accounts, capsys: pytest.CaptureFixture) -> None:
    from pipelines.sources import ForeignSource
    from pipelines.training import train_from_sources

    runtime, job = two_accounts
    classified = runtime.store.local_path(job.classified_key)
    assert main(["train", str(classified), "--account", "mallory"]) == 2
    assert "outside account mallory's area" in capsys.readouterr().err
    # The training DAG's sources, as a path and as a URI.
    for source in (str(classified), classified.as_uri()):
        with pytest.raises(ForeignSource, match="outside account mallory's area"):
            train_from_sources(runtime, "mallory", [source])
    assert cli_json(capsys, "models", "list", "--account", "mallory") == []


def test_the_service_home_is_never_a_source_not_even_under_another_name(
    two_accounts, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runtime, _ = two_accounts
    catalog = runtime.settings.home / "catalog.db"
    hard_link, symbolic = tmp_path / "survey.las", tmp_path / "survey-link.las"
    hard_link.hardlink_to(catalog)
    symbolic.symlink_to(catalog)
    acme_mail = next((runtime.settings.home / "outbox").glob("*.eml"))  # acme's "results ready" e-mail
    for source in (catalog, hard_link, symbolic, acme_mail):
        assert main(["ingest", str(source), "--account", "mallory"]) == 2
        assert "POINTFLOW_HOME" in capsys.readouterr().err
        assert main(["ingest", str(source), "--account", "mallory", "--run"]) == 2
        capsys.readouterr()
    assert list(runtime.store.list("accounts/mallory/")) == []
    bundle = cli_json(capsys, "accounts", "export-all", "mallory")
    assert bundle["objects"] == 0
    assert main(["classify", str(symbolic), str(tmp_path / "out.laz")]) == 2
    assert "POINTFLOW_HOME" in capsys.readouterr().err


def test_a_dag_source_outside_the_allowed_input_folders_fails_the_job(
    runtime: Runtime, account: str, scene_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = tmp_path / "incoming"
    allowed.mkdir()
    inside = allowed / "scene.laz"
    inside.write_bytes(scene_path.read_bytes())
    confined = Runtime(replace(runtime.settings, input_dirs=(allowed,)), runtime.catalog, runtime.store)
    create_job(confined, "job-outside", account, str(scene_path), "standard")
    with pytest.raises(AdmissionRefusedJob, match="not inside an allowed input folder"):
        ingest_step(confined, "job-outside")
    create_job(confined, "job-inside", account, str(inside), "standard")
    assert ingest_step(confined, "job-inside").file_id is not None
    # With none configured, local paths are refused altogether; the error says what to set.
    nothing = Runtime(replace(runtime.settings, input_dirs=()), runtime.catalog, runtime.store)
    create_job(nothing, "job-none", account, str(inside), "standard")
    with pytest.raises(AdmissionRefusedJob, match=r"POINTFLOW_INPUT_DIRS: none set"):
        ingest_step(nothing, "job-none")


def test_another_accounts_s3_object_cannot_be_a_job_source(
    home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, scene_path: Path
) -> None:
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}/svc")
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("mallory")])
    runtime.store.put_file("accounts/acme/raw/survey.laz", scene_path)
    for n, source in enumerate(
        (f"s3://{s3_bucket}/svc/accounts/acme/raw/survey.laz", f"s3://{s3_bucket}//svc/accounts/acme/raw/survey.laz")
    ):
        create_job(runtime, f"job-s3-steal-{n}", "mallory", source, "standard")
        with pytest.raises(AdmissionRefusedJob, match="outside account mallory's area"):
            ingest_step(runtime, f"job-s3-steal-{n}")
    assert list(runtime.store.list("accounts/mallory/")) == []
    # Its own upload area is a legitimate source.
    runtime.store.put_file("accounts/mallory/raw/own.laz", scene_path)
    create_job(runtime, "job-s3-own", "mallory", f"s3://{s3_bucket}/svc/accounts/mallory/raw/own.laz", "standard")
    assert ingest_step(runtime, "job-s3-own").file_id is not None


def test_export_links_refuse_keys_dressed_up_as_the_callers(two_accounts) -> None:
    runtime, job = two_accounts
    artifact = f"{job.export_prefix}scene.laz"
    signer, soon = LinkSigner.from_settings(runtime.settings), datetime.now(UTC) + timedelta(hours=1)
    assert artifact_link(runtime.store, signer, "acme", artifact, True, soon)
    for key in (
        artifact,
        artifact.replace("accounts/acme/", "accounts/mallory/../acme/"),
        artifact.replace("accounts/acme/", "accounts/mallory/exports/../../acme/"),
        "accounts/mallory/exports/%2e%2e/%2e%2e/acme/exports/job-acme/scene.laz",
        "/" + artifact,
    ):
        with pytest.raises((DownloadRefused, ExportNotReady, UnsafeKeyError)):
            artifact_link(runtime.store, signer, "mallory", key, True, soon)


def test_a_presigned_link_signs_the_key(home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto does not check signatures, so re-sign the altered request as S3 would to verify it."""
    from urllib.parse import parse_qsl, urlparse

    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    runtime = Runtime.from_settings(Settings.from_env())
    runtime.store.put_bytes("accounts/acme/exports/j/preview.png", b"acme")
    runtime.store.put_bytes("accounts/mallory/exports/j/preview.png", b"mallory")
    link = runtime.store.link("accounts/acme/exports/j/preview.png", timedelta(hours=1))

    def signature_for(url: str) -> str:
        parsed = urlparse(url)
        query = dict(parse_qsl(parsed.query))
        given = query.pop("X-Amz-Signature")
        request = AWSRequest("GET", f"{parsed.scheme}://{parsed.netloc}{parsed.path}", params={})
        signer = S3SigV4QueryAuth(
            Credentials("testing", "testing"), "s3", "us-east-1", expires=int(query["X-Amz-Expires"])
        )
        signer._timestamp = query["X-Amz-Date"]  # the link's own signing time
        signer._get_timestamp = lambda: query["X-Amz-Date"]
        signer.add_auth(request)
        return given, dict(parse_qsl(urlparse(request.url).query))["X-Amz-Signature"]

    given, recomputed = signature_for(link)
    assert given == recomputed  # the check is S3's own: a genuine link verifies
    given, recomputed = signature_for(link.replace("/accounts/acme/", "/accounts/mallory/"))
    assert given != recomputed  # the same signature on mallory's key does not


# --- hostile names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd.laz",
        "..%c0%af..%c0%afsecret.las",
        "survey\x00.las",
        "survey\r\nX-Injected: 1.laz",
        "\u202egnp.laz",  # right-to-left override
        "\uff0e\uff0e\uff0fother.laz",  # fullwidth dots and slash
        "/abs/path/survey.laz",
        "C:\\Windows\\survey.laz",
        "x" * 5000 + ".laz",
        "<script>alert(1)</script>.laz",
    ],
)
def test_hostile_file_names_stay_inside_the_account(name: str) -> None:
    key = AccountArea("acme").key("raw", name)
    assert key.startswith("accounts/acme/raw/") and key.count("/") == 3
    stored = key.rsplit("/", 1)[1]
    assert stored == safe_name(stored) and len(stored) <= 200
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stored)


@pytest.mark.parametrize("key", ["accounts/a/raw/x\x00.las", "accounts/a/raw/x\n.las", "accounts/a/raw/" + "x" * 1100])
def test_keys_with_control_characters_or_beyond_s3_length_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKeyError, match="unsafe object key|too long"):
        check_key(key)


# --- hostile LAS headers -----------------------------------------------------------------------

# Byte offsets in the public header block (LAS 1.0-1.4).
HEADER_SIZE, OFFSET_TO_POINTS, NUMBER_OF_VLRS, RECORD_LENGTH, LEGACY_COUNT, SCALE_X = 94, 96, 100, 105, 107, 131


def _with_vlr(path: Path) -> Path:
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales, header.offsets = np.array([0.01] * 3), np.array([500000.0, 5400000.0, 0.0])
    header.vlrs.append(laspy.VLR("pointflow", 42, "test", b"x" * 100))
    data = laspy.LasData(header)
    rng = np.random.default_rng(0)
    data.x, data.y, data.z = (
        500000 + rng.uniform(0, 50, 500),
        5400000 + rng.uniform(0, 50, 500),
        100 + rng.normal(0, 0.2, 500),
    )
    data.return_number = data.number_of_returns = np.ones(500, dtype=np.uint8)
    data.write(path)
    return path


HOSTILE = {
    "point count of 4 billion": (lambda p: patch(write_points(p), LEGACY_COUNT, "I", 0xFFFFFFFF), "point count"),
    "negative scale": (lambda p: patch(write_points(p), SCALE_X, "d", -0.01), "scale factor"),
    "header size below the standard": (lambda p: patch(write_points(p), HEADER_SIZE, "H", 100), "unreadable header"),
    "point data beyond the end of the file": (
        lambda p: patch(write_points(p), OFFSET_TO_POINTS, "I", 10**9),
        "point count does not match|truncated",
    ),
    "point data inside the header": (lambda p: patch(write_points(p), OFFSET_TO_POINTS, "I", 10), "unreadable header"),
    "4 billion VLRs": (lambda p: patch(write_points(p), NUMBER_OF_VLRS, "I", 0xFFFFFFFF), "variable-length records"),
    "record length below the format's": (lambda p: patch(write_points(p), RECORD_LENGTH, "H", 3), "unreadable header"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_are_refused_with_a_reason(tmp_path: Path, case: str) -> None:
    make, reason = HOSTILE[case]
    report = validate_file(make(tmp_path / "hostile.las"))
    assert not report.ok
    assert re.search(reason, report.reason), report.reason


def test_a_hostile_header_is_quarantined_by_the_job_and_nothing_exported(
    runtime: Runtime, account: str, tmp_path: Path
) -> None:
    source = patch(write_points(tmp_path / "vlrs.las"), NUMBER_OF_VLRS, "I", 0xFFFFFFFF)
    job = run_job(runtime, account, str(source), job_id="job-hostile")
    assert job.state == "quarantined" and "variable-length records" in job.error
    assert list(runtime.store.list(f"accounts/{account}/exports/")) == []
    assert usage(runtime) == [(account, "failed", 0)]


def test_a_vlr_overrunning_its_length_does_not_break_reading(tmp_path: Path) -> None:
    path = patch(_with_vlr(tmp_path / "vlr.las"), 227 + 20, "H", 65535)
    report = validate_file(path)
    # The points are intact (laspy seeks to the point data), so the file is judged on them.
    assert report.ok and report.points_checked == 500


def test_markup_in_the_header_is_escaped_in_the_report(runtime: Runtime, account: str, tmp_path: Path) -> None:
    """The CRS record is the customer's text that the report shows (the system identifier is not shown)."""
    from pyproj import CRS

    wkt = CRS.from_epsg(2154).to_wkt().replace("RGF93 v1 / Lambert-93", "<script>alert(1)</script>", 1)
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales, header.offsets = np.array([0.01] * 3), np.array([700000.0, 6600000.0, 0.0])
    header.add_crs(CRS.from_wkt(wkt))
    data = laspy.LasData(header)
    rng = np.random.default_rng(0)
    data.x, data.y, data.z = (
        700000 + rng.uniform(0, 50, 500),
        6600000 + rng.uniform(0, 50, 500),
        rng.normal(0, 0.2, 500),
    )
    data.return_number = data.number_of_returns = np.ones(500, dtype=np.uint8)
    data.write(tmp_path / "<img src=x onerror=alert(1)>.las")
    create_job(runtime, "job-markup", account, str(tmp_path / "<img src=x onerror=alert(1)>.las"), "standard")
    ingest_step(runtime, "job-markup")
    job = validate_step(runtime, "job-markup")
    assert job.state == "validated"
    page = runtime.store.get_bytes(job.report_key.replace(".json", ".html")).decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page and "<img" not in page


# --- no credentials in logs or task output -------------------------------------------------------

SECRETS = {"aws": "aws-Secret-7f3k2", "smtp": "smtp-Secret-9q8w", "postgres": "pg-Secret-4m5n"}


@pytest.fixture
def smtp_with_login(monkeypatch: pytest.MonkeyPatch):
    """The SMTP sink, requiring a login (over plain SMTP: loopback only)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from tests.conftest import SmtpSink

    def authenticate(server, session, envelope, mechanism, data) -> AuthResult:
        return AuthResult(
            success=isinstance(data, LoginPassword)
            and data.login == b"mailer"
            and data.password == SECRETS["smtp"].encode()
        )

    sink = SmtpSink()
    sink.controller = Controller(
        sink, hostname="127.0.0.1", port=sink.port, authenticator=authenticate, auth_require_tls=False
    )
    sink.controller.start()
    monkeypatch.setenv("POINTFLOW_SMTP_URL", f"smtp://mailer:{SECRETS['smtp']}@127.0.0.1:{sink.port}")
    yield sink
    sink.controller.stop()


@pytest.mark.slow
@pytest.mark.postgres
def test_no_credential_reaches_logs_reports_mail_or_task_output(
    load_test_dag,
    airflow_home: Path,
    home: Path,
    s3_bucket: str,
    postgres_url: str,
    smtp_with_login,
    monkeypatch: pytest.MonkeyPatch,
    scene_path: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["aws"])
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    # Trust authentication on the test server ignores the password, but it is in every URL we pass.
    monkeypatch.setenv(
        "POINTFLOW_DATABASE_URL",
        make_url(postgres_url).set(password=SECRETS["postgres"]).render_as_string(hide_password=False),
    )
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("acme")])
    dag = load_test_dag("pointflow_classify")
    good = dag.test(run_conf={"account_id": "acme", "source": str(scene_path), "classifier": "standard"})
    assert str(good.state) == "success"
    bad = tmp_path / "notes.las"
    bad.write_text("not a point cloud")
    assert (
        str(dag.test(run_conf={"account_id": "acme", "source": str(bad), "classifier": "standard"}).state) == "failed"
    )
    [ready, quarantine] = smtp_with_login.parsed()
    assert "ready" in ready["Subject"] and "could not be processed" in quarantine["Subject"]

    captured = capfd.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log records": caplog.text}
    texts |= {
        str(p): p.read_text(errors="replace")
        for root in (airflow_home / "logs", home)
        if root.exists()
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".db", ".laz", ".png")
    }
    texts |= {
        f"s3://{o.key}": runtime.store.get_bytes(o.key).decode(errors="replace")
        for o in runtime.store.list("accounts/")
        if not o.key.endswith((".laz", ".png"))
    }
    texts |= {f"mail {m['Subject']}": m.as_string() for m in (ready, quarantine)}
    # The task output really is in there: the steps' own log lines.
    assert any("validation of scene.laz" in t for t in texts.values()) and any(
        "export published" in t for t in texts.values()
    )
    leaks = [(where, name) for where, text in texts.items() for name, secret in SECRETS.items() if secret in text]
    assert leaks == []
    # A presigned link is a bearer credential for a customer's file: e-mails carry them, logs must not.
    logs = {where: text for where, text in texts.items() if not where.startswith(("mail", "s3://"))}
    assert [where for where, text in logs.items() if "X-Amz-Signature" in text] == []
    assert any("X-Amz-Signature" in m.as_string() for m in (ready, quarantine))


def test_stack_up_prints_the_catalog_url_without_its_password(tmp_path: Path) -> None:
    from pointflow_dev.cli_stack import addresses
    from pointflow_dev.stack_plan import StackPlan

    plan = StackPlan(base=tmp_path, postgres="postgresql://postgres:s3cr%40t-pw@127.0.0.1:5432/postgres")
    printed = "\n".join(addresses(plan, tmp_path / "passwords.json", "/in"))
    assert "s3cr" not in printed and "t-pw" not in printed, printed
    assert "POINTFLOW_DATABASE_URL=postgresql://postgres:***@127.0.0.1:5432/pointflow_stack_catalog" in printed


def test_a_hard_link_of_an_object_in_a_store_outside_the_home_is_not_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scene_path: Path
) -> None:
    """POINTFLOW_HOME on one disk, the local object store on another: a hard link of another
    account's raw object put in an allowed input folder is refused like one of the home's files."""
    import os
    import shutil
    import uuid

    from pipelines.settings import Settings
    from pipelines.sources import ForeignSource, check_source
    from pipelines.storage import open_store

    home = Path("/dev/shm") / f"pointflow-test-{uuid.uuid4().hex[:8]}"
    if not Path("/dev/shm").is_dir() or Path("/dev/shm").stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    try:
        for name in [n for n in os.environ if n.startswith("POINTFLOW_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("POINTFLOW_HOME", str(home))
        monkeypatch.setenv("POINTFLOW_STORAGE_URL", (tmp_path / "objects").as_uri())
        monkeypatch.setenv("POINTFLOW_INPUT_DIRS", str(tmp_path / "inputs"))
        settings = Settings.from_env()
        store = open_store(settings.storage_url)
        store.put_file("accounts/rival/raw/survey.laz", scene_path)
        (tmp_path / "inputs").mkdir()
        copy, link = tmp_path / "inputs" / "copy.laz", tmp_path / "inputs" / "mine.laz"
        shutil.copyfile(scene_path, copy)
        link.hardlink_to(store.local_path("accounts/rival/raw/survey.laz"))
        check_source(settings, store, "acme", str(copy))  # a plain file in the input folder is fine
        with pytest.raises(ForeignSource, match="hard link"):
            check_source(settings, store, "acme", str(link))
    finally:
        shutil.rmtree(home, ignore_errors=True)
