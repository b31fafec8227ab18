"""Email to customers: SMTP when POINTFLOW_SMTP_URL is set, otherwise .eml files in the outbox folder."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.catalog import Catalog
from pipelines.catalog.models import SentMessage as SentMessageRecord
from pipelines.settings import Settings


class DeliveryError(RuntimeError):
    """The mail server refused or could not be reached; the message was not sent."""


@dataclass(frozen=True)
class SentMessage:
    message_id: str
    to: str
    subject: str
    location: str  # the outbox file, or the SMTP server it went to (no credentials)


def _message(settings: Settings, to: str, subject: str, body: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="pointflow.invalid")
    message.set_content(body)
    return message


def send_email(settings: Settings, to: str, subject: str, body: str) -> SentMessage:
    message = _message(settings, to, subject, body)
    message_id = message["Message-ID"]
    if not settings.smtp_url:
        settings.outbox_dir.mkdir(parents=True, exist_ok=True)
        path = settings.outbox_dir / f"{message_id.strip('<>').replace('@', '_at_')}.eml"
        path.write_bytes(bytes(message))
        return SentMessage(message_id, to, subject, str(path))
    url = urlparse(settings.smtp_url)
    if url.scheme not in ("smtp", "smtps"):
        raise DeliveryError(f"POINTFLOW_SMTP_URL must start with smtp:// or smtps://, got {url.scheme}://")
    host, port = url.hostname or "localhost", url.port or (465 if url.scheme == "smtps" else 25)
    try:
        if url.scheme == "smtps":
            server = smtplib.SMTP_SSL(host, port, timeout=30, context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(host, port, timeout=30)
        with server:
            if url.scheme == "smtp" and "starttls=1" in (url.query or ""):
                server.starttls(context=ssl.create_default_context())
            if url.username:
                server.login(unquote(url.username), unquote(url.password or ""))
            server.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        # The URL may hold a password: name only host and port.
        raise DeliveryError(f"mail to {to} via {host}:{port} failed: {error}") from error
    return SentMessage(message_id, to, subject, f"{url.scheme}://{host}:{port}")


def send_once(settings: Settings, catalog: Catalog, key: str, account_id: str, kind: str, to: str, subject: str, body: str) -> SentMessage:
    """Send unless a message with this idempotency key was already sent; record it after sending.

    A refused delivery raises DeliveryError and records nothing, so the next run tries again.
    A crash between sending and recording can send one duplicate; never zero messages.
    """
    with catalog.session() as session:
        known = session.get(SentMessageRecord, key)
        if known is not None:
            return SentMessage(known.message_id, known.recipient, known.subject, "already sent")
    sent = send_email(settings, to, subject, body)
    with catalog.session() as session:
        session.add(SentMessageRecord(key=key, account_id=account_id, kind=kind, recipient=to, subject=subject, message_id=sent.message_id))
    return sent


def outbox_messages(settings: Settings) -> list[Path]:
    return sorted(settings.outbox_dir.glob("*.eml"), key=lambda p: p.stat().st_mtime) if settings.outbox_dir.exists() else []


