"""Download links pointflow signs itself: they last the plan's retention (past S3's 7 days), open
one object of one account, and stop working when the data is deleted or the account locked.

The checks run through `open_download`, the function the plugin's endpoint calls, with the clock
given; tests/test_ui.py drives the same endpoint over HTTP on a real api-server.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from pipelines.accounts import upsert_accounts
from pipelines.downloads import open_download
from pipelines.export import read_manifest
from pipelines.lifecycle import delete_account_data, run_lifecycle, terminate_account
from pipelines.links import DOWNLOAD_PATH, PRESIGNED_LIFETIME, LinkClaim, LinkRefused, LinkSigner
from pipelines.notify import outbox_messages
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.deliver import deliver_step
from pipelines.steps.export import export_step
from pipelines.steps.record import job_view
from pipelines.storage import file_sha256
from tests.conftest import make_account
from tests.test_export import classified_job

UTC = UTC


def exported(runtime: Runtime, account_id: str, scene_path: Path, job_id: str = "job-links") -> dict:
    classified_job(runtime, account_id, scene_path, job_id)
    export_step(runtime, job_id)
    return job_view(runtime, job_id)


def artifact(runtime: Runtime, job: dict, kind: str) -> dict:
    manifest = read_manifest(runtime.store, job.export_prefix)
    return next(a for a in manifest["artifacts"] if a["kind"] == kind)


def mailed_links(runtime: Runtime) -> dict[str, str]:
    [mail] = outbox_messages(runtime.settings)
    body = message_from_bytes(mail.read_bytes(), policy=policy.default).get_content()
    return dict(re.findall(r"^  (\S+): (http\S+)$", body, re.MULTILINE))


def token_of(url: str) -> str:
    return url.split(DOWNLOAD_PATH, 1)[1]


def fetch(runtime: Runtime, token: str, now: datetime) -> bytes:
    """What the customer's browser gets: the presigned URL followed, or the streamed bytes."""
    found = open_download(runtime, token, now)
    if found.url is None:
        return b"".join(found.chunks)
    response = requests.get(found.url, timeout=10)
    assert response.status_code == 200
    return response.content


def refusal(runtime: Runtime, token: str, now: datetime) -> tuple[int, str]:
    with pytest.raises(LinkRefused) as refused:
        open_download(runtime, token, now)
    return refused.value.status, str(refused.value)


def test_an_api_link_works_past_day_7_until_day_10_and_is_refused_after(
    home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, scene_path: Path
) -> None:
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{s3_bucket}")
    runtime = Runtime.from_settings(Settings.from_env())
    upsert_accounts(runtime.catalog, [make_account("api1", plan="api")])
    job = exported(runtime, "api1", scene_path)
    deliver_step(runtime, job.job_id)
    points = artifact(runtime, job, "points")
    # The link the customer was mailed, for the classified points.
    token = token_of(mailed_links(runtime)[points["name"]])
    finished = job.finished_at

    for day in (timedelta(days=7, hours=1), timedelta(days=9, hours=23, minutes=59)):
        found = open_download(runtime, token, finished + day)
        # Each visit gets a presigned URL of its own that lives minutes, not the link's 10 days.
        assert int(parse_qs(urlparse(found.url).query)["X-Amz-Expires"][0]) == PRESIGNED_LIFETIME.total_seconds()
        body = fetch(runtime, token, finished + day)
        assert len(body) == points["size"] and hashlib.sha256(body).hexdigest() == points["sha256"]

    assert refusal(runtime, token, finished + timedelta(days=10)) == (
        410,
        f"this download link expired on {finished + timedelta(days=10):%Y-%m-%d %H:%M} UTC",
    )

    # Day 10 is also when the lifecycle run deletes the results: a link that would still be valid is revoked.
    later = LinkSigner.from_settings(runtime.settings).token(
        LinkClaim("api1", points["key"], finished + timedelta(days=30))
    )
    assert fetch(runtime, later, finished + timedelta(days=9))
    assert ("api1", "api_results_deleted") in {
        (a.account_id, a.action) for a in run_lifecycle(runtime, finished + timedelta(days=10, hours=1))
    }
    assert refusal(runtime, later, finished + timedelta(days=10, hours=2))[0] == 410


def test_a_professional_link_lasts_7_days_and_streams_from_the_local_store(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("pro")])
    job = exported(runtime, "pro", scene_path)
    deliver_step(runtime, job.job_id)
    preview = artifact(runtime, job, "preview")
    url = mailed_links(runtime)["preview.png"]
    assert url.startswith("http://localhost:8080/pointflow/download/")
    sent = datetime.now(UTC)
    found = open_download(runtime, token_of(url), sent)
    assert (
        found.url is None
        and found.name == "preview.png"
        and found.media_type == "image/png"
        and found.size == preview["size"]
    )
    local = runtime.store.local_path(preview["key"])
    assert b"".join(found.chunks) == local.read_bytes() and file_sha256(local) == preview["sha256"]
    assert fetch(runtime, token_of(url), sent + timedelta(days=6, hours=23))
    assert refusal(runtime, token_of(url), sent + timedelta(days=7, minutes=1))[0] == 410


