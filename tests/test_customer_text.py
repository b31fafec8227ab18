"""Customer-facing text: every template in pipelines/templates/ rendered with hostile values, through
the code that uses it. Pages escape what they are given; e-mails keep it as text, and nothing in a
value can add a header. No template lies unused, and every one ships with the package."""

from __future__ import annotations

import email
import email.policy
import fnmatch
import re
import tomllib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from pipelines.billing.delivery import invoice_email
from pipelines.billing.documents import Buyer, DocumentView, VatGroup, document_html
from pipelines.billing.lines import Line
from pipelines.billing.overdue import OverdueBalance, OverdueInvoice
from pipelines.billing.pricebook import Seller
from pipelines.catalog.models import Account
from pipelines.class_table import class_summary
from pipelines.customer_text import Mail, render_mail
from pipelines.export import DownloadLink
from pipelines.lasio import LasInfo
from pipelines.lifecycle import notices
from pipelines.lifecycle.models import DeletionAudit
from pipelines.notify import Message, reply_address, send_email
from pipelines.settings import Settings
from pipelines.storage import INCOMING_PREFIX
from pipelines.training import held_out_mistakes, held_out_rows
from pipelines.validate import Finding, ValidationReport

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "pipelines" / "templates"
SCRIPT = "<script>alert('pwned')</script>"
# Markup, quotes that would end an attribute, a line break followed by a header, unicode, length.
HOSTILE = [
    f"{SCRIPT}\"'><img src=x onerror=alert(1)>",
    "Acme & Sons\r\nBcc: victim@evil.example\r\n\r\nforged body",
    "Ünïcødé 漢字 🙂 \u2028next\u0085line",
    "L" * 5000,
]
WHEN = datetime(2027, 3, 11, 3, 0, tzinfo=UTC)


def document(value: str, kind: str = "invoice") -> DocumentView:
    seller = Seller(
        value, value, value, value, "FR", value, email=value, registration=value, bank=value, iban=value, bic=value
    )
    buyer = Buyer("acme", value, "FR", "ops@acme.example", value, value, value, value)
    lines = (Line("usage", value, Decimal(3), Decimal("10.00"), Decimal("30.00"), True),)
    vat = (VatGroup("S", Decimal("0.2"), Decimal("30.00"), Decimal("6.00")),)
    return DocumentView(
        kind,
        "PF-2026-09-0001",
        date(2026, 10, 1),
        date(2026, 10, 31) if kind == "invoice" else None,
        date(2026, 9, 1),
        date(2026, 9, 30),
        "EUR",
        seller,
        buyer,
        lines,
        vat,
        Decimal("30.00"),
        Decimal("6.00"),
        Decimal("36.00"),
        refers_to=value,
    )


# A training run's held-out figures (`fitting.evaluate` plus the point count `training` adds).
TRAINING = {
    "per_class": {"2": {"f1": 0.99, "precision": 0.99, "recall": 0.99, "support": 8731.0}},
    "standard_per_class": {"2": {"f1": 0.98, "precision": 0.98, "recall": 0.98, "support": 8731.0}},
    "judged_classes": [2],
    "min_judged_points": 100,
    "macro_f1": 0.99,
    "standard_macro_f1": 0.98,
    "held_out_points": 8731,
    "confusion": {"classes": [2, 5], "custom": [[8644, 87], [0, 0]], "standard": [[8557, 174], [0, 0]]},
}


def overdue(number: str) -> OverdueBalance:
    return OverdueBalance(
        "acme",
        Decimal("1.00"),
        date(2026, 12, 31),
        (OverdueInvoice(number, date(2026, 12, 1), date(2026, 12, 31), Decimal("1.00")),),
    )


def account(value: str) -> Account:
    return Account(account_id="acme", name=value, email="ops@acme.example")


