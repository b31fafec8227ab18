"""Export: publish a job's artifacts under its export prefix, manifest last.

The manifest is the commit point: an export without `manifest.json` is incomplete and is never
shown to a customer; publishing again overwrites the same keys with the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.storage import AccountArea, ObjectStore, file_sha256

MANIFEST_NAME = "manifest.json"
ASPRS_CLASS_NAMES = {
    0: "never classified", 1: "unclassified", 2: "ground", 3: "low vegetation", 4: "medium vegetation",
    5: "high vegetation", 6: "building", 7: "low noise", 9: "water", 17: "bridge deck", 18: "high noise",
}


@dataclass(frozen=True)
class Artifact:
    name: str
    local_path: Path
    media_type: str


@dataclass(frozen=True)
class PublishedExport:
    prefix: str
    manifest_key: str
    manifest: dict[str, Any]


def export_prefix(account_id: str, job_id: str) -> str:
    return AccountArea(account_id).key("exports", job_id) + "/"


def build_manifest(job: dict[str, Any], input_file: dict[str, Any], artifacts: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trace a result: what came in, what went out, and what classified it."""
    counts = {str(k): v for k, v in sorted(summary["class_counts"].items(), key=lambda kv: int(kv[0]))}
    return {
        "manifest_version": 1,
        "job_id": job["job_id"],
        "account_id": job["account_id"],
        "producer": f"pointflow {__version__}",
        "input": input_file,
        "classifier": {
            "name": summary["classifier"],
            "version": summary["classifier_version"],
            "params": summary["classifier_params"],
        },
        "points": {"input": summary["input_points"], "output": summary["output_points"]},
        "class_counts": counts,
        "class_names": {k: ASPRS_CLASS_NAMES.get(int(k), "other") for k in counts},
        "tiling": {"tiles": summary["tiles"], "tile_size_m": summary["tile_size"], "buffer_m": summary["tile_buffer"], "workers": summary["workers"]},
        "timings_s": summary["timings"],
        "validation": summary.get("validation", {}),
        "artifacts": artifacts,
    }


def publish(store: ObjectStore, prefix: str, artifacts: list[Artifact], manifest_for) -> PublishedExport:
    """Upload artifacts, then the manifest built from their checksums (`manifest_for(list)`)."""
    described = []
    for artifact in artifacts:
        key = prefix + artifact.name
        store.put_file(key, artifact.local_path)
        described.append(
            {
                "name": artifact.name,
                "key": key,
                "media_type": artifact.media_type,
                "size": artifact.local_path.stat().st_size,
                "sha256": file_sha256(artifact.local_path),
            }
        )
    manifest = manifest_for(described)
    manifest_key = prefix + MANIFEST_NAME
    store.put_bytes(manifest_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return PublishedExport(prefix, manifest_key, manifest)


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    key = prefix + MANIFEST_NAME
    return json.loads(store.get_bytes(key)) if store.exists(key) else None
