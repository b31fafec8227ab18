"""The S3 backend (boto3): AWS, MinIO and other S3-compatible stores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

from pipelines.storage.base import (
    LINK_LIFETIME,
    S3_MAX_ATTEMPTS,
    ObjectInfo,
    ObjectStore,
    ObjectTooLarge,
    StaleObject,
    StorageError,
    check_key,
)


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
        self.client = client or boto3.client(
            "s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config
        )
        # Customers may reach the store under another name than we do (a compose network's
        # http://minio:9000 vs its public address): the host is part of the signature, so links
        # are signed by a client that uses the public endpoint. Signing is offline: no requests.
        self.link_client = (
            boto3.client("s3", endpoint_url=link_endpoint, config=config) if link_endpoint else self.client
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        # S3 PUT is atomic: readers see the whole object or none.
        self._call(key, self.client.upload_file, str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, path: Path, version: str | None = None, max_bytes: int | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if version is None and max_bytes is None:
            self._call(key, self.client.download_file, self.bucket, self._key(key), str(path))
            return
        conditions = {}
        if version is not None:
            # The ETag part of our version; S3 answers 412 when the object's is another (a new upload).
            conditions["IfMatch"] = f'"{version.split("@", 1)[0]}"'
        try:
            response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key), **conditions)
        except StorageError as error:
            if _error_code(error) in ("PreconditionFailed", "412"):
                raise StaleObject(f"{key!r} in {self.url} was replaced after it was listed") from error
            raise
        body = response["Body"]
        size = int(response.get("ContentLength", 0))
        if max_bytes is not None and size > max_bytes:
            body.close()  # not one byte of a body over the bound is read
            raise ObjectTooLarge(key, size, max_bytes)
        written = 0
        with open(path, "wb") as copy:
            for chunk in body.iter_chunks(1 << 20):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    break
                copy.write(chunk)
        if max_bytes is not None and written > max_bytes:
            body.close()
            Path(path).unlink(missing_ok=True)
            raise ObjectTooLarge(key, max(size, written), max_bytes)

    def get_bytes(self, key: str) -> bytes:
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def exists(self, key: str) -> bool:

        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except StorageError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, key: str) -> int:
        response = self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(response["ContentLength"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = iter(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        )
        while (page := self._call(prefix, next, pages, None)) is not None:
            for item in page.get("Contents", []):
                modified, etag = item["LastModified"], item["ETag"].strip('"')
                yield ObjectInfo(
                    item["Key"][len(self.prefix) :], int(item["Size"]), f"{etag}@{modified.isoformat()}", modified
                )

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
            self._call(
                key, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": versions[start : start + 1000]}
            )

    def unfinished_uploads(self, prefix: str) -> Iterator[ObjectInfo]:
        """The multipart uploads begun under `prefix` and neither completed nor aborted: a writer's
        under way, or what a killed one left (boto3's `upload_file` of anything over 8 MB, a
        customer's client in a drop zone). `list` never shows them, yet S3 keeps, and bills, their
        parts until they are aborted. Each as its key, the bytes of its parts so far, its upload id
        (`version`) and when it was initiated (`modified`)."""
        pages = iter(
            self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
        )
        while (page := self._call(prefix, next, pages, None)) is not None:
            for item in page.get("Uploads", []):
                key = item["Key"][len(self.prefix) :]
                size = self._parts_bytes(key, item["UploadId"])
                if size is not None:
                    yield ObjectInfo(key, size, item["UploadId"], item["Initiated"])

    def _parts_bytes(self, key: str, upload_id: str) -> int | None:
        """The bytes of an unfinished upload's parts, or None when it was completed or aborted since it was listed."""
        pages = iter(
            self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        )
        size = 0
        try:
            while (page := self._call(key, next, pages, None)) is not None:
                size += sum(int(part["Size"]) for part in page.get("Parts", []))
        except StorageError as error:
            if _error_code(error) == "NoSuchUpload":
                return None
            raise
        return size

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an unfinished multipart upload: its parts are deleted and it can no longer be
        completed. One completed or aborted meanwhile is fine (a completed one is an object, which
        a listing finds)."""
        try:
            self._call(
                key, self.client.abort_multipart_upload, Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
            )
        except StorageError as error:
            if _error_code(error) != "NoSuchUpload":
                raise

    def sweep_uploads(
        self, min_age: timedelta, prefix: str = "", now: datetime | None = None, keep: tuple[str, ...] = ()
    ) -> list[str]:
        """Abort the unfinished uploads under `prefix` initiated more than `min_age` before `now`:
        what killed writers left; never one under a prefix of `keep`. S3 cannot tell a live writer
        from a dead one, and a live one may add parts to an old upload, so only its initiation time
        is judged: `min_age` must exceed the longest upload a writer still completes. Returns their keys."""
        now = now or datetime.now(UTC)
        stale = [
            u for u in self.unfinished_uploads(prefix) if u.modified <= now - min_age and not u.key.startswith(keep)
        ]
        for upload in stale:
            self.abort_upload(upload.key, upload.version)
        return [u.key for u in stale]

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
        seconds = max(1, min(int(expires_in.total_seconds()), int(LINK_LIFETIME.total_seconds())))
        return self.link_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=seconds
        )

    def key_of(self, source: str) -> str | None:
        parsed = urlparse(source)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            return None
        full = parsed.path.lstrip("/")
        # Elsewhere in our bucket is not the customer's either: "" belongs to no account.
        return full[len(self.prefix) :] if full.startswith(self.prefix) else ""

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


def _error_code(error: StorageError) -> str | None:
    """S3's error code behind a StorageError, if S3 answered at all."""
    from botocore.exceptions import ClientError

    cause = error.__cause__
    return cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
