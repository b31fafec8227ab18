"""Object storage's interface: keys (built only by `AccountArea`, which checks account ids and file
names, so nothing a customer names can escape its account's prefix), object facts and the
operations every backend provides."""

from __future__ import annotations

import hashlib
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from pipelines.errors import UserError

ACCOUNT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
S3_MAX_ATTEMPTS = 9
INCOMING_PREFIX = "incoming/"
AREAS = ("raw", "quarantine", "classified", "exports", "reports", "invoices", "models", "tmp")


class StorageError(UserError, RuntimeError):
    """An object operation failed; the message says which key and why."""


class StaleObject(StorageError):
    """The object is no longer the version that was asked for: it was replaced meanwhile."""


class ObjectTooLarge(StorageError):
    """A download stopped at its bound (`max_bytes`): the object holds more than that."""

    def __init__(self, key: str, size: int, max_bytes: int) -> None:
        self.size, self.max_bytes = size, max_bytes
        super().__init__(f"{key!r} holds {size:,} bytes, more than the {max_bytes:,} this download may read")


class UnsafeKeyError(StorageError, ValueError):
    """A key or name that could reach outside its account (traversal, absolute path, ...)."""


def check_account_id(account_id: str) -> str:
    if not isinstance(account_id, str) or not ACCOUNT_ID_RE.fullmatch(account_id):
        raise UnsafeKeyError(
            f"invalid account id {account_id!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return account_id


def safe_name(name: str) -> str:
    """The last path component of `name` with anything outside [A-Za-z0-9._-] replaced by '_'."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    # Runs of dots are folded too: harmless inside a segment, but they alarm every reader of a key.
    cleaned = re.sub(r"\.{2,}", ".", _UNSAFE_NAME_CHARS.sub("_", base)).strip("._")
    if not cleaned:
        raise UnsafeKeyError(f"file name {name!r} has no usable characters")
    return cleaned[:200]


MAX_KEY_BYTES = 1024  # S3's limit; local folders get the same one so both backends agree
# S3 presigned URLs (SigV4) cannot outlive 7 days: no link lasts longer, and a link the customer is
# mailed (a report, an invoice's documents, results the plan keeps) lasts that long.
LINK_LIFETIME = timedelta(days=7)


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise UnsafeKeyError(f"unsafe object key {key!r}")
    # Control characters (NUL, CR/LF) end up in paths, headers and logs; nothing we build has them.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise UnsafeKeyError(f"unsafe object key {key!r}: control characters are not allowed")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise UnsafeKeyError(
            f"object key too long ({len(key.encode())} bytes, at most {MAX_KEY_BYTES}): {key[:80]!r}..."
        )
    return key


@dataclass(frozen=True)
class AccountArea:
    """The per-account key layout: accounts/<id>/<area>/..."""

    account_id: str

    def __post_init__(self) -> None:
        check_account_id(self.account_id)

    @property
    def prefix(self) -> str:
        return f"accounts/{self.account_id}/"

    @property
    def incoming_prefix(self) -> str:
        """The account's drop zone: what lands here is classified (pipelines.intake). Outside
        accounts/ so that a customer's credentials can be limited to it (README, "Customers' own S3 credentials")."""
        return f"{INCOMING_PREFIX}{self.account_id}/"

    def key(self, area: str, *parts: str) -> str:
        if area not in AREAS:
            raise UnsafeKeyError(f"unknown area {area!r}")
        return check_key(self.prefix + "/".join([area, *(safe_name(p) for p in parts)]))

    def owns(self, key: str) -> bool:
        return check_key(key).startswith(self.prefix)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # What tells one upload under a key from the next (S3: the ETag and time; a local file: its
    # change time in ns and size), and when it was last written: the drop zone's "file version".
    version: str = ""
    modified: datetime | None = None


class ObjectStore(ABC):
    """The operations the pipeline needs; both backends pass tests/test_storage.py."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path, version: str | None = None, max_bytes: int | None = None) -> None:
        """Copy the object to a local file; with `version` (an ObjectInfo's), that version's bytes
        or StaleObject: a drop-zone file replaced after it was listed is not taken for the old one.
        With `max_bytes`, no more than that is read: a larger object raises ObjectTooLarge and
        leaves no file."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object (every version, where the backend keeps versions); absent is fine."""

    @abstractmethod
    def copy(self, source: str, destination: str) -> None: ...

    @abstractmethod
    def link(self, key: str, expires_in: timedelta) -> str:
        """A URL a customer can fetch the object with until it expires."""

    @abstractmethod
    def direct_link(self, key: str, expires_in: timedelta) -> str | None:
        """A URL a browser can fetch the object from by itself (a presigned one), or None where
        the store has none (a local folder): then pointflow streams the object."""

    @abstractmethod
    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, `size` at a time (not read before the first is asked for)."""

    @abstractmethod
    def key_of(self, source: str) -> str | None:
        """The key a source path or URL names inside this store, or None for a source elsewhere:
        what keeps one account from naming another account's objects as its input."""

    def location(self, key: str) -> str:
        """Where an object (or a prefix ending in /) is, for logs and the console: no signature,
        so unlike a link it opens nothing by itself."""
        check_key(key.rstrip("/"))
        return f"{self.url.rstrip('/')}/{key}"

    def info(self, key: str) -> ObjectInfo | None:
        """The object's size and version now, or None when there is none."""
        return next((o for o in self.list(key) if o.key == key), None)

    def move(self, source: str, destination: str) -> None:
        self.copy(source, destination)
        self.delete(source)

    def sha256(self, key: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "object"
            self.get_file(key, local)
            return file_sha256(local)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
