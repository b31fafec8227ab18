"""Delivery: the artifacts, atomic publishing under a crash, links, their expiry, the free-plan ban, the e-mail."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import laspy
import pytest
from PIL import Image

from pipelines import __version__
from pipelines.accounts import upsert_accounts
from pipelines.export import (
    DownloadRefused,
    ExportNotReady,
    artifact_link,
    download_links,
    published_exports,
    read_manifest,
)
from pipelines.links import LinkSigner
from pipelines.notify import outbox_messages
from pipelines.runtime import Runtime
from pipelines.steps.classify import classify_step
from pipelines.steps.deliver import deliver_step
from pipelines.steps.export import export_step
from pipelines.steps.ingest import create_job, ingest_step
from pipelines.steps.record import job_view
from pipelines.steps.validate import validate_step
from pipelines.storage import file_sha256
from tests.conftest import make_account

SOON = datetime.now(UTC) + timedelta(hours=1)


def signer(runtime: Runtime) -> LinkSigner:
    return LinkSigner.from_settings(runtime.settings)


def classified_job(runtime: Runtime, account_id: str, source: Path, job_id: str = "job-x") -> str:
    create_job(runtime, job_id, account_id, str(source), "standard")
    ingest_step(runtime, job_id)
    validate_step(runtime, job_id)
    classify_step(runtime, job_id, workers=1)
    return job_id


@pytest.fixture
def pro(runtime: Runtime) -> str:
    upsert_accounts(runtime.catalog, [make_account("pro", plan="professional")])
    return "pro"


def test_export_holds_points_summaries_preview_and_report(
    runtime: Runtime, pro: str, scene_path: Path, tmp_path: Path
) -> None:
    job_id = classified_job(runtime, pro, scene_path)
    export_step(runtime, job_id)
    manifest = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)
    kinds = {a["name"]: a["kind"] for a in manifest["artifacts"]}
    assert kinds == {
        "scene.laz": "points",
        "classes.csv": "summary",
        "classes.json": "summary",
        "preview.png": "preview",
        "preview-3d.ply": "sample",
        "validation.html": "report",
    }
    for artifact in manifest["artifacts"]:
        local = tmp_path / artifact["name"]
        runtime.store.get_file(artifact["key"], local)
        assert file_sha256(local) == artifact["sha256"] and local.stat().st_size == artifact["size"]
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "classes.json").read_text())
    assert sum(r["points"] for r in rows) == len(laspy.read(tmp_path / "scene.laz")) == manifest["points"]["output"]
    # Each summary names what classified the points, as the manifest and the points do.
    made_by = (manifest["classifier"]["name"], manifest["classifier"]["version"])
    assert {(r["classifier"], r["classifier_version"]) for r in rows} == {made_by}
    lines = (tmp_path / "classes.csv").read_text().splitlines()
    assert lines[0] == "class,name,points,percent,classifier,classifier_version"
    # One precision for every share: three decimals, whatever the value.
    assert all(re.fullmatch(r"\d+\.\d{3}", line.split(",")[3]) for line in lines[1:]), lines
    assert all(line.split(",")[4:] == list(made_by) for line in lines[1:]), lines
    header = laspy.open(tmp_path / "scene.laz").header
    assert header.generating_software == f"pointflow {made_by[0]} {made_by[1]}"[:32]
    [vlr] = [v for v in header.vlrs if v.user_id == "pointflow"]
    assert json.loads(bytes(vlr.record_data))["classifier"] == made_by[0]
    # So do the previews, which customers pass on on their own.
    classified_by = f"pointflow {made_by[0]} {made_by[1]}"
    assert Image.open(tmp_path / "preview.png").text["Software"] == classified_by
    ply_header = (tmp_path / "preview-3d.ply").read_bytes().split(b"end_header")[0].decode()
    assert f"comment classified by {classified_by}\n" in ply_header
    assert list(runtime.store.list(f"accounts/{pro}/tmp/")) == []


def test_the_manifest_says_when_what_and_in_which_units(runtime: Runtime, pro: str, scene_path: Path) -> None:
    before = datetime.now(UTC)
    job_id = classified_job(runtime, pro, scene_path)
    export_step(runtime, job_id)
    manifest = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0) and before <= created <= datetime.now(UTC)
    assert manifest["input"]["sha256"] == file_sha256(scene_path)
    assert manifest["classifier"]["name"] == "standard" and manifest["classifier"]["version"]
    # The scene is in UTM 32N: metres (heights too, as pipelines.units takes them without a vertical CRS).
    assert manifest["coordinates"] == {
        "crs": "WGS 84 / UTM zone 32N",
        "epsg": 32632,
        "horizontal": "metre",
        "vertical": "metre",
        "metres_per_unit": [1.0, 1.0],
        "assumed": False,
        "axes": ["Easting", "Northing"],
    }
    assert manifest["software"]["pointflow"] == __version__ and manifest["software"]["laspy"] == laspy.__version__
    assert {"python", "lazrs", "numpy", "scipy", "lightgbm"} <= set(manifest["software"])


def test_las_export_format(runtime: Runtime, pro: str, scene_path: Path, tmp_path: Path) -> None:
    job_id = classified_job(runtime, pro, scene_path)
    export_step(runtime, job_id, export_format="las")
    manifest = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)
    [points] = [a for a in manifest["artifacts"] if a["kind"] == "points"]
    assert points["name"] == "scene.las"
    runtime.store.get_file(points["key"], tmp_path / "scene.las")
    data = laspy.read(tmp_path / "scene.las")
    assert not data.header.are_points_compressed and len(data) == manifest["points"]["output"]


def test_crash_between_artifacts_leaves_nothing_visible_and_a_rerun_completes(
    runtime: Runtime, pro: str, scene_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = classified_job(runtime, pro, scene_path)
    store_type = type(runtime.store)
    real_copy = store_type.copy
    copies: list[str] = []

    def crash_on_third_copy(store, source, destination):
        copies.append(destination)
        if len(copies) == 3:
            raise OSError("worker killed")
        return real_copy(store, source, destination)

    monkeypatch.setattr(store_type, "copy", crash_on_third_copy)
    with pytest.raises(OSError, match="worker killed"):
        export_step(runtime, job_id)
    assert job_view(runtime, job_id).state == "classified"
    assert published_exports(runtime.store, pro) == []
    with pytest.raises(ExportNotReady):
        download_links(runtime.store, signer(runtime), pro, job_id, True, SOON)
    with pytest.raises(ExportNotReady):
        artifact_link(runtime.store, signer(runtime), pro, copies[0], True, SOON)

    monkeypatch.setattr(store_type, "copy", real_copy)
    export_step(runtime, job_id)
    [manifest] = published_exports(runtime.store, pro)
    first = {a["name"]: a["sha256"] for a in manifest["artifacts"]}
    with runtime.catalog.session() as session:
        from pipelines.catalog.models import Job

        session.get(Job, job_id).state = "classified"  # run the export task once more
    export_step(runtime, job_id)
    [again] = published_exports(runtime.store, pro)
    assert {a["name"]: a["sha256"] for a in again["artifacts"]} == first


def test_free_plan_gets_report_and_preview_but_no_point_files(runtime: Runtime, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("gratis", plan="free")])
    job_id = classified_job(runtime, "gratis", scene_path)
    export_step(runtime, job_id)
    deliver_step(runtime, job_id)
    links = download_links(runtime.store, signer(runtime), "gratis", job_id, downloads_allowed=False, expires_at=SOON)
    assert {link.kind for link in links} == {"summary", "preview", "report"}
    manifest = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)
    # The 3D sample is points too (all of them, for a file this small): not for the free plan either.
    for kind in ("points", "sample"):
        [artifact] = [a for a in manifest["artifacts"] if a["kind"] == kind]
        with pytest.raises(DownloadRefused, match="free plan"):
            artifact_link(
                runtime.store, signer(runtime), "gratis", artifact["key"], downloads_allowed=False, expires_at=SOON
            )
    [mail] = outbox_messages(runtime.settings)
    body = message_from_bytes(mail.read_bytes(), policy=policy.default).get_content()
    downloads = body.split("Downloads")[1]
    assert (
        "preview.png" in body
        and "scene.laz" not in downloads
        and "preview-3d.ply" not in downloads
        and "upgrade" in body
    )


def test_ready_email_has_links_classes_and_classifier_version(runtime: Runtime, pro: str, scene_path: Path) -> None:
    job_id = classified_job(runtime, pro, scene_path)
    export_step(runtime, job_id)
    deliver_step(runtime, job_id)
    deliver_step(runtime, job_id)  # a retry sends nothing more
    [mail] = outbox_messages(runtime.settings)
    message = message_from_bytes(mail.read_bytes(), policy=policy.default)
    body = message.get_content()
    summary = job_view(runtime, job_id).summary
    assert message["To"] == "ops@pro.example"
    assert f"{summary['classifier']} {summary['classifier_version']}" in body
    assert "ground" in body and "scene.laz: http://localhost:8080/pointflow/download/" in body and "preview.png" in body


def test_one_account_cannot_link_another_accounts_export(runtime: Runtime, pro: str, scene_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("other")])
    job_id = classified_job(runtime, pro, scene_path)
    export_step(runtime, job_id)
    key = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)["artifacts"][0]["key"]
    with pytest.raises(DownloadRefused, match="not an export of account other"):
        artifact_link(runtime.store, signer(runtime), "other", key, True, SOON)
    with pytest.raises(ExportNotReady):
        download_links(runtime.store, signer(runtime), "other", job_id, True, SOON)


def test_the_ready_email_names_the_file_the_customer_submitted(runtime: Runtime, pro: str, tmp_path: Path) -> None:
    """Not the classified output's name (.laz for an uploaded .las), nor the name the same bytes
    were first stored under: the job's own source."""
    from tests.lasfiles import write_points

    first = write_points(tmp_path / "samp11.las")
    again = tmp_path / "north block 2.las"
    again.write_bytes(first.read_bytes())
    for job_id, source in (("job-first", first), ("job-again", again)):
        classified_job(runtime, pro, source, job_id)
        export_step(runtime, job_id)
        deliver_step(runtime, job_id)
    bodies = [
        " ".join(message_from_bytes(m.read_bytes(), policy=policy.default).get_content().split())
        for m in outbox_messages(runtime.settings)
    ]
    assert len(bodies) == 2
    assert any("your classification of samp11.las is ready" in body for body in bodies), bodies
    assert any("your classification of north block 2.las is ready" in body for body in bodies), bodies
