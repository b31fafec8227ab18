"""The download endpoint's checks: a link opens only while everything it depends on holds.

`pipelines.links` signs and verifies the tokens; `open_download`, what the plugin's endpoint calls,
checks a token and then, every time, the account is not locked and its data not deleted, the object
is still part of a published export of that account and the plan allows downloading it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from pipelines.accounts import UnknownAccountError
from pipelines.export import DownloadRefused, ExportNotReady, check_plan_allows, published_artifact
from pipelines.lifecycle.operations import AccountLocked, data_deleted
from pipelines.links import PRESIGNED_LIFETIME, LinkRefused, LinkSigner
from pipelines.runtime import Runtime
from pipelines.steps.deliver import delivery_terms
from pipelines.storage import UnsafeKeyError


@dataclass(frozen=True)
class Download:
    """What the endpoint answers: a redirect to `url`, or the object streamed with its name and type."""

    name: str
    media_type: str
    size: int
    url: str | None
    chunks: Iterator[bytes] | None


def open_download(runtime: Runtime, token: str, now: datetime) -> Download:
    """Check a link's token and everything it depends on, as of `now`; LinkRefused if it must not open."""
    claim = LinkSigner.from_settings(runtime.settings).verify(token, now)
    if data_deleted(runtime.catalog, claim.account_id):
        raise LinkRefused(410, "the data behind this link has been deleted")
    try:
        artifact = published_artifact(runtime.store, claim.account_id, claim.key)
    except (DownloadRefused, UnsafeKeyError) as refused:
        raise LinkRefused(403, str(refused)) from None
    except ExportNotReady:
        raise LinkRefused(410, "the file behind this link has been deleted") from None
    if not runtime.store.exists(claim.key):
        raise LinkRefused(410, "the file behind this link has been deleted")
    try:
        check_plan_allows(artifact, delivery_terms(runtime, claim.account_id, now).downloads)
    except AccountLocked:
        raise LinkRefused(403, "the account's contract has ended: its results are no longer served") from None
    except (DownloadRefused, UnknownAccountError) as refused:
        raise LinkRefused(403, str(refused)) from None
    direct = runtime.store.direct_link(claim.key, PRESIGNED_LIFETIME)
    return Download(
        name=artifact["name"],
        media_type=artifact["media_type"],
        size=runtime.store.size(claim.key),
        url=direct,
        chunks=None if direct else runtime.store.read_chunks(claim.key),
    )
