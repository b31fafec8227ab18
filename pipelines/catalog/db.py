"""Engine, migrations and transactional sessions for the catalog."""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from pipelines.errors import UserError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Bounds the IN (...) list, or the rows, of one statement: well under every database's parameter limit.
KEYS_PER_QUERY = 500

T = TypeVar("T")


def batches(values: Sequence[T], size: int = KEYS_PER_QUERY) -> Iterator[Sequence[T]]:
    """`values` in slices of at most `size`: the keys of one IN (...) list, or the rows of one insert."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def insert_ignoring_duplicates(session: Session, model: type, key: list[str] | None = None):
    """INSERT that skips rows whose `key` columns already exist, or (no key) that collide with
    any unique constraint (SQLite and PostgreSQL)."""
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(model).on_conflict_do_nothing(index_elements=key)


class CatalogError(UserError, RuntimeError):
    """A catalog operation was refused (unknown account, illegal state change, ...)."""


class UnknownAccountError(CatalogError):
    """No such account in the catalog; every layer that looks one up raises it (accounts, billing)."""

    def __init__(self, account_id: str) -> None:
        super().__init__(
            f"unknown account {account_id!r}: add it with 'pointflow accounts add' or 'pointflow accounts import'"
        )
        self.account_id = account_id


class CatalogUnavailable(CatalogError):
    """The catalog database cannot be reached or refused us; the message names where (host,
    port, database or SQLite file), never the user or password."""


def where(url: str) -> str:
    """The catalog's database as messages may name it: no user, no password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"


def shown_url(url: str) -> str:
    """A database URL as it may be printed for the operator to copy: the password masked (***)."""
    return make_url(url).render_as_string(hide_password=True)


# The driver names the user it connected as ('password authentication failed for user "postgres"',
# 'role "x" does not exist', 'no pg_hba.conf entry for host ..., user "x", ...').
_NAMED_USER = re.compile(r'\s+for user "[^"]*"|\b(user|role) "[^"]*"')


def _without_user(text: str) -> str:
    return _NAMED_USER.sub(lambda m: m.group(1) or "", text)


def database_failure(url: str, error: DBAPIError) -> CatalogUnavailable:
    """One line for a database error: the driver's first line, without SQL or parameters, and
    without the user name the driver puts in it."""
    cause = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else type(error.orig).__name__
    cause = _without_user(cause)
    return CatalogUnavailable(
        f"the catalog database at {where(url)} failed: {cause}. Check POINTFLOW_DATABASE_URL and that the database server is up"
    )


def normalise_url(url: str) -> str:
    """`postgresql://` means the psycopg2 driver we ship (SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets Dask workers and Airflow tasks read while one of them writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    backend = make_url(url).get_backend_name()
    if backend != "postgresql":
        raise CatalogError(
            f"POINTFLOW_DATABASE_URL: {backend} is not supported; the catalog runs on SQLite "
            "(sqlite:///PATH, the default) or PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
        )
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as error:
        raise CatalogError(
            f"postgresql needs the {error.name} driver: pip install 'pointflow[postgres]' (psycopg2-binary)"
        ) from error


def alembic_config(url: str) -> Config:
    # Alembic is imported when a catalog is migrated, not by every module that names the catalog
    # (it is most of `pointflow classify`'s import time, and classify never migrates).
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@cache
def head_revision() -> str:
    """The newest revision among this release's migrations, read from their file names
    (`NNNN_what.py`, revision "NNNN"; a test holds this to Alembic's own head). Alembic's script
    directory says the same but costs a tenth of a CPU second to load, paid by every Airflow task."""
    return max(path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))


class Catalog:
    """Owns the engine; every unit of work runs in `session()` and commits or rolls back whole."""

    def __init__(self, url: str) -> None:
        url = normalise_url(url)
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision. Processes that start together on a new catalog
        take turns, so only the first creates the tables; one that finds the newest revision in
        place takes no lock and runs no Alembic (every Airflow task opens the catalog)."""
        try:
            if self._revision() == head_revision():
                return
            with self.lock("migrate"), self.engine.begin() as connection:
                from alembic import command

                config = alembic_config(self.url)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except DBAPIError as error:
            raise database_failure(self.url, error) from None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the exclusive lock `name` while the block runs, against every process on every
        machine using this catalog: a PostgreSQL advisory lock, or a file lock beside an SQLite
        database. A process that dies drops its locks (its session ends, its file closes)."""
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                connection.commit()
                try:
                    yield
                finally:
                    try:
                        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                        connection.commit()
                    except DBAPIError:
                        pass  # the connection is gone, and its session's locks with it
            return
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            yield
            return
        folder = Path(database).with_name(Path(database).name + ".locks")
        folder.mkdir(exist_ok=True)
        with open(folder / f"{key & (2**64 - 1):016x}", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _revision(self) -> str | None:
        """The schema's revision now, or None before the first migration."""
        if not self.is_migrated():
            return None
        with self.engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def is_migrated(self) -> bool:
        return inspect(self.engine).has_table("alembic_version")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