# Each page or e-mail template, rendered by the code that uses it (or, where that code needs a
# running service, with exactly the values that code passes).
PAGES: dict[str, Callable[[str], str]] = {
    "validation_report.html.j2": lambda v: (
        ValidationReport(
            v,
            False,
            "sample",
            1234,
            LasInfo(
                "1.4",
                6,
                1234,
                True,
                (0.01,) * 3,
                (0.0,) * 3,
                (0.0,) * 3,
                (1.0,) * 3,
                f'PROJCRS["{v}"]',
                (v,),
                30,
                375,
                9999,
            ).to_dict(),
            [Finding("gate", v, "error", v, v)],
            [Finding("las_points", v, "warning", v, v)],
        )
        .to_html()
        .decode()
    ),
    "invoice.html.j2": lambda v: document_html(document(v)),
}
MAILS: dict[str, Callable[[str], Mail]] = {
    "mail/invoice.txt.j2": lambda v: Mail(
        *invoice_email(document(v), {"html": "https://pointflow.example/i.html", "pdf": v}, WHEN)
    ),
    "mail/inactivity_notice.txt.j2": lambda v: _draft(notices.inactivity_notice(account(v), v, WHEN, 12, WHEN, WHEN)),
    "mail/inactivity_reminder.txt.j2": lambda v: _draft(notices.inactivity_reminder(account(v), v, 7, WHEN, WHEN)),
    "mail/data_locked.txt.j2": lambda v: _draft(notices.data_locked(account(v), v, WHEN, WHEN)),
    "mail/overdue_notice.txt.j2": lambda v: _draft(
        notices.overdue_notice(account(v), overdue(v), "EUR", WHEN, seller=document(v).seller)
    ),
    "mail/api_results_deleted.txt.j2": lambda v: _draft(
        notices.api_results_deleted(account(v), WHEN, [{"job_id": v, "finished_at": WHEN, "due_at": WHEN}], "10")
    ),
    "mail/deleted_on_request.txt.j2": lambda v: _draft(
        notices.deleted_on_request(
            account(v), DeletionAudit(id=1, account_id="acme", as_of=WHEN, object_count=2, bytes=20)
        )
    ),
    "mail/intake_refused.txt.j2": lambda v: render_mail(
        "mail/intake_refused.txt.j2", name=v, file_name=v, upload_folder=f"{INCOMING_PREFIX}acme/", reason=v
    ),
    "mail/quarantine.txt.j2": lambda v: render_mail(
        "mail/quarantine.txt.j2", name=v, file_name=v, reason=v, report_link="https://pointflow.example/report.html"
    ),
    "mail/export_ready.txt.j2": lambda v: render_mail(
        "mail/export_ready.txt.j2",
        name=v,
        file_name=v,
        classes=class_summary({2: 297_211, 6: 22_665}),
        summary={"output_points": 319_876, "classifier": v, "classifier_version": v},
        judged=(0.898, 0.839),
        links=[DownloadLink(v, "points", "https://pointflow.example/d/1", WHEN)],
        downloads=False,
        expires_at=WHEN,
    ),
    "mail/training_result.txt.j2": lambda v: render_mail(
        "mail/training_result.txt.j2",
        name=v,
        model=None,
        evaluation=TRAINING,
        rows=held_out_rows(TRAINING),
        mistakes=held_out_mistakes(TRAINING),
        refusal=v,
    ),
}
# Rendered only through the templates that extend or import them.
PARTS = {"mail/letter.txt.j2", "mail/file_refused.txt.j2", "mail/dates.txt.j2", "mail/support.txt.j2"}


def _draft(message: Message) -> Mail:
    return message.mail


def template_names() -> set[str]:
    return {path.relative_to(TEMPLATES).as_posix() for path in TEMPLATES.rglob("*") if path.is_file()}


def test_every_template_is_rendered_here() -> None:
    assert template_names() == set(PAGES) | set(MAILS) | PARTS


@pytest.mark.parametrize("value", HOSTILE, ids=["markup", "header-injection", "unicode", "long"])
@pytest.mark.parametrize("name", sorted(PAGES))
def test_pages_escape_hostile_values(name: str, value: str) -> None:
    page = PAGES[name](value)
    assert SCRIPT not in page and "<img" not in page and "\"'>" not in page
    if value.startswith(SCRIPT):
        assert (
            "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;&#34;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;"
            in page
        )
    elif value.startswith("Acme"):
        assert "Acme &amp; Sons\r\nBcc: victim@evil.example" in page
    else:
        assert value[:300] in page


