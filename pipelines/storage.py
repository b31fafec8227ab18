"""Object storage: one interface, a local-folder backend and an S3 backend (boto3).

Keys are built only by `AccountArea`, which checks account ids and file names, so nothing a
customer names can escape its account's prefix.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from pipelines.errors import UserError

ACCOUNT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
S3_MAX_ATTEMPTS = 9
INCOMING_PREFIX = "incoming/"
AREAS = ("raw", "quarantine", "classified", "exports", "reports", "invoices", "models", "tmp")


class StorageError(UserError, RuntimeError):
    """An object operation failed; the message says which key and why."""


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


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise UnsafeKeyError(f"unsafe object key {key!r}")
    # Control characters (NUL, CR/LF) end up in paths, headers and logs; nothing we build has them.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise UnsafeKeyError(f"unsafe object key {key!r}: control characters are not allowed")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise UnsafeKeyError(f"object key too long ({len(key.encode())} bytes, at most {MAX_KEY_BYTES}): {key[:80]!r}...")
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
        accounts/ so that a customer's credentials can be limited to it (docs/bucket-policies.md)."""
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
    def get_file(self, key: str, path: Path) -> None: ...

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


def _local_version(facts: os.stat_result) -> str:
    # A copy onto an existing name keeps its inode but changes mtime and usually size; a rename
    # onto it brings another inode: any of the three differing is another upload.
    return f"{facts.st_ino}-{facts.st_mtime_ns}-{facts.st_size}"


class LocalStore(ObjectStore):
    """Objects as files under one folder; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise UnsafeKeyError(f"key {key!r} resolves outside the store")
        return path

    def _write_atomic(self, key: str, writer) -> None:
        target = self._path(key)
        # Another process's delete may prune a folder on our path between mkdir and mkstemp, or
        # inside mkdir itself (it finds the folder, then pathlib's is_dir() check no longer does
        # and raises FileExistsError). Each such failure means that delete made progress, so
        # retrying cannot livelock; the bound is only for a folder that keeps vanishing.
        for attempt in range(1000):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                break
            except (FileNotFoundError, FileExistsError):
                if attempt == 999:
                    raise
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write_atomic(key, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda handle: handle.write(data))

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return source.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return source.stat().st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return
        # os.walk skips folders that vanish under it: other tasks delete while we list.
        paths = sorted(Path(folder, name) for folder, _, names in os.walk(base) for name in names if not name.startswith(".part-"))
        for path in paths:
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                try:
                    facts = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, facts.st_size, _local_version(facts), datetime.fromtimestamp(facts.st_mtime, timezone.utc))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove emptied folders so a deleted account leaves no trace in the tree.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                # Not empty, or already pruned by a concurrent delete: either way, done here.
                break
            parent = parent.parent

    def copy(self, source: str, destination: str) -> None:
        src = self._path(source)
        if not src.is_file():
            raise StorageError(f"no object {source!r} in {self.url}")
        self.put_file(destination, src)

    def link(self, key: str, expires_in: timedelta) -> str:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        return path.as_uri()

    def direct_link(self, key: str, expires_in: timedelta) -> str | None:
        return None

    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        with open(source, "rb") as handle:
            yield from iter(lambda: handle.read(size), b"")

    def key_of(self, source: str) -> str | None:
        parsed = urlparse(source)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else source).expanduser().resolve()
        if path == self.root or self.root in path.parents:
            return path.relative_to(self.root).as_posix()
        return None

    def local_path(self, key: str) -> Path:
        """Direct read access for the local backend, avoiding a copy of large inputs."""
        return self._path(key)


class S3Store(ObjectStore):
    """Objects in an S3 bucket under an optional prefix; AWS_ENDPOINT_URL selects MinIO and others."""

    def __init__(self, bucket: str, prefix: str = "", client=None, link_endpoint: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        # Retries with exponential backoff and jitter ride out short outages (about 6 s on
        # average with 9 attempts); longer ones are the task retries' job. AWS_MAX_ATTEMPTS
        # and AWS_RETRY_MODE still win, as boto3 users expect. A 10 s connect timeout stops a
        # black-holed endpoint from hanging each attempt for botocore's default minute.
        retries = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard"}
        if not os.environ.get("AWS_MAX_ATTEMPTS"):
            retries["total_max_attempts"] = S3_MAX_ATTEMPTS
        config = Config(retries=retries, connect_timeout=10, read_timeout=60, signature_version="s3v4")
        self.client = client or boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)
        # Customers may reach the store under another name than we do (a compose network's
        # http://minio:9000 vs its public address): the host is part of the signature, so links
        # are signed by a client that uses the public endpoint. Signing is offline: no requests.
        self.link_client = boto3.client("s3", endpoint_url=link_endpoint, config=config) if link_endpoint else self.client

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        # S3 PUT is atomic: readers see the whole object or none.
        self._call(key, self.client.upload_file, str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call(key, self.client.download_file, self.bucket, self._key(key), str(path))

    def get_bytes(self, key: str) -> bytes:
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except StorageError as error:
            cause = error.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, key: str) -> int:
        response = self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(response["ContentLength"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix))
        while (page := self._call(prefix, next, pages, None)) is not None:
            for item in page.get("Contents", []):
                modified, etag = item["LastModified"], item["ETag"].strip('"')
                yield ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"]), f"{etag}@{modified.isoformat()}", modified)

    def delete(self, key: str) -> None:
        full = self._key(key)
        paginator = self.client.get_paginator("list_object_versions")
        versions = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if item["Key"] == full:
                    versions.append({"Key": full, "VersionId": item["VersionId"]})
        if not versions:
            self._call(key, self.client.delete_object, Bucket=self.bucket, Key=full)
        for start in range(0, len(versions), 1000):
            self._call(key, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": versions[start:start + 1000]})

    def copy(self, source: str, destination: str) -> None:
        self._call(
            source,
            self.client.copy,
            {"Bucket": self.bucket, "Key": self._key(source)},
            self.bucket,
            self._key(destination),
        )

    def direct_link(self, key: str, expires_in: timedelta) -> str | None:
        return self.link(key, expires_in)

    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        yield from response["Body"].iter_chunks(size)

    def link(self, key: str, expires_in: timedelta) -> str:
        if not self.exists(key):
            raise StorageError(f"no object {key!r} in {self.url}")
        seconds = int(expires_in.total_seconds())
        # SigV4 presigned URLs cannot outlive 7 days.
        seconds = max(1, min(seconds, 7 * 24 * 3600))
        return self.link_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=seconds
        )

    def key_of(self, source: str) -> str | None:
        parsed = urlparse(source)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            return None
        full = parsed.path.lstrip("/")
        # Elsewhere in our bucket is not the customer's either: "" belongs to no account.
        return full[len(self.prefix):] if full.startswith(self.prefix) else ""

    def _call(self, key: str, function, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return function(*args, **kwargs)
        except (BotoConnectionError, HTTPClientError) as error:
            attempts = self.client.meta.config.retries.get("total_max_attempts", "several")
            endpoint = self.client.meta.endpoint_url
            raise StorageError(
                f"{function.__name__} {key!r} in {self.url} failed after {attempts} attempts: the S3 endpoint "
                f"{endpoint} did not answer ({error}). Check that it is up and reachable (AWS_ENDPOINT_URL), "
                "then retry the task."
            ) from error
        except (BotoCoreError, ClientError, Boto3Error) as error:
            raise StorageError(f"{function.__name__} {key!r} in {self.url} failed: {error}") from error


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