def test_tampered_and_forged_tokens_are_refused(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("pro")])
    job = exported(runtime, "pro", scene_path)
    preview = artifact(runtime, job, "preview")
    now = datetime.now(UTC)
    signer = LinkSigner.from_settings(runtime.settings)
    token = signer.token(LinkClaim("pro", preview["key"], now + timedelta(days=1)))
    assert fetch(runtime, token, now)
    body, mac = token.split(".")
    # The same claims with a longer expiry, re-encoded but not re-signed.
    stretched = signer.token(LinkClaim("pro", preview["key"], now + timedelta(days=400))).split(".")[0] + "." + mac
    points_key = artifact(runtime, job, "points")["key"]
    other_object = signer.token(LinkClaim("pro", points_key, now + timedelta(days=1))).split(".")[0] + "." + mac
    forged = LinkSigner(b"a guessed secret", signer.public_url).token(
        LinkClaim("pro", preview["key"], now + timedelta(days=1))
    )
    for bad in (
        stretched,
        other_object,
        forged,
        body,
        body + ".",
        "." + mac,
        token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
        "x" * 500,
        "",
    ):
        assert refusal(runtime, bad, now) == (403, "this download link is not valid: check that it was copied whole")


def test_a_token_never_opens_another_accounts_object_or_anything_outside_exports(
    runtime: Runtime, scene_path: Path
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("mallory")])
    job = exported(runtime, "acme", scene_path)
    preview = artifact(runtime, job, "preview")
    now = datetime.now(UTC)
    signer = LinkSigner.from_settings(runtime.settings)
    stored = job_view(runtime, job.job_id)
    for account_id, key in (
        ("mallory", preview["key"]),  # acme's file under mallory's name
        ("mallory", preview["key"].replace("accounts/acme/", "accounts/mallory/../acme/")),
        ("acme", stored.classified_key),  # acme's own, but not a published export
        ("acme", stored.report_key),
        ("acme", "accounts/acme/exports/job-links/manifest.json"),
        ("nobody", "accounts/nobody/exports/x/preview.png"),
    ):
        status, reason = refusal(runtime, signer.token(LinkClaim(account_id, key, now + timedelta(days=1))), now)
        assert status in (403, 410), (account_id, key, reason)


def test_deleting_the_object_or_the_accounts_data_revokes_links(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("pro"), make_account("leaver")])
    now = datetime.now(UTC)
    signer = LinkSigner.from_settings(runtime.settings)
    job = exported(runtime, "pro", scene_path)
    preview, summary = artifact(runtime, job, "preview"), artifact(runtime, job, "summary")
    runtime.store.delete(preview["key"])
    assert refusal(runtime, signer.token(LinkClaim("pro", preview["key"], now + timedelta(days=1))), now) == (
        410,
        "the file behind this link has been deleted",
    )
    assert fetch(runtime, signer.token(LinkClaim("pro", summary["key"], now + timedelta(days=1))), now)

    leaver = exported(runtime, "leaver", scene_path, "job-leaver")
    token = signer.token(LinkClaim("leaver", artifact(runtime, leaver, "preview")["key"], now + timedelta(days=60)))
    assert fetch(runtime, token, now)
    terminate_account(runtime.catalog, "leaver", effective=date.today())
    assert refusal(runtime, token, now) == (403, "the account's contract has ended: its results are no longer served")
    delete_account_data(runtime, "leaver")
    status, reason = refusal(runtime, token, now)
    assert status == 410 and "has been deleted" in reason


def test_a_free_plan_link_opens_the_preview_but_not_the_points(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("pro")])
    job = exported(runtime, "pro", scene_path)
    now = datetime.now(UTC)
    signer = LinkSigner.from_settings(runtime.settings)
    points = signer.token(LinkClaim("pro", artifact(runtime, job, "points")["key"], now + timedelta(days=1)))
    assert fetch(runtime, points, now)
    # The plan changes to free after the link went out: the points are refused from then on.
    upsert_accounts(runtime.catalog, [make_account("pro", plan="free")])
    assert refusal(runtime, points, now)[0] == 403
    assert fetch(
        runtime, signer.token(LinkClaim("pro", artifact(runtime, job, "preview")["key"], now + timedelta(days=1))), now
    )


def test_the_signing_secret_is_configured_or_kept_in_the_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generated = LinkSigner.from_settings(Settings.from_env())
    assert (home / "link-signing.key").stat().st_mode & 0o777 == 0o600
    assert LinkSigner.from_settings(Settings.from_env()).secret == generated.secret
    monkeypatch.setenv("POINTFLOW_LINK_SECRET", "configured")
    monkeypatch.setenv("POINTFLOW_PUBLIC_URL", "https://pointflow.example.com/")
    configured = LinkSigner.from_settings(Settings.from_env())
    assert configured.secret == b"configured"
    assert configured.url(LinkClaim("a", "accounts/a/exports/j/x", datetime.now(UTC))).startswith(
        "https://pointflow.example.com/pointflow/download/"
    )