@pytest.mark.parametrize("value", HOSTILE, ids=["markup", "header-injection", "unicode", "long"])
@pytest.mark.parametrize("name", sorted(MAILS))
def test_mails_keep_hostile_values_as_text_and_add_no_header(name: str, value: str, settings: Settings) -> None:
    mail = MAILS[name](value)
    assert (
        mail.subject
        and mail.subject.splitlines() == [mail.subject]
        and "\r" not in mail.subject
        and "\n" not in mail.subject
    )
    # Plain text: nothing escaped, nothing lost.
    assert "&lt;" not in mail.body and "&amp;" not in mail.body
    assert value in mail.body or value in mail.subject, "the value is in the mail as given"
    assert mail.body.endswith("\n")
    sent = send_email(settings, "ops@acme.example", mail.subject, mail.body, reply_to=reply_address(settings))
    message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
    assert sorted(message.keys()) == sorted(
        ["From", "To", "Subject", "Date", "Message-ID", "Content-Type", "Content-Transfer-Encoding", "MIME-Version"]
    )
    # The subject comes back as sent, but for how a long header is folded and unfolded.
    assert message["To"] == "ops@acme.example" and message["Subject"].split() == mail.subject.split()
    assert message.get_content() == mail.body.replace("\r\n", "\n").replace("\r", "\n")


def test_every_template_is_named_by_the_code_and_ships_with_the_package() -> None:
    code = "\n".join(path.read_text() for path in (ROOT / "pipelines").rglob("*.py"))
    named = set(re.findall(r"""["']((?:mail/)?[\w.]+\.(?:html|txt)\.j2)["']""", code))
    parts = "\n".join((TEMPLATES / name).read_text() for name in template_names())
    included = set(re.findall(r"""{%-?\s*(?:extends|from|import|include)\s+["']([^"']+)["']""", parts))
    assert named <= template_names(), "the code names a template that does not exist"
    assert named | included == template_names(), "a template nothing renders"
    assert PARTS == included
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipelines"]
    unshipped = [
        name for name in template_names() if not any(fnmatch.fnmatch(f"templates/{name}", p) for p in patterns)
    ]
    assert not unshipped, f"not in pyproject's package-data: {unshipped}"


def _sent(settings: Settings, mail: Mail) -> email.message.EmailMessage:
    """The mail as it lands in the outbox, parsed back."""
    sent = send_email(settings, "ops@acme.example", mail.subject, mail.body, reply_to=reply_address(settings))
    return email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)


def _payment_paragraph(body: str) -> str:
    return " ".join(next(p for p in body.split("\n\n") if p.startswith("Please pay")).split())


@pytest.mark.parametrize(
    ("bank", "expected"),
    [
        (
            {"iban": "FR7630006000011234567890189", "bic": "AGRIFRPP", "bank": "Crédit Agricole"},
            "Please pay EUR 36.00 by 2026-10-31. Bank transfer to IBAN FR7630006000011234567890189 (BIC AGRIFRPP), "
            "quoting PF-2026-09-0001.",
        ),
        ({}, "Please pay EUR 36.00 by 2026-10-31. Please quote PF-2026-09-0001 with your payment."),
        (None, "Please pay EUR 36.00 by 2026-10-31. Please quote PF-2026-09-0001 with your payment."),
    ],
    ids=["bank-details", "seller-without-bank-details", "no-seller"],
)
def test_the_payment_sentence_is_whole_with_or_without_bank_details(
    bank: dict[str, str] | None, expected: str, settings: Settings
) -> None:
    view = document("Acme")
    seller = None if bank is None else replace(view.seller, **{"bank": None, "iban": None, "bic": None, **bank})
    mail = Mail(*invoice_email(replace(view, seller=seller), {"html": "https://pointflow.example/i.html"}, WHEN))
    assert _payment_paragraph(_sent(settings, mail).get_content()) == expected


