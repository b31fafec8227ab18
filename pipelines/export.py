"""Export: build the artifacts customers get, publish them atomically, hand out links.

Artifacts are uploaded under the account's tmp area first, then copied to the export prefix,
and the manifest is written last. An export is visible (listed, linkable) only once its
manifest exists, so a crash mid-publish shows nothing; publishing again writes the same bytes.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import laspy

from pipelines import __version__
from pipelines.class_table import ASPRS_CLASS_NAMES, class_summary, summary_csv, summary_json
from pipelines.copc import COPC_SUFFIX, write_copc
from pipelines.errors import InvalidValue, PointflowError, UserError
from pipelines.frame import CoordinateFrame
from pipelines.lasio import CHUNK_POINTS
from pipelines.links import LinkClaim, LinkSigner
from pipelines.preview import write_previews
from pipelines.storage import AccountArea, ObjectStore, file_sha256
from pipelines.tile_io import classifier_label, classifier_record

if TYPE_CHECKING:
    from pipelines.steps.record import JobRecord, JobSummary

MANIFEST_NAME = "manifest.json"
EXPORT_FORMATS = ("laz", "las", "copc")
POINT_MEDIA_TYPES = {
    "laz": "application/vnd.laszip",
    "las": "application/vnd.las",
    "copc": "application/vnd.laszip+copc",
}
POINT_SUFFIXES = {"laz": ".laz", "las": ".las", "copc": COPC_SUFFIX}
SAMPLE_NAME = "preview-3d.ply"
# Kinds the plan must allow downloading: the points, and the 3D sample, which is points too
# (all of them, for a file under its size).
DOWNLOAD_KINDS = ("points", "sample")


class DownloadRefused(UserError, PermissionError):
    """The account's plan does not allow downloading this artifact."""


class ExportNotReady(PointflowError, LookupError):
    """No manifest: the export is not published (yet)."""


@dataclass(frozen=True)
class Artifact:
    name: str
    local_path: Path
    media_type: str
    kind: str  # "points", "summary", "preview", "sample", "report"


def export_prefix(account_id: str, job_id: str) -> str:
    return AccountArea(account_id).key("exports", job_id) + "/"


def _staging_prefix(account_id: str, job_id: str) -> str:
    return AccountArea(account_id).key("tmp", "exports", job_id) + "/"


def write_points_as(source: Path, target: Path) -> Path:
    """Re-encode a classified LAZ as LAS (or LAZ) by target suffix, chunk by chunk."""
    with (
        laspy.open(source) as reader,
        laspy.open(target, mode="w", header=reader.header, do_compress=target.suffix.lower() == ".laz") as writer,
    ):
        for chunk in reader.chunk_iterator(CHUNK_POINTS):
            writer.write_points(chunk)
    return target


def build_artifacts(
    classified: Path,
    workdir: Path,
    stem: str,
    export_format: str,
    class_counts: dict[int, int],
    report_html: bytes | None,
    title: str,
) -> tuple[list[Artifact], CoordinateFrame]:
    """The export's files in `workdir`, and the coordinate frame of the points (for the manifest)."""
    if export_format not in EXPORT_FORMATS:
        raise InvalidValue(f"export format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    name = stem + POINT_SUFFIXES[export_format]
    if export_format == "laz":
        points = classified
    elif export_format == "copc":
        points = workdir / name
        write_copc(classified, points, workdir)
    else:
        points = write_points_as(classified, workdir / name)
    with laspy.open(classified) as reader:
        made_by = classifier_record(reader.header)
    classified_by = classifier_label(made_by["classifier"], made_by["version"]) if made_by else None
    frame = write_previews(
        classified, workdir / "preview.png", workdir / SAMPLE_NAME, title, classified_by=classified_by
    )
    rows = class_summary(class_counts, (made_by["classifier"], made_by["version"]) if made_by else None)
    (workdir / "classes.csv").write_bytes(summary_csv(rows))
    (workdir / "classes.json").write_bytes(summary_json(rows))
    artifacts = [
        Artifact(name, points, POINT_MEDIA_TYPES[export_format], "points"),
        Artifact("classes.csv", workdir / "classes.csv", "text/csv", "summary"),
        Artifact("classes.json", workdir / "classes.json", "application/json", "summary"),
        Artifact("preview.png", workdir / "preview.png", "image/png", "preview"),
        Artifact(SAMPLE_NAME, workdir / SAMPLE_NAME, "application/x-ply", "sample"),
    ]
    if report_html is not None:
        (workdir / "validation.html").write_bytes(report_html)
        artifacts.append(Artifact("validation.html", workdir / "validation.html", "text/html", "report"))
    return artifacts, frame


def software_versions() -> dict[str, str]:
    """What produced an export, down to the libraries that read, classify and write the points."""
    return {
        "pointflow": __version__,
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("laspy", "lazrs", "numpy", "scipy", "lightgbm")},
    }


