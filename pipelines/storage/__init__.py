"""Object storage: one interface (`base`), a local-folder backend (`local`) and an S3 backend (`s3`).

Keys are built only by `AccountArea`, which checks account ids and file names, so nothing a
customer names can escape its account's prefix.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.storage.base import (
    ACCOUNT_ID_RE,
    AREAS,
    INCOMING_PREFIX,
    LINK_LIFETIME,
    MAX_KEY_BYTES,
    AccountArea,
    ObjectInfo,
    ObjectStore,
    ObjectTooLarge,
    StaleObject,
    StorageError,
    UnsafeKeyError,
    check_account_id,
    check_key,
    file_sha256,
    safe_name,
)
from pipelines.storage.local import LocalStore
from pipelines.storage.s3 import S3Store

__all__ = [
    "ACCOUNT_ID_RE",
    "AREAS",
    "INCOMING_PREFIX",
    "LINK_LIFETIME",
    "MAX_KEY_BYTES",
    "AccountArea",
    "LocalStore",
    "ObjectInfo",
    "ObjectTooLarge",
    "ObjectStore",
    "S3Store",
    "StaleObject",
    "StorageError",
    "UnsafeKeyError",
    "check_account_id",
    "check_key",
    "file_sha256",
    "open_store",
    "safe_name",
]


def open_store(url: str, link_endpoint: str | None = None) -> ObjectStore:
    """The store behind a storage URL; ``link_endpoint`` is the S3 address customers' links use."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {url!r} names no bucket: use s3://bucket[/prefix]")
        return S3Store(parsed.netloc, parsed.path, link_endpoint=link_endpoint)
    raise StorageError(f"unsupported storage URL {url!r}: use file:///folder or s3://bucket[/prefix]")
