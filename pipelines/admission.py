"""Admission: plan and service limits checked before a file is stored or any work is done.

A refused job costs nothing and says which limit, the current figure and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from pipelines.billing.pricebook import load_pricebook
from pipelines.billing.usage import points_over_cap
from pipelines.catalog import Catalog
from pipelines.catalog.models import FileState, StoredFile
from pipelines.errors import UserError
from pipelines.lifecycle.operations import active_limits
from pipelines.settings import Settings

GB = 1_000_000_000
# Files the customer can still use count against "stored"; refused ones never made it in.
COUNTED_STATES = (FileState.STORED.value, FileState.VALIDATED.value, FileState.QUARANTINED.value)


class AdmissionRefused(UserError, ValueError):
    def __init__(self, limit: str, current: int, maximum: int, unit: str, advice: str) -> None:
        self.limit, self.current, self.maximum = limit, current, maximum
        super().__init__(
            f"refused by the {limit} limit: {current:,} {unit} with this file, the limit is {maximum:,} {unit}. {advice}"
        )


@dataclass(frozen=True)
class Candidate:
    """What admission needs to know of a file before it is stored."""

    size: int
    points: int


def _stored(catalog: Catalog, account_id: str, since: datetime | None = None) -> tuple[int, int, int]:
    """(files, points, bytes) the account stores now, or uploaded since `since`."""
    with catalog.session() as session:
        query = select(
            func.count(),
            func.coalesce(func.sum(StoredFile.point_count), 0),
            func.coalesce(func.sum(StoredFile.size), 0),
        ).where(StoredFile.account_id == account_id)
        query = (
            query.where(StoredFile.created_at >= since) if since else query.where(StoredFile.state.in_(COUNTED_STATES))
        )
        files, points, size = session.execute(query).one()
    return int(files), int(points), int(size)


def check_file_size(settings: Settings, size: int) -> None:
    """Raise AdmissionRefused for a file larger than POINTFLOW_MAX_FILE_BYTES, whatever reads it."""
    if size > settings.max_file_bytes:
        raise AdmissionRefused(
            "maximum file size",
            size,
            settings.max_file_bytes,
            "bytes",
            "Split the survey into smaller files (POINTFLOW_MAX_FILE_BYTES).",
        )


def check_admission(settings: Settings, catalog: Catalog, account_id: str, candidate: Candidate, at: datetime) -> None:
    """Raise AdmissionRefused if storing and classifying `candidate` now breaks a limit."""
    check_file_size(settings, candidate.size)
    if candidate.points > settings.max_points:
        raise AdmissionRefused(
            "maximum points per file",
            candidate.points,
            settings.max_points,
            "points",
            "Split the survey into smaller files (POINTFLOW_MAX_POINTS).",
        )

    pricebook = load_pricebook(settings.pricebook_path)
    # The plan in force on the day: a downgrade's lower limits apply from its date.
    plan, limits = active_limits(catalog, account_id, at, pricebook=pricebook)
    files, points, size = _stored(catalog, account_id)
    if limits.max_files is not None and files + 1 > limits.max_files:
        raise AdmissionRefused(
            f"{plan} plan's stored files",
            files + 1,
            limits.max_files,
            "files",
            "Delete a stored file or upgrade your plan.",
        )
    if limits.max_stored_points is not None and points + candidate.points > limits.max_stored_points:
        raise AdmissionRefused(
            f"{plan} plan's stored points",
            points + candidate.points,
            limits.max_stored_points,
            "points",
            "Delete stored files or upgrade your plan.",
        )
    if limits.storage_limit_gb is not None:
        maximum = limits.storage_limit_gb * GB
        if size + candidate.size > maximum:
            raise AdmissionRefused(
                f"{plan} plan's storage",
                size + candidate.size,
                maximum,
                "bytes",
                "Delete stored files or buy extra storage.",
            )
        month_start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        uploaded = _stored(catalog, account_id, since=month_start)[2]
        if uploaded + candidate.size > maximum:
            raise AdmissionRefused(
                f"{plan} plan's monthly upload",
                uploaded + candidate.size,
                maximum,
                "bytes",
                "The upload allowance renews on the 1st (UTC).",
            )
    cap = limits.monthly_points_cap
    used = points_over_cap(catalog, account_id, cap, candidate.points, at)
    if used is not None:
        raise AdmissionRefused(
            f"{plan} plan's monthly points",
            used + candidate.points,
            cap,
            "points",
            "The cap renews on the 1st (UTC); ask us to raise it if you need more.",
        )