def build_manifest(
    job: JobRecord,
    input_file: dict[str, Any],
    artifacts: list[dict[str, Any]],
    summary: JobSummary,
    coordinates: CoordinateFrame,
    created_at: datetime,
) -> dict[str, Any]:
    """Everything needed to trace a result: what came in, what went out, and what classified it."""
    counts = {str(k): v for k, v in sorted(summary.class_counts.items(), key=lambda kv: int(kv[0]))}
    return {
        "manifest_version": 2,
        "created_at": created_at.isoformat(),
        "job_id": job.job_id,
        "account_id": job.account_id,
        "producer": f"pointflow {__version__}",
        "software": software_versions(),
        "input": input_file,
        # The CRS and the unit of x, y and z (pipelines.units), as the file states them.
        "coordinates": coordinates.to_dict(),
        "classifier": {
            "name": summary.classifier,
            "version": summary.classifier_version,
            "params": summary.classifier_params,
        },
        "points": {"input": summary.input_points, "output": summary.output_points},
        "class_counts": counts,
        "class_names": {k: ASPRS_CLASS_NAMES.get(int(k), "other") for k in counts},
        "tiling": {
            "tiles": summary.tiles,
            "tile_size_m": summary.tile_size,
            "buffer_m": summary.tile_buffer,
            "workers": summary.workers,
        },
        "timings_s": summary.timings,
        "validation": asdict(summary.validation) if summary.validation else {},
        "artifacts": artifacts,
    }


def publish(
    store: ObjectStore, account_id: str, job_id: str, artifacts: list[Artifact], manifest_for
) -> dict[str, Any]:
    """Stage, copy into place, write the manifest (`manifest_for(described artifacts)`) last."""
    staging, prefix = _staging_prefix(account_id, job_id), export_prefix(account_id, job_id)
    described = []
    for artifact in artifacts:
        store.put_file(staging + artifact.name, artifact.local_path)
        described.append(
            {
                "name": artifact.name,
                "key": prefix + artifact.name,
                "kind": artifact.kind,
                "media_type": artifact.media_type,
                "size": artifact.local_path.stat().st_size,
                "sha256": file_sha256(artifact.local_path),
            }
        )
    for artifact in artifacts:
        store.copy(staging + artifact.name, prefix + artifact.name)
    manifest = manifest_for(described)
    store.put_bytes(prefix + MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
    for artifact in artifacts:
        store.delete(staging + artifact.name)
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    key = prefix + MANIFEST_NAME
    return json.loads(store.get_bytes(key)) if store.exists(key) else None


def published_exports(store: ObjectStore, account_id: str) -> list[dict[str, Any]]:
    """Manifests of the account's complete exports; half-published ones are not there."""
    area = AccountArea(account_id)
    prefix = area.key("exports", "x")[: -len("x")]
    return [json.loads(store.get_bytes(o.key)) for o in store.list(prefix) if o.key.endswith("/" + MANIFEST_NAME)]


@dataclass(frozen=True)
class DownloadLink:
    name: str
    kind: str
    url: str
    expires_at: datetime


def download_links(
    store: ObjectStore, signer: LinkSigner, account_id: str, job_id: str, downloads_allowed: bool, expires_at: datetime
) -> list[DownloadLink]:
    """Signed links (pipelines.links) for a published export; point files only where the plan allows downloads."""
    manifest = read_manifest(store, export_prefix(account_id, job_id))
    if manifest is None:
        raise ExportNotReady(f"export of job {job_id} is not published")
    return [
        DownloadLink(a["name"], a["kind"], signer.url(LinkClaim(account_id, a["key"], expires_at)), expires_at)
        for a in manifest["artifacts"]
        if downloads_allowed or a["kind"] not in DOWNLOAD_KINDS
    ]


def published_artifact(store: ObjectStore, account_id: str, key: str) -> dict[str, Any]:
    """The manifest entry of one published artifact of this account."""
    area = AccountArea(account_id)
    if not area.owns(key) or "/exports/" not in key:
        raise DownloadRefused(f"{key} is not an export of account {account_id}")
    job_prefix = key.rsplit("/", 1)[0] + "/"
    manifest = read_manifest(store, job_prefix)
    if manifest is None:
        raise ExportNotReady(f"{key} is not part of a published export")
    artifact = next((a for a in manifest["artifacts"] if a["key"] == key), None)
    if artifact is None:
        raise DownloadRefused(f"{key} is not listed in its export's manifest")
    return artifact


def check_plan_allows(artifact: dict[str, Any], downloads_allowed: bool) -> None:
    if artifact["kind"] in DOWNLOAD_KINDS and not downloads_allowed:
        raise DownloadRefused(
            "point files cannot be downloaded on the free plan: view the report and preview, or upgrade to download"
        )


def artifact_link(
    store: ObjectStore, signer: LinkSigner, account_id: str, key: str, downloads_allowed: bool, expires_at: datetime
) -> str:
    """A signed link to one published artifact of this account, refusing what the plan forbids."""
    check_plan_allows(published_artifact(store, account_id, key), downloads_allowed)
    return signer.url(LinkClaim(account_id, key, expires_at))
