"""Email to customers: SMTP when POINTFLOW_SMTP_URL is set, otherwise .eml files in the outbox folder."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from sqlalchemy import delete, update

from pipelines.addresses import InvalidAddress, check_address
from pipelines.billing.pricebook import PriceBook, PriceBookError, load_pricebook
from pipelines.catalog import Catalog
from pipelines.catalog.db import insert_ignoring_duplicates
from pipelines.catalog.models import MessageClaim, utcnow
from pipelines.catalog.models import SentMessage as SentMessageRecord
from pipelines.errors import PointflowError
from pipelines.settings import Settings

if TYPE_CHECKING:
    from pipelines.customer_text import Attachment, Mail

# A claim older than this belongs to a sender that died (a send takes seconds, SMTP's own timeout
# is 30 s): the next run takes it over and sends, with the claim's Message-ID.
CLAIM_LEASE = timedelta(minutes=15)


class DeliveryError(PointflowError, RuntimeError):
    """The mail server refused or could not be reached; the message was not sent."""


class DeliveryInProgress(DeliveryError):
    """Another process claimed this message a moment ago and is sending it."""


class UndeliverableAddress(DeliveryError):
    """The recipient is not one plain address (stored before addresses were checked): nothing was
    sent, and every sender treats it like any refused delivery: reported, the others go on."""


class _MailPolicy(EmailPolicy):
    """The standard policy, but a header's value starts on the header's own line: Python moves a
    value that does not fit there but fits a continuation line whole onto the next line
    ("Subject:" then " pointflow: ..."), which mail programs show with a leading space."""

    def _fold(self, name, value, refold_binary=False):  # noqa: ANN001, ANN202 (email.policy's signature)
        folded = super()._fold(name, value, refold_binary)
        bare = f"{name}:{self.linesep} "
        return f"{name}: {folded[len(bare) :]}" if folded.startswith(bare) else folded


MAIL_POLICY = _MailPolicy()


def clean_subject(subject: str) -> str:
    """One line, no leading, trailing or doubled whitespace, whatever a template left around it."""
    return " ".join(subject.split())


@dataclass(frozen=True)
class SentMessage:
    message_id: str
    to: str
    subject: str
    location: str  # the outbox file, or the SMTP server it went to (no credentials)


def reply_address(settings: Settings, pricebook: PriceBook | None = None) -> str | None:
    """Where customers reach support: POINTFLOW_REPLY_TO, else the price book seller's e-mail, else
    None (the e-mails then say so rather than invite a reply to the From address)."""
    if settings.reply_to:
        return settings.reply_to
    try:
        pricebook = pricebook or load_pricebook(settings.pricebook_path)
    except PriceBookError:
        return None  # the billing commands report it; a job's e-mail goes out all the same
    return pricebook.seller.email if pricebook.seller and pricebook.seller.email else None


def support_address(settings: Settings, pricebook: PriceBook | None = None) -> str | None:
    """The bare address of `reply_address`, as the e-mails' text names it."""
    reply = reply_address(settings, pricebook)
    return parseaddr(reply)[1] if reply else None


def _message(
    settings: Settings,
    to: str,
    subject: str,
    body: str,
    message_id: str | None,
    attachments: tuple[Attachment, ...],
    reply_to: str | None,
) -> EmailMessage:
    try:
        check_address(to)
    except InvalidAddress as error:
        raise UndeliverableAddress(
            f"{error}; correct the account's address ('pointflow accounts add ID … --email …')"
        ) from None
    message = EmailMessage(policy=MAIL_POLICY)
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = message_id or make_msgid(domain="pointflow.invalid")
    if reply_to:
        message["Reply-To"] = reply_to
    message.set_content(body)
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename)
    return message


def send_email(
    settings: Settings,
    to: str,
    subject: str,
    body: str,
    message_id: str | None = None,
    attachments: tuple[Attachment, ...] = (),
    *,
    reply_to: str | None,
) -> SentMessage:
    """Send one message (with `attachments`, if any); `to` must be one plain address
    (UndeliverableAddress otherwise, before anything is sent). `reply_to` is `reply_address`,
    which the caller reads once for all its messages."""
    subject = clean_subject(subject)
    message = _message(settings, to, subject, body, message_id, attachments, reply_to)
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


