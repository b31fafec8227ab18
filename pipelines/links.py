"""Download links that pointflow signs and checks itself, so they last as long as the plan says.

S3 presigned URLs cannot outlive 7 days, and `api` results stay downloadable for 10. A customer's
link is instead `<POINTFLOW_PUBLIC_URL>/pointflow/download/<token>`: the token names the account,
the object and the expiry, signed with HMAC-SHA256 under POINTFLOW_LINK_SECRET (or a secret kept
in POINTFLOW_HOME). The endpoint (plugins/pointflow_ui.py, no Airflow login) checks the token and
then, every time, everything a link depends on: the account is not locked and its data not
deleted, the object is still part of a published export of that account, the plan allows
downloading it (`pipelines.downloads.open_download`). Then it redirects to a fresh presigned URL
that lives minutes (S3), or streams the object (local store). Deleting the data or locking the
account thus revokes every link at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pipelines.errors import UserError
from pipelines.keys import kept_secret
from pipelines.settings import Settings

DOWNLOAD_PATH = "/pointflow/download/"
# A fresh presigned URL is used at once by the browser that asked: minutes are plenty, and a
# copied one is soon useless.
PRESIGNED_LIFETIME = timedelta(minutes=5)
_CONTEXT = b"pointflow download link v1\n"


class LinkRefused(UserError, PermissionError):
    """The link does not (or no longer) open its object; `status` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class LinkClaim:
    account_id: str
    key: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class LinkSigner:
    secret: bytes
    public_url: str

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner:
        secret = settings.link_secret or kept_secret(settings.home / "link-signing.key")
        return cls(secret.encode(), settings.public_url.rstrip("/"))

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self.secret, _CONTEXT + body.encode(), hashlib.sha256).digest())

    def token(self, claim: LinkClaim) -> str:
        payload = {"a": claim.account_id, "k": claim.key, "e": int(claim.expires_at.timestamp())}
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(body)}"

    def url(self, claim: LinkClaim) -> str:
        return self.public_url + DOWNLOAD_PATH + self.token(claim)

    def verify(self, token: str, now: datetime) -> LinkClaim:
        """The claim of an untampered, unexpired token; LinkRefused otherwise."""
        body, _, mac = token.partition(".")
        if not body or not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            raise LinkRefused(403, "this download link is not valid: check that it was copied whole")
        try:
            payload = json.loads(_unb64(body))
            claim = LinkClaim(str(payload["a"]), str(payload["k"]), datetime.fromtimestamp(int(payload["e"]), UTC))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise LinkRefused(403, "this download link is not valid") from None
        if now >= claim.expires_at:
            raise LinkRefused(410, f"this download link expired on {claim.expires_at:%Y-%m-%d %H:%M} UTC")
        return claim
