"""Settings an operator can get subtly wrong, and errors that must not leak them: URLs whose
passwords hold URL delimiters, a sender with a line break, an unreachable catalog."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url

from pipelines.notify import send_email
from pipelines.settings import Settings, SettingsError
from pointflow_dev.stack_plan import free_port

# Letter pairs that appear nowhere else in the messages: a leak of any part of the password shows.
PASSWORD_PARTS = ("Zq", "Wk", "Vp", "Jm", "Xb")
PASSWORD = "Zq/Wk#Vp?Jm@Xb:Yc"


def leaked(text: str) -> list[str]:
    return [part for part in PASSWORD_PARTS if part in text]


@pytest.mark.parametrize(
    "variable,template",
    [
        ("POINTFLOW_SMTP_URL", "smtp://mailer:{}@mail.example:587"),
        ("POINTFLOW_DATABASE_URL", "postgresql://pointflow:{}@db.example:5432/catalog"),
    ],
)
@pytest.mark.parametrize("delimiter", ["/", "#", "?", "@"])
def test_an_unencoded_delimiter_in_a_password_is_refused_without_quoting_it(
    home: Path, variable: str, template: str, delimiter: str
) -> None:
    url = template.format(f"Zq{delimiter}Wk")
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({**os.environ, variable: url})
    message = str(refused.value)
    assert message.startswith(variable) and "percent-encode" in message and leaked(message) == []


def test_the_command_says_so_in_one_line(home: Path) -> None:
    env = {**os.environ, "POINTFLOW_SMTP_URL": f"smtp://mailer:{PASSWORD}@mail.example:587"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("pointflow")), "files", "list", "--account", "acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "POINTFLOW_SMTP_URL" in run.stderr
    assert leaked(run.stdout + run.stderr) == []


def test_percent_encoded_passwords_reach_the_servers_decoded(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from tests.conftest import SmtpSink

    def authenticate(server, session, envelope, mechanism, data) -> AuthResult:
        return AuthResult(
            success=isinstance(data, LoginPassword) and data.login == b"mailer" and data.password == PASSWORD.encode()
        )

    sink = SmtpSink()
    sink.controller = Controller(
        sink, hostname="127.0.0.1", port=sink.port, authenticator=authenticate, auth_require_tls=False
    )
    sink.controller.start()
    try:
        settings = Settings.from_env(
            {**os.environ, "POINTFLOW_SMTP_URL": f"smtp://mailer:{quote(PASSWORD, safe='')}@127.0.0.1:{sink.port}"}
        )
        send_email(settings, "ops@acme.example", "subject", "body", reply_to=None)
    finally:
        sink.controller.stop()
    assert len(sink.messages) == 1
    database = Settings.from_env(
        {
            **os.environ,
            "POINTFLOW_DATABASE_URL": f"postgresql://pointflow:{quote(PASSWORD, safe='')}@db.example:5432/catalog",
        }
    ).database_url
    assert make_url(database).password == PASSWORD and make_url(database).host == "db.example"


def test_a_sender_with_a_line_break_is_refused(home: Path) -> None:
    with pytest.raises(SettingsError, match="POINTFLOW_MAIL_FROM"):
        Settings.from_env(
            {**os.environ, "POINTFLOW_MAIL_FROM": "pointflow <noreply@pointflow.invalid>\nBcc: everyone@victim.example"}
        )
    assert (
        Settings.from_env({**os.environ, "POINTFLOW_MAIL_FROM": "Acme LiDAR <lidar@acme.example>"}).mail_from
        == "Acme LiDAR <lidar@acme.example>"
    )


def test_an_unreachable_catalog_is_one_line_without_the_password(home: Path) -> None:
    url = f"postgresql://pointflow:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/catalog"
    env = {**os.environ, "POINTFLOW_DATABASE_URL": url}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("pointflow")), "files", "list", "--account", "acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert (
        line.startswith("pointflow: error: the catalog database at 127.0.0.1:")
        and "/catalog failed" in line
        and "POINTFLOW_DATABASE_URL" in line
    )
    assert leaked(run.stdout + run.stderr) == [] and quote(PASSWORD, safe="") not in run.stderr


@pytest.mark.parametrize(("raw", "on"), [("", False), ("0", False), ("off", False), ("1", True), ("Yes", True)])
def test_the_dashboard_is_off_unless_asked_for(raw: str, on: bool) -> None:
    assert Settings.from_env({"POINTFLOW_DASHBOARD": raw}).dashboard is on


def test_a_dashboard_setting_that_is_neither_on_nor_off_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"POINTFLOW_DASHBOARD='maybe' is neither on"):
        Settings.from_env({"POINTFLOW_DASHBOARD": "maybe"})