@dataclass(frozen=True)
class Message:
    """One customer e-mail to send once: `key` is its idempotency key (a second send of the same
    key sends nothing), `kind` what the sent-messages ledger files it under."""

    key: str
    account_id: str
    kind: str
    to: str
    mail: Mail


def send_once(settings: Settings, catalog: Catalog, message: Message, *, reply_to: str | None) -> SentMessage:
    """Send unless a message with this idempotency key was already sent: claim it (one claim per
    key, whoever inserts it first), send, then record it as sent in the same transaction that drops
    the claim. Concurrent senders of one key send one message; the others raise DeliveryInProgress.

    A refused delivery drops the claim and raises DeliveryError, so the next run tries again. A
    sender that dies after claiming leaves a claim that the next run takes over once CLAIM_LEASE has
    passed: it sends with the claim's Message-ID, so should the dead sender have got its message
    out just before dying, the two are the same message to the customer's mail program.
    """
    key, account_id, to = message.key, message.account_id, message.to
    for _ in range(3):
        with catalog.session() as session:
            known = session.get(SentMessageRecord, key)
            if known is not None:
                return SentMessage(known.message_id, known.recipient, known.subject, "already sent")
        message_id = _claim(catalog, key, account_id)
        if message_id is None:
            continue
        with catalog.session() as session:
            known = session.get(SentMessageRecord, key)
            if known is None:
                break
            # Sent by another process between our look and our claim.
            session.execute(delete(MessageClaim).where(MessageClaim.key == key, MessageClaim.message_id == message_id))
            return SentMessage(known.message_id, known.recipient, known.subject, "already sent")
    else:
        raise DeliveryInProgress(f"message {key} is being sent by another process")
    try:
        sent = send_email(
            settings,
            to,
            message.mail.subject,
            message.mail.body,
            message_id,
            message.mail.attachments,
            reply_to=reply_to,
        )
    except BaseException:
        with catalog.session() as session:
            session.execute(delete(MessageClaim).where(MessageClaim.key == key, MessageClaim.message_id == message_id))
        raise
    with catalog.session() as session:
        session.add(
            SentMessageRecord(
                key=key,
                account_id=account_id,
                kind=message.kind,
                recipient=to,
                subject=sent.subject,
                message_id=sent.message_id,
            )
        )
        session.execute(delete(MessageClaim).where(MessageClaim.key == key))
    return sent


def _claim(catalog: Catalog, key: str, account_id: str) -> str | None:
    """The Message-ID to send with, once this process holds the claim on `key`; None when the
    claim vanished meanwhile (sent or released: look again). Raises DeliveryInProgress while another
    process's claim is younger than CLAIM_LEASE."""
    now = utcnow()
    message_id = make_msgid(domain="pointflow.invalid")
    # Writes first, reads after: concurrent claimers queue on the insert, not on a stale read.
    with catalog.session() as session:
        claim = insert_ignoring_duplicates(session, MessageClaim, ["key"]).values(
            key=key, account_id=account_id, message_id=message_id, claimed_at=now
        )
        if session.execute(claim).rowcount == 1:
            return message_id
    with catalog.session() as session:
        stale = (
            update(MessageClaim)
            .where(MessageClaim.key == key, MessageClaim.claimed_at < now - CLAIM_LEASE)
            .values(claimed_at=now)
            .returning(MessageClaim.message_id)
        )
        taken = session.execute(stale).scalar_one_or_none()
        if taken is not None:
            return taken
        if session.get(MessageClaim, key) is None:
            return None
    raise DeliveryInProgress(
        f"message {key} was claimed by another process less than {CLAIM_LEASE} ago and is being sent"
    )


def outbox_messages(settings: Settings) -> list[Path]:
    return (
        sorted(settings.outbox_dir.glob("*.eml"), key=lambda p: p.stat().st_mtime)
        if settings.outbox_dir.exists()
        else []
    )


@dataclass(frozen=True)
class Mailer:
    """Customer e-mail as a stage sends it (`Runtime.mailer`): a rendered mail to one address,
    once per idempotency key, through POINTFLOW_SMTP_URL or the outbox (see `send_once`), with
    `reply_to` (`reply_address`, read once for every message it sends)."""

    settings: Settings
    catalog: Catalog
    reply_to: str | None

    def send_once(self, message: Message) -> SentMessage:
        return send_once(self.settings, self.catalog, message, reply_to=self.reply_to)
