"""The billing commands end to end through `pipelines.cli.main`, with exact output.

The scenario in tests/data/billing, checked by hand:
September (invoiced 2026-10-01, due 2026-10-31)
  acme  professional from Sep 15: 99 x 16/30 = 52.80, tax 19 % 10.03 -> 62.83
  geo   sharing, tax exempt: 99.00 - 20 % 19.80 = 79.20, no tax -> 79.20
  lidar api: 120,000,000 succeeded + 3,456,789 aborted (the failed 50 M not billed; the Oct 1
        00:00 job not in September) = 123.456789 M x 0.50 = 61.73, tax 20 % 12.35 -> 74.08
  hobby free: nothing to charge, no invoice
October (invoiced 2026-11-01): 6 h unscheduled outage (maintenance announced 5 days ahead does
not count): availability 99.194 %, 0.3065 % short of 99.5 %
  acme  99.00, availability credit 0.30, tax 18.75 -> 117.45 (September paid on time)
  geo   99.00 - 19.80, credit 0.24 on 79.20, September unpaid: late fee 1.5 % of 79.20 = 1.19 -> 80.15
  lidar 10 M x 0.50 = 5.00, tax 1.00; paid 100.00 for 74.08: 25.92 credit, 6.00 used -> 0.00
"""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.notify import outbox_messages
from pipelines.settings import Settings
from tests.test_billing_support import bill_on_time, catalog, cli_env, database_url, postgres_schema_url

__all__ = ["catalog", "cli_env", "database_url", "postgres_schema_url"]  # fixtures used here

DATA = Path(__file__).parent / "data" / "billing"


