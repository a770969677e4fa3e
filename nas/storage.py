"""Opening the study's storage: SQLite by default, any SQLAlchemy URL (PostgreSQL for many workers).

The storage is opened first, before any fine-tuning or training, so that a missing
database driver, a server that does not answer or a wrong password costs a second
and one line, not half an hour of teacher training and then a traceback. Errors
name the URL without its password.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import optuna

from canao.errors import CanaoError
from canao.locks import file_lock

# How long to wait for a database server before saying it does not answer.
CONNECT_TIMEOUT_S = 10
# Workers sharing one SQLite file wait this long for its write lock instead of failing.
SQLITE_BUSY_TIMEOUT_S = 60

# Any fixed 64-bit number; the advisory lock that serialises schema creation on PostgreSQL.
SCHEMA_LOCK_KEY = 0x63616E616F  # "canao"

# The pip extra that installs a driver, by SQLAlchemy backend name.
DRIVER_EXTRAS = {"postgresql": "canao[postgres]"}


class StorageError(CanaoError):
    """A study storage URL that cannot be opened: bad URL, no driver, no server, no access."""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's storage, opened and its schema created; one clear StorageError otherwise."""
    url = normalize_url(url)
    shown = redact(url)
    _require_driver(url, shown)
    try:
        if url.startswith("sqlite:///"):
            return _open_sqlite(url)
        with _server_schema_lock(url):
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except CanaoError:
        raise
    except Exception as error:  # SQLAlchemy's OperationalError and friends, many drivers
        raise StorageError(f"cannot open study storage {shown}: {_first_line(error)}") from None


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg 3 when only it is installed."""
    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        if _installed("psycopg") and not _installed("psycopg2"):
            return f"postgresql+psycopg://{rest}"
        return f"postgresql://{rest}"
    return url


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _require_driver(url: str, shown: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except Exception as error:
        raise StorageError(
            f"study storage {shown!r} is not a database URL SQLAlchemy knows "
            f"(e.g. sqlite:///study.db, postgresql://user:pass@host/db): {_first_line(error)}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        backend = parsed.get_backend_name()
        extra = DRIVER_EXTRAS.get(backend)
        fix = f"pip install '{extra}'" if extra else f"install the {parsed.drivername} driver"
        raise StorageError(
            f"study storage {shown} needs a {backend} database driver that is not installed "
            f"({error}): {fix}"
        ) from None


def _open_sqlite(url: str) -> optuna.storages.RDBStorage:
    """Workers starting together on a new file race to create its schema, so a lock guards it."""
    database = Path(url.removeprefix("sqlite:///"))
    if database.name in ("", ":memory:"):
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    if not database.parent.is_dir():
        raise StorageError(f"study storage {url}: folder {database.parent} does not exist")
    with file_lock(database.with_name(database.name + ".lock")):
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))


@contextlib.contextmanager
def _server_schema_lock(url: str) -> Iterator[None]:
    """PostgreSQL: workers creating the schema together collide (duplicate pg_type rows).

    A session advisory lock, held while Optuna creates or upgrades its tables, serialises
    them; the lock is the database's, so it holds across machines. Other servers: no lock.
    """
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    try:
        with engine.connect() as connection:
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY}
            )
            try:
                yield
            finally:
                connection.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY}
                )
    finally:
        engine.dispose()


def _engine_kwargs(url: str) -> dict[str, object]:
    # Each driver names its wait differently; an unknown key would fail the connection.
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _first_line(error: BaseException) -> str:
    """Drivers' messages run to several lines and SQL; the first names the problem."""
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__
