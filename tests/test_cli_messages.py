"""The command line's errors and warnings: one line that says what to do, no traceback."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from pipelines.catalog.models import Account
from pipelines.cli import main
from pipelines.runtime import open_catalog
from pipelines.settings import Settings
from tests.test_cli import CSV, pointflow

LATIN1_ACCOUNTS = CSV.replace("Acme", "Zéro GmbH").encode("latin-1")


@pytest.mark.parametrize(
    "command",
    [("accounts", "import"), ("payments", "import"), ("outages", "import"), ("usage", "import")],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("content", [LATIN1_ACCOUNTS, bytes(range(256)) * 8], ids=["latin-1", "binary"])
def test_an_import_of_a_file_not_in_utf8_says_where_and_to_save_it_as_utf8(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: tuple[str, str], content: bytes
) -> None:
    source = tmp_path / "export.csv"
    source.write_bytes(content)
    assert main([*command, str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pointflow: error: "), err
    assert str(source) in err and "UTF-8" in err and "nothing imported" in err, err
    expected = "line 2, byte 87 (0xe9)" if content == LATIN1_ACCOUNTS else "line 2, byte 129 (0x80)"
    assert expected in err, err
    with open_catalog(Settings.from_env()).session() as session:
        assert session.get(Account, "acme") is None


def test_an_accounts_import_in_latin1_as_a_user_runs_it(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "excel.csv"
    source.write_bytes(LATIN1_ACCOUNTS)
    result = pointflow("accounts", "import", str(source), home=home)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Save the file as UTF-8" in result.stderr


def test_a_usage_file_with_a_byte_order_mark_is_read(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(CSV)
    assert main(["accounts", "import", str(accounts)]) == 0
    usage = tmp_path / "usage.jsonl"
    usage.write_text(
        '{"event_id": "e1", "account_id": "acme", "occurred_at": "2026-01-01T00:00:00Z", "kind": "login"}\n',
        encoding="utf-8-sig",
    )
    assert main(["usage", "import", str(usage)]) == 0, capsys.readouterr().err


def test_billing_run_with_a_price_book_without_seller_warns_before_issuing(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(CSV.replace(",free,", ",professional,"))
    assert main(["accounts", "import", str(accounts)]) == 0
    capsys.readouterr()
    assert main(["billing", "run", "--period", "2026-09"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("pointflow: warning: ")]
    assert len(warning) == 1, captured.err
    assert (
        "shipped default price book" in warning[0]
        and "seller:" in warning[0]
        and "not valid VAT invoices" in warning[0]
    )
    assert "PF-2026-09-0001" in captured.out


def test_demo_with_an_unknown_classifier_fails_at_once_in_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import pointflow_dev.demo

    def no_run(*args, **kwargs):
        raise AssertionError("the demo started its DAG run")

    monkeypatch.setattr(pointflow_dev.demo, "run_demo", no_run)
    assert main(["demo", "--classifier", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err == "pointflow: error: unknown classifier 'bogus'; choose one of standard, ground\n", err


def test_invoices_show_help_says_it_gives_the_documents_as_issued(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["invoices", "show", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "as issued" in out and "rendered now" not in out, out


def test_an_unsupported_database_is_named_with_the_ones_supported(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("POINTFLOW_DATABASE_URL", "mysql://x/y")
    assert main(["files", "list", "--account", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointflow: error: ") and err.count("\n") == 1, err
    assert "mysql is not supported" in err and "SQLite" in err and "PostgreSQL" in err, err
    assert "pointflow[postgres]" not in err, err


@pytest.mark.parametrize("url", ["http://mail", "https://user:secret@mail.example.com"])
def test_an_smtp_url_that_is_not_smtp_is_refused_when_settings_are_read(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, url: str
) -> None:
    monkeypatch.setenv("POINTFLOW_SMTP_URL", url)
    assert main(["files", "list", "--account", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointflow: error: POINTFLOW_SMTP_URL must be smtp://") and err.count("\n") == 1, err
    assert "secret" not in err


def test_an_smtps_url_is_accepted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTFLOW_SMTP_URL", "smtps://user:secret@mail.example.com")
    assert Settings.from_env().smtp_url == "smtps://user:secret@mail.example.com"


def test_ingest_of_an_s3_url_says_how_to_get_an_s3_object_in(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ingest", "s3://some-bucket/x.laz", "--account", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3://some-bucket/x.laz" in err and "s3:/some-bucket" not in err, err
    assert "takes a local" in err and "pointflow_classify" in err and "drop zone" in err, err


def test_s3_without_credentials_says_what_to_set(
    home: Path, tmp_path: Path, scene_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(CSV)
    assert main(["accounts", "import", str(accounts)]) == 0
    capsys.readouterr()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    # boto3's default session keeps the credentials an earlier test's S3 endpoint resolved.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("POINTFLOW_STORAGE_URL", "s3://pointflow-no-such-bucket-for-tests/x")
    assert main(["ingest", str(scene_path), "--account", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unable to locate credentials" in err, err
    assert "AWS_ACCESS_KEY_ID" in err and "AWS_PROFILE" in err and "role" in err, err


def test_top_level_help_names_each_groups_actions_and_options_explain_themselves(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    for action in ("build-shared", "hold", "terminate", "export-all", "delete"):
        assert action in top, action
    for command, option in [
        (["accounts", "add"], "--email EMAIL"),
        (["files", "list"], "--account ID"),
        (["models", "list"], "--account ID"),
        (["invoices", "dispute"], "--reason REASON"),
    ]:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        line = next(line for line in lines if line.strip().startswith(option))
        assert len(line.split(maxsplit=len(option.split()))) > len(option.split()) or lines[
            lines.index(line) + 1
        ].startswith(" " * 20), (command, line)