def _subject_lines(path: Path) -> list[str]:
    """The raw Subject header as sent: its first line and any continuation lines."""
    lines = Path(path).read_bytes().decode("ascii").split("\r\n") if b"\r\n" in Path(path).read_bytes() else []
    lines = lines or Path(path).read_bytes().decode("ascii").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Subject:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith((" ", "\t")))
    return lines[start:end]


@pytest.mark.parametrize("name", sorted(MAILS))
def test_every_subject_is_sent_on_the_subject_line_without_leading_space(name: str, settings: Settings) -> None:
    for value in ("trial1", "Acme & Sons GmbH", "x" * 40):
        mail = MAILS[name](value)
        assert mail.subject == " ".join(mail.subject.split()), "no leading, trailing or doubled space"
        sent = send_email(settings, "ops@acme.example", mail.subject, mail.body, reply_to=reply_address(settings))
        first, *_ = _subject_lines(Path(sent.location))
        assert first.startswith("Subject: ") and first != "Subject:" and not first.startswith("Subject:  ")
        message = email.message_from_bytes(Path(sent.location).read_bytes(), policy=email.policy.default)
        if mail.subject.isascii():
            assert message["Subject"] == mail.subject


def test_the_deletion_notice_subject_is_not_folded_away_from_its_header(settings: Settings) -> None:
    """The audit's case: a subject that fits a continuation line but not the header's own line."""
    moment = datetime(2027, 9, 23, 3, 0, tzinfo=UTC)
    draft = notices.data_locked(
        Account(account_id="trial1", name="Trial", email="t@x.example"), "trial_ended", moment, moment
    )
    sent = send_email(settings, "t@x.example", draft.mail.subject, draft.mail.body, reply_to=reply_address(settings))
    assert _subject_lines(Path(sent.location)) == [
        "Subject: pointflow: the data of account trial1 will be deleted on 23 September 2027"
    ]


# The mails that send the customer to support, drafted with and without a support address.
SUPPORT_MAILS: dict[str, Callable[[str | None], Mail]] = {
    "mail/invoice.txt.j2": lambda a: Mail(
        *invoice_email(document("Acme"), {"html": "https://pointflow.example/i.html"}, WHEN, support=a)
    ),
    "mail/inactivity_notice.txt.j2": lambda a: _draft(
        notices.inactivity_notice(account("Acme"), "c", WHEN, 12, WHEN, WHEN, support=a)
    ),
    "mail/inactivity_reminder.txt.j2": lambda a: _draft(
        notices.inactivity_reminder(account("Acme"), "c", 7, WHEN, WHEN, support=a)
    ),
    "mail/data_locked.txt.j2": lambda a: _draft(
        notices.data_locked(account("Acme"), "customer", WHEN, WHEN, support=a)
    ),
    "mail/overdue_notice.txt.j2": lambda a: _draft(
        notices.overdue_notice(account("Acme"), overdue("PF-2026-10-0002"), "EUR", WHEN, support=a)
    ),
}


@pytest.mark.parametrize("name", sorted(SUPPORT_MAILS))
def test_mails_that_send_the_customer_to_support_name_its_address_or_say_how_to_find_it(
    name: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POINTFLOW_REPLY_TO", "Acme support <help@acme.example>")
    message = _sent(Settings.from_env(), SUPPORT_MAILS[name]("help@acme.example"))
    body = " ".join(message.get_content().split())
    assert message["Reply-To"] == "Acme support <help@acme.example>"
    assert "pointflow support at help@acme.example" in body
    monkeypatch.delenv("POINTFLOW_REPLY_TO")
    message = _sent(Settings.from_env(), SUPPORT_MAILS[name](None))
    body = " ".join(message.get_content().split())
    assert "Reply-To" not in message and "Reply to this e-mail" not in body and "help@" not in body
    assert "pointflow support (your contract says how to reach it)" in body


def test_the_invoice_page_says_where_to_write_not_to_reply() -> None:
    page = document_html(document("billing@acme.example"))
    assert (
        "Reply within" not in page
        and "Questions about this invoice? Write to billing@acme.example within 7 days" in page
    )
