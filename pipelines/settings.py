"""One settings object, read from ``POINTFLOW_*`` environment variables and passed down."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.addresses import InvalidAddress, check_mailbox
from pipelines.errors import UserError

# Airflow's api-server on its default port: where the pointflow plugin serves download links.
DEFAULT_PUBLIC_URL = "http://localhost:8080"


class SettingsError(UserError, ValueError):
    """A setting has a value we cannot use; the message names the variable."""


class ClusterStartError(UserError, RuntimeError):
    """The Dask cluster these settings name (a local one of POINTFLOW_WORKERS, or POINTFLOW_DASK_ADDRESS's)
    did not bring up the workers asked for in time."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={env.get(name)!r} is neither on (1, true, yes, on) nor off (0, false, no, off)")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= 0:
        raise SettingsError(f"{name} must not be negative, got {value}")
    return value


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw).expanduser() if raw else None


def _paths(env: Mapping[str, str], name: str) -> tuple[Path, ...]:
    raw = env.get(name) or ""
    paths = tuple(Path(part).expanduser() for part in raw.split(os.pathsep) if part)
    relative = [str(p) for p in paths if not p.is_absolute()]
    if relative:
        raise SettingsError(
            f"{name} must list absolute folders separated by '{os.pathsep}'; {', '.join(relative)} is relative"
        )
    return tuple(p.resolve() for p in paths)


def url_problem(url: str) -> str | None:
    """What makes `url` ambiguous to parse, without quoting it (it may hold a password)."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return "contains spaces or control characters"
    scheme, separator, rest = url.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "is not a URL (scheme://...)"
    if scheme.lower().startswith("sqlite"):
        return None
    authority = re.match(r"[^/?#]*", rest).group(0)
    if authority.count("@") > 1 or "@" in rest[len(authority) :]:
        return "has a '/', '?', '#' or '@' in its user name or password: percent-encode them (%2F %3F %23 %40)"
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port == -1 or not urlsplit(url).hostname:
        return "has no host, or a port that is not a number (percent-encode ':' in a password as %3A)"
    return None


def _url(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    raw = env.get(name) or default
    problem = None if raw is None else url_problem(raw)
    if problem:
        raise SettingsError(f"{name} {problem}")
    return raw


def _smtp_url(env: Mapping[str, str], name: str) -> str | None:
    raw = _url(env, name)
    if raw is None:
        return None
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme not in ("smtp", "smtps"):
        given = f"{scheme}://" if scheme else "no scheme"
        raise SettingsError(
            f"{name} must be smtp://[user:password@]host[:port] (?starttls=1 to upgrade) or smtps://..., "
            f"not {given}; leave it unset to write e-mail to $POINTFLOW_HOME/outbox"
        )
    return raw


def _mailbox(env: Mapping[str, str], name: str, default: str) -> str:
    try:
        return check_mailbox(env.get(name) or default)
    except InvalidAddress as error:
        raise SettingsError(f"{name}: {error}") from None


def _optional_mailbox(env: Mapping[str, str], name: str) -> str | None:
    return _mailbox(env, name, "") if env.get(name) else None


def _endpoint(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name) or None
    if raw is not None and not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name}={raw!r} is not an address: use http(s)://host[:port]")
    return raw


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    storage_url: str
    dask_address: str | None
    smtp_url: str | None
    mail_from: str
    tile_size: float
    tile_buffer: float
    workers: int
    max_file_bytes: int
    max_points: int
    pricebook_path: Path | None
    model_key: str | None
    link_endpoint: str | None = None
    lifecycle_policy_path: Path | None = None
    # Local folders (or single files) that job and training sources may be read from.
    input_dirs: tuple[Path, ...] = ()
    stale_job_hours: int = 24
    # An unfinished S3 multipart upload initiated longer ago than this is aborted by the nightly
    # sweep: S3 cannot tell a live writer from a killed one, so it must outlast the longest upload.
    stale_upload_hours: int = 24
    # Customers' download links: where they reach the api-server, and the key that signs them.
    public_url: str = DEFAULT_PUBLIC_URL
    link_secret: str | None = None
    # Dask's dashboard on the local cluster (its link logged by each run).
    dashboard: bool = False
    # Labelled points one training run reads: all of them are in memory at once, with their features.
    max_training_points: int = 5_000_000
    # Where customers' replies go (Reply-To:, and the address the e-mails name); None: the price
    # book seller's e-mail, if any (notify.reply_address).
    reply_to: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("POINTFLOW_HOME") or Path.home() / ".pointflow").expanduser().resolve()
        return cls(
            home=home,
            database_url=_url(env, "POINTFLOW_DATABASE_URL", f"sqlite:///{home / 'catalog.db'}"),
            storage_url=env.get("POINTFLOW_STORAGE_URL") or (home / "objects").as_uri(),
            dask_address=env.get("POINTFLOW_DASK_ADDRESS") or None,
            smtp_url=_smtp_url(env, "POINTFLOW_SMTP_URL"),
            mail_from=_mailbox(env, "POINTFLOW_MAIL_FROM", "pointflow <noreply@pointflow.invalid>"),
            tile_size=_float(env, "POINTFLOW_TILE_SIZE", 200.0),
            tile_buffer=_float(env, "POINTFLOW_TILE_BUFFER", 20.0),
            workers=_int(env, "POINTFLOW_WORKERS", os.cpu_count() or 1),
            max_file_bytes=_int(env, "POINTFLOW_MAX_FILE_BYTES", 4 * 1024**3),
            max_points=_int(env, "POINTFLOW_MAX_POINTS", 1_000_000_000),
            pricebook_path=_path(env, "POINTFLOW_PRICEBOOK"),
            model_key=env.get("POINTFLOW_MODEL_KEY") or None,
            link_endpoint=_endpoint(env, "POINTFLOW_LINK_ENDPOINT"),
            lifecycle_policy_path=_path(env, "POINTFLOW_LIFECYCLE_POLICY"),
            input_dirs=_paths(env, "POINTFLOW_INPUT_DIRS"),
            stale_job_hours=_int(env, "POINTFLOW_STALE_JOB_HOURS", 24),
            stale_upload_hours=_int(env, "POINTFLOW_STALE_UPLOAD_HOURS", 24),
            public_url=_endpoint(env, "POINTFLOW_PUBLIC_URL") or DEFAULT_PUBLIC_URL,
            link_secret=env.get("POINTFLOW_LINK_SECRET") or None,
            dashboard=_flag(env, "POINTFLOW_DASHBOARD"),
            max_training_points=_int(env, "POINTFLOW_MAX_TRAINING_POINTS", 5_000_000),
            reply_to=_optional_mailbox(env, "POINTFLOW_REPLY_TO"),
        )

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def scratch_dir(self) -> Path:
        """Local working copies of objects; safe to delete at any time."""
        return self.home / "scratch"

    def allowing(self, *paths: Path) -> Settings:
        """These settings, with `paths` (the files a command was given by name) allowed as sources."""
        return replace(self, input_dirs=self.input_dirs + tuple(Path(p).expanduser().resolve() for p in paths))