@pytest.fixture(autouse=True)
def punctual_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`billing run` dates its invoices the day it runs: here the 1st after the month, as above."""
    bill_on_time(monkeypatch)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def expected(name: str):
    return json.loads((DATA / name).read_text())


def test_month_by_month_from_the_files(cli_env, capsys):
    assert cli(capsys, "accounts", "import", str(DATA / "accounts.csv")) == "accounts: 4 created, 0 updated\n"
    assert cli(capsys, "usage", "import", str(DATA / "usage.jsonl")) == "usage events: 6 new, 0 already known\n"
    assert cli(capsys, "usage", "import", str(DATA / "usage.jsonl")) == "usage events: 0 new, 6 already known\n"

    september = json.loads(cli(capsys, "billing", "run", "--period", "2026-09", "--json"))
    assert september == expected("expected-2026-09.json")
    assert september[0]["lines"][0] == {
        "kind": "subscription",
        "description": "Professional plan, 2026-09, 16 of 30 days from 2026-09-15",
        "quantity": "16",
        "unit_price": "99.00",
        "amount": "52.80",
        "taxable": True,
        "base_quantity": "30",  # 16 days of 99.00 per 30 days: 16 x 99.00 / 30 = 52.80
    }
    assert [(i["invoice_number"], i["subtotal"], i["tax"], i["total"]) for i in september] == [
        ("PF-2026-09-0001", "52.80", "10.03", "62.83"),
        ("PF-2026-09-0002", "79.20", "0.00", "79.20"),
        ("PF-2026-09-0003", "61.73", "12.35", "74.08"),
    ]

    assert cli(capsys, "payments", "import", str(DATA / "payments.csv")) == "payments: 2 new, 0 already known\n"
    assert cli(capsys, "payments", "import", str(DATA / "payments.csv")) == "payments: 0 new, 2 already known\n"
    assert cli(capsys, "outages", "import", str(DATA / "outages.csv")) == "outages: 2 new, 0 already known\n"
    assert cli(capsys, "outages", "import", str(DATA / "outages.csv")) == "outages: 0 new, 2 already known\n"

    october = json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json"))
    assert october == expected("expected-2026-10.json")
    assert [(i["account_id"], i["total"]) for i in october] == [("acme", "117.45"), ("geo", "80.15"), ("lidar", "0.00")]
    assert {line["kind"]: line["amount"] for line in october[1]["lines"]} == {
        "subscription": "99.00",
        "discount": "-19.80",
        "availability_credit": "-0.24",
        "late_fee": "1.19",
    }

    # A re-run prints the same invoices and says it created nothing.
    assert json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json")) == october
    assert cli(capsys, "billing", "run", "--period", "2026-10") == (
        "PF-2026-10-0001  acme  EUR 117.45\nPF-2026-10-0002  geo  EUR 80.15\nPF-2026-10-0003  lidar  EUR 0.00\n"
        "2026-10: 3 invoice(s), already invoiced, nothing created\n"
    )


def test_credit_dispute_show_and_list(cli_env, capsys):
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    cli(capsys, "billing", "run", "--period", "2026-09")
    note = json.loads(
        cli(
            capsys,
            "invoices",
            "credit",
            "PF-2026-09-0001",
            "--amount",
            "2.80",
            "--reason",
            "onboarding days",
            "--issued-on",
            "2026-10-03",
            "--json",
        )
    )
    assert note == {
        "credit_note_number": "PF-CN-2026-10-0001",
        "invoice_number": "PF-2026-09-0001",
        "account_id": "acme",
        "issued_on": "2026-10-03",
        "amount": "2.80",
        "tax": "0.53",
        "total": "3.33",
        "reason": "onboarding days",
        "created": True,
    }
    again = cli(
        capsys,
        "invoices",
        "credit",
        "PF-2026-09-0001",
        "--amount",
        "2.80",
        "--reason",
        "onboarding days",
        "--issued-on",
        "2026-10-03",
    )
    assert again == "credit note PF-CN-2026-10-0001 already issued for invoice PF-2026-09-0001: 3.33 incl. tax\n"
    # The customer receives the credit note, once: issuing it again sends nothing more.
    [mail] = [
        message
        for message in (
            email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            for path in outbox_messages(Settings.from_env())
        )
        if "PF-CN-2026-10-0001" in message["Subject"]
    ]
    body = " ".join(mail.get_body(("plain",)).get_content().split())
    assert mail["To"] == "billing@acme.example" and mail["Subject"].startswith("Credit note PF-CN-2026-10-0001")
    assert "corrects invoice PF-2026-09-0001" in body and "3.33" in body and "Please pay" not in body
    assert "Credit note: file://" in body
    # No seller in the default price book, so no e-invoice: the page itself is attached.
    assert [part.get_filename() for part in mail.iter_attachments()] == ["PF-CN-2026-10-0001.html"]

    shown = json.loads(cli(capsys, "invoices", "show", "PF-2026-09-0001"))
    assert (shown["total"], shown["paid"], shown["open_amount"]) == ("62.83", "0.00", "59.50")
    assert [n["credit_note_number"] for n in shown["credit_notes"]] == ["PF-CN-2026-10-0001"]

    assert main(["invoices", "dispute", "PF-2026-09-0002", "--reason", "seats", "--at", "2026-10-09T00:00:00Z"]) == 2
    assert "disputes were accepted until 2026-10-08" in capsys.readouterr().err
    assert cli(
        capsys,
        "invoices",
        "dispute",
        "PF-2026-09-0002",
        "--reason",
        "wrong discount",
        "--billing-error",
        "--at",
        "2026-11-20T00:00:00Z",
    ) == ("dispute of PF-2026-09-0002 recorded (window until 2026-11-30)\n")

    csv_text = cli(capsys, "invoices", "show", "PF-2026-09-0003", "--format", "csv")
    assert csv_text.splitlines() == [
        "invoice_number,kind,description,quantity,unit_price,amount,taxable,base_quantity",
        'PF-2026-09-0003,usage,"Classification, 123,456,789 points, 2026-09-01 to 2026-09-30, per million points",123.456789,0.50,61.73,True,1',
    ]
    html = cli(capsys, "invoices", "show", "PF-2026-09-0003", "--format", "html")
    assert "Lidar API SAS" in html and "<td class=n>74.08</td>" in html and "within 7 days" in html

    assert (
        cli(capsys, "invoices", "list", "--account", "geo")
        == "PF-2026-09-0002  geo  2026-09  EUR 79.20\n1 invoice(s)\n"
    )


def test_terms_and_points(cli_env, capsys):
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    terms = json.loads(cli(capsys, "billing", "terms", "acme", "--seats", "4", "--extra-storage-gb", "10"))
    assert (terms["seats"], terms["extra_storage_gb"], terms["ended_on"]) == (4, 10, None)
    points = json.loads(cli(capsys, "usage", "points", "lidar", "--month", "2026-09"))
    assert points == {
        "account_id": "lidar",
        "month": "2026-09",
        "points_used": 123_456_789,
        "monthly_points_cap": 500_000_000,
    }
    october = json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json"))
    assert {line["kind"]: line["amount"] for line in october[0]["lines"]} == {
        "subscription": "99.00",
        "seats": "40.00",
        "extra_storage": "490.00",
    }


def test_pricebook_option_and_setting(cli_env, capsys, tmp_path, monkeypatch):
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    book = tmp_path / "book.yaml"
    book.write_text(
        'currency: CHF\ninvoice_prefix: ZZ\npayment_terms_days: 10\nlate_fee_monthly_rate: "0.01"\n'
        'plans:\n  professional: {monthly_fee: "30.00"}\n  professional_sharing: {monthly_fee: "30.00"}\n'
        '  api: {price_per_million_points: "1.00"}\n  free: {}\n'
    )
    monkeypatch.setenv("POINTFLOW_PRICEBOOK", str(book))
    invoices = json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json"))
    assert [(i["invoice_number"], i["currency"], i["due_date"], i["total"]) for i in invoices] == [
        ("ZZ-2026-10-0001", "CHF", "2026-11-11", "35.70"),
        ("ZZ-2026-10-0002", "CHF", "2026-11-11", "30.00"),
    ]
    assert main(["billing", "run", "--period", "2026-11", "--pricebook", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_bad_input_is_one_clear_line_and_writes_nothing(cli_env, capsys, tmp_path):
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"event_id": "ok", "account_id": "lidar", "occurred_at": "2026-10-01T00:00:00Z", "kind": "classification", "points": 5, "status": "succeeded"}\n'
        '{"event_id": "x", "account_id": "lidar", "occurred_at": "2026-10-01T00:00:00Z", "kind": "classification", "points": 1.5, "status": "succeeded"}\n'
        "not json\n"
    )
    assert main(["usage", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("pointflow: error: ")
        and "line 2: points 1.5 is not a whole number" in err
        and "line 3: not JSON" in err
    )
    assert json.loads(cli(capsys, "usage", "points", "lidar", "--month", "2026-10"))["points_used"] == 0
    with pytest.raises(SystemExit):
        main(["billing", "run", "--period", "2026-13"])
    assert "YYYY-MM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["usage", "import"], ["payments", "import"], ["outages", "import"], ["invoices", "credit"], ["billing", "run"]],
)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_output_cut_short_by_its_reader_is_no_error(cli_env, capsys):
    """`pointflow billing run --json | head`: the reader leaving is its choice; no traceback."""
    import subprocess
    import sys

    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    command = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]
    for args in (["billing", "run", "--period", "2026-09", "--json"], ["invoices", "list"]):
        child = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stdout.close()  # the reader is gone before the first line is written
        # Nothing but the warning of `billing run` that the shipped price book has no seller.
        stderr = [line for line in child.stderr.read().splitlines() if b"has no seller: block" not in line]
        child.stderr.close()
        assert (child.wait(timeout=120), stderr) == (141, [])  # 128 + SIGPIPE, as the shell reports a reader gone
    assert cli(capsys, "invoices", "list", "--period", "2026-09").endswith("3 invoice(s)\n")  # the run itself completed


def test_a_command_error_is_one_line(capsys):
    import argparse

    from pipelines.cli import CommandError
    from pipelines.cli.common import run_handler

    def handler(_args):
        raise CommandError("what went wrong, and what to do")

    assert run_handler(argparse.Namespace(handler=handler)) == 2
    assert capsys.readouterr().err == "pointflow: error: what went wrong, and what to do\n"


def add_late_accounts_and_usage(capsys, tmp_path: Path) -> None:
    """Accounts imported after September's run with a start in September, and September usage
    imported after that run: newapi's (no September invoice) and lidar's (invoiced for September)."""
    for account_id, plan, started in (("newco", "professional", "2026-09-10"), ("newapi", "api", "2026-09-05")):
        cli(capsys, "accounts", "add", account_id, "--name", account_id, "--email", f"ap@{account_id}.example",
            "--country", "DE", "--plan", plan, "--started-at", started, "--tax-rate", "0.19")  # fmt: skip
    late = tmp_path / "late.jsonl"
    events = [
        ("late-1", "newapi", "2026-09-20T10:00:00Z", 40_000_000),
        ("late-2", "lidar", "2026-09-21T10:00:00Z", 20_000_000),
    ]
    late.write_text(
        "".join(
            json.dumps(
                {"event_id": event_id, "account_id": account_id, "occurred_at": when, "kind": "classification",
                 "points": points, "status": "succeeded", "classifier": "grid", "filename": "x.laz"}
            ) + "\n"
            for event_id, account_id, when, points in events
        )
    )  # fmt: skip
    assert "2026-09 already invoiced" in cli(capsys, "usage", "import", str(late))


def test_accounts_and_usage_imported_after_a_months_run_are_invoiced_once(cli_env, capsys, tmp_path):
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    september = cli(capsys, "billing", "run", "--period", "2026-09")
    add_late_accounts_and_usage(capsys, tmp_path)
    # Re-running September invoices the two accounts its run did not cover, and only them.
    assert cli(capsys, "billing", "run", "--period", "2026-09") == september.replace(
        "2026-09: 3 invoice(s), created\n",
        "PF-2026-09-0004  newapi  EUR 23.80\n"  # 40 M points x 0.50 + 19 %
        "PF-2026-09-0005  newco  EUR 82.47\n"  # 99.00 x 21/30 = 69.30 + 19 %
        "2026-09: 5 invoice(s), 2 created for accounts not invoiced before\n",
    )
    assert cli(capsys, "billing", "run", "--period", "2026-09").endswith(
        "2026-09: 5 invoice(s), already invoiced, nothing created\n"
    )
    # October bills lidar's late September usage (20 M x 0.50) once, and nothing of September again.
    october = {i["account_id"]: i for i in json.loads(cli(capsys, "billing", "run", "--period", "2026-10", "--json"))}
    late = [(line["kind"], line["amount"]) for line in october["lidar"]["lines"] if "usage" in line["kind"]]
    assert late == [("usage", "5.00"), ("late_usage", "10.00")]
    assert [line["kind"] for line in october["newco"]["lines"] if line["kind"] != "late_fee"] == ["subscription"]
    assert not [line for line in october["newapi"]["lines"] if "usage" in line["kind"]]
    november = json.loads(cli(capsys, "billing", "run", "--period", "2026-11", "--json"))
    assert not [line for i in november for line in i["lines"] if "usage" in line["kind"]]


def test_as_of_runs_a_month_as_on_that_day(cli_env, capsys, tmp_path, monkeypatch):
    from pipelines.billing import invoicing

    monkeypatch.setattr("pipelines.cli.billing.run_billing", invoicing.run_billing)  # the command's own dating
    cli(capsys, "accounts", "import", str(DATA / "accounts.csv"))
    cli(capsys, "usage", "import", str(DATA / "usage.jsonl"))
    september = json.loads(cli(capsys, "billing", "run", "--period", "2026-09", "--as-of", "2026-10-01", "--json"))
    assert september == expected("expected-2026-09.json")  # dated 2026-10-01, due 2026-10-31
    add_late_accounts_and_usage(capsys, tmp_path)
    again = json.loads(cli(capsys, "billing", "run", "--period", "2026-09", "--as-of", "2026-10-20T09:00Z", "--json"))
    assert [(i["invoice_number"], i["issue_date"], i["due_date"]) for i in again[3:]] == [
        ("PF-2026-09-0004", "2026-10-20", "2026-11-19"),
        ("PF-2026-09-0005", "2026-10-20", "2026-11-19"),
    ]
    for as_of, message in (
        ("2026-09-30T23:59Z", "period 2026-10 has not ended yet"),
        ("2999-01-01", "is in the future"),
    ):
        assert main(["billing", "run", "--period", "2026-10", "--as-of", as_of]) == 2
        assert message in capsys.readouterr().err
    # Invoices numbered after those issued on 2026-10-20 cannot be dated before them.
    assert main(["billing", "run", "--period", "2026-09", "--as-of", "2026-10-05"]) == 2
    assert "--as-of 2026-10-05 is before 2026-10-20, the day of the latest invoice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["billing", "run", "--period", "2026-10", "--as-of", "someday"])
    assert "'someday' is not an ISO date-time" in capsys.readouterr().err
