"""E-mail through a real SMTP server on loopback, the outbox in embedded mode, and send-once."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from pipelines.billing.pricebook import default_pricebook_text
from pipelines.catalog.models import SentMessage as SentMessageRecord
from pipelines.customer_text import Mail
from pipelines.notify import DeliveryError, Message, outbox_messages, reply_address, send_email, send_once
from pipelines.runtime import Runtime
from pipelines.settings import Settings, SettingsError


def test_outbox_is_the_embedded_default(settings: Settings) -> None:
    sent = send_email(settings, "a@x.example", "hello", "body text", reply_to=None)
    [path] = outbox_messages(settings)
    assert str(path) == sent.location and b"body text" in path.read_bytes()


def test_smtp_delivery_and_refusal(home, smtp_sink) -> None:
    settings = Settings.from_env()
    sent = send_email(settings, "a@x.example", "subject line", "hello over smtp", reply_to=None)
    [message] = smtp_sink.parsed()
    assert message["Subject"] == "subject line" and message["Message-ID"] == sent.message_id
    smtp_sink.refusing = True
    with pytest.raises(DeliveryError, match="127.0.0.1"):
        send_email(settings, "a@x.example", "again", "x", reply_to=None)


def test_send_once_sends_once_and_retries_after_a_refusal(home, smtp_sink) -> None:
    runtime = Runtime.from_settings(Settings.from_env())
    smtp_sink.refusing = True
    with pytest.raises(DeliveryError):
        send_once(
            runtime.settings,
            runtime.catalog,
            Message("invoice:PF-1", "acme", "invoice", "a@x.example", Mail("Invoice PF-1", "x")),
            reply_to=None,
        )
    assert smtp_sink.messages == []
    smtp_sink.refusing = False
    first = send_once(
        runtime.settings,
        runtime.catalog,
        Message("invoice:PF-1", "acme", "invoice", "a@x.example", Mail("Invoice PF-1", "x")),
        reply_to=None,
    )
    second = send_once(
        runtime.settings,
        runtime.catalog,
        Message("invoice:PF-1", "acme", "invoice", "a@x.example", Mail("Invoice PF-1", "x")),
        reply_to=None,
    )
    assert len(smtp_sink.messages) == 1 and first.message_id == second.message_id


def test_credentials_never_appear_in_errors(home, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("POINTFLOW_SMTP_URL", f"smtp://mailer:s3cret-pass@127.0.0.1:{free_port()}")
    with pytest.raises(DeliveryError) as error:
        send_email(Settings.from_env(), "a@x.example", "s", "b", reply_to=None)
    assert "s3cret" not in str(error.value) and "mailer" not in str(error.value)


def test_subjects_are_stripped_and_stay_on_the_subject_line(settings: Settings) -> None:
    """Whatever a template leaves around its subject, and however long it is, the header starts with
    its first word on the Subject line; a long one folds between words after it."""
    for words in range(1, 30):
        subject = " ".join(f"w{i}" for i in range(words)) + " pointflow"
        sent = send_email(settings, "a@x.example", f"\n  {subject} \n", "body", reply_to=None)
        raw = Path(sent.location).read_bytes().decode("ascii").replace("\r\n", "\n")
        header = raw[raw.index("\nSubject:") + 1 :].split("\n")
        assert header[0].startswith("Subject: w0")
        assert sent.subject == subject
        message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
        assert message["Subject"] == subject


def test_every_message_has_a_date_and_a_message_id(settings: Settings) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    sent = send_email(settings, "a@x.example", "hello", "body", reply_to=reply_address(settings))
    message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
    assert before <= parsedate_to_datetime(message["Date"]) <= datetime.now(UTC)
    assert message["Date"].endswith("+0000") and message["Message-ID"] == sent.message_id
    assert "Reply-To" not in message, "no reply address set, none invented"


def test_replies_go_to_pointflow_reply_to(home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTFLOW_REPLY_TO", "Acme LiDAR support <support@acme.example>")
    sent = send_email(Settings.from_env(), "a@x.example", "hello", "body", reply_to=reply_address(Settings.from_env()))
    message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
    assert message["Reply-To"] == "Acme LiDAR support <support@acme.example>"
    monkeypatch.setenv("POINTFLOW_REPLY_TO", "a@x.example\nBcc: b@y.example")
    with pytest.raises(SettingsError, match="POINTFLOW_REPLY_TO"):
        Settings.from_env()


def test_without_pointflow_reply_to_replies_go_to_the_price_book_sellers_address(
    home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = tmp_path / "prices.yaml"
    text = default_pricebook_text()
    book.write_text(
        text
        + "\nseller:\n  name: Acme LiDAR GmbH\n  street: Hauptstr. 1\n  postcode: '10115'\n  city: Berlin\n"
        + "  country: DE\n  vat_id: DE123456789\n  email: billing@acme.example\n"
    )
    monkeypatch.setenv("POINTFLOW_PRICEBOOK", str(book))
    sent = send_email(Settings.from_env(), "a@x.example", "hello", "body", reply_to=reply_address(Settings.from_env()))
    message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
    assert message["Reply-To"] == "billing@acme.example"


def test_a_runtimes_e_mails_read_the_price_book_for_their_reply_address_once(
    home, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.notify

    runtime = Runtime.from_settings(Settings.from_env())
    assert runtime.settings.reply_to is None, "the reply address comes from the price book"
    read: list[Path] = []
    load = pipelines.notify.load_pricebook

    def counted_load_pricebook(path: Path):  # noqa: ANN202 (load_pricebook's PriceBook)
        read.append(path)
        return load(path)

    monkeypatch.setattr(pipelines.notify, "load_pricebook", counted_load_pricebook)
    for n in range(2):
        runtime.mailer.send_once(Message(f"notice:{n}", "acme", "test", "a@x.example", Mail(f"notice {n}", "x")))
    assert len(outbox_messages(runtime.settings)) == 2
    assert len(read) == 1


def test_a_subject_is_cleaned_once_per_message(home, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.notify

    runtime = Runtime.from_settings(Settings.from_env())
    cleaned: list[str] = []
    clean = pipelines.notify.clean_subject

    def counted_clean_subject(subject: str) -> str:
        cleaned.append(subject)
        return clean(subject)

    monkeypatch.setattr(pipelines.notify, "clean_subject", counted_clean_subject)
    sent = runtime.mailer.send_once(Message("notice:x", "acme", "test", "a@x.example", Mail("\n  a   notice \n", "x")))
    assert cleaned == ["\n  a   notice \n"]
    assert sent.subject == "a notice"
    [path] = outbox_messages(runtime.settings)
    assert email.message_from_bytes(path.read_bytes(), policy=email.policy.default)["Subject"] == "a notice"
    with runtime.catalog.session() as session:
        assert session.get(SentMessageRecord, "notice:x").subject == "a notice"
