"""Engines and sessions for the tracking database (PostgreSQL in production, SQLite embedded).

Connection failures, at connect time or later, surface as one ``ServiceUnavailableError`` naming
``LYNX_DATABASE_URL`` and the URL without its password, within ``LYNX_DATABASE_CONNECT_TIMEOUT``.
A server that answers but refuses us for good (no such database, login refused) is a
``ConfigurationError`` instead: retrying would not help.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from lynx.errors import ConfigurationError, ServiceUnavailableError
from lynx.settings import LynxSettings, is_secret_query_key

log = logging.getLogger(__name__)

SETTING = "LYNX_DATABASE_URL"


def make_engine(settings: LynxSettings) -> Engine:
    """An engine for ``settings``' database; nothing is contacted until first use."""
    raw_url = settings.resolved_database_url
    shown = settings.database_url_for_display if _parses(raw_url) else "<unparseable URL>"
    try:
        url = make_url(raw_url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise ConfigurationError(
            f"LYNX_DATABASE_URL is not a database URL: {shown}", setting=SETTING
        ) from None

    connect_args: dict[str, Any] = {}
    options: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            folder = Path(url.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                message = f"cannot create the folder of the SQLite database {folder}: {err.strerror}"
                raise ConfigurationError(message, setting=SETTING) from None
        connect_args["timeout"] = settings.database_busy_timeout
    elif url.get_backend_name() == "postgresql":
        if url.drivername != "postgresql+psycopg":
            raise ConfigurationError(
                f"use a postgresql+psycopg:// URL (psycopg 3), got {url.drivername}://", setting=SETTING
            )
        connect_args["connect_timeout"] = settings.database_connect_timeout
        connect_args["application_name"] = "lynx"
        # Secrets in the query string go to the driver directly, so the engine's URL (its repr,
        # SQLAlchemy's and Alembic's logs) holds none of them.
        secrets = {k: v for k, v in url.query.items() if is_secret_query_key(k) and isinstance(v, str)}
        url = url.difference_update_query(secrets)
        connect_args.update(secrets)
    try:
        engine = create_engine(url, connect_args=connect_args, **options)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as err:
        # ImportError: a dialect whose driver is not installed (e.g. mysql:// without MySQLdb)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigurationError(f"cannot use database URL {shown}: {reason}", setting=SETTING) from None

    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(settings.database_busy_timeout))
    event.listen(engine, "handle_error", _unavailable_error(shown))
    log.debug("tracking database: %s", shown)
    return engine


def session_factory(settings_or_engine: LynxSettings | Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (tasks hand them around)."""
    engine = settings_or_engine if isinstance(settings_or_engine, Engine) else make_engine(settings_or_engine)
    return sessionmaker(engine, expire_on_commit=False)


def _parses(raw_url: str) -> bool:
    try:
        make_url(raw_url)
    except (ArgumentError, ValueError):
        return False
    return True


def _sqlite_pragmas(busy_timeout_s: float):
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL: readers do not block the writer; foreign keys are off by default in SQLite.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    return on_connect


def _unavailable_error(shown_url: str):
    def on_error(context: ExceptionContext) -> None:
        if context.is_pre_ping:
            return  # the pool noticed a dead pooled connection and will open a fresh one
        # No connection yet (connect failed) or the server went away: not our bug, say what to check.
        if context.connection is None or context.is_disconnect:
            reason = _first_line(context.original_exception)
            if context.connection is None and _refused_by_configuration(context.original_exception):
                # A missing database or refused login will not heal by retrying: fix the URL.
                raise ConfigurationError(
                    f"the tracking database at {shown_url} refused the connection: {reason}", setting=SETTING
                ) from None
            raise ServiceUnavailableError(
                f"cannot reach the tracking database at {shown_url}: {reason}", setting=SETTING
            ) from None

    return on_error


#: SQLSTATEs of a connection the server refuses for good: invalid_catalog_name (no such database),
#: invalid_password, invalid_authorization_specification (no such role, no pg_hba.conf entry).
_CONFIGURATION_SQLSTATES = frozenset({"3D000", "28P01", "28000"})
# libpq reports no SQLSTATE for a failed connection (psycopg's err.sqlstate is None there), only the
# server's message: these are the messages of those SQLSTATEs, plus libpq's own for a missing password.
_CONFIGURATION_MESSAGES = re.compile(
    r'database ".*" does not exist|password authentication failed|role ".*" does not exist'
    r"|no pg_hba\.conf entry|fe_sendauth: no password supplied"
)


def _refused_by_configuration(err: BaseException) -> bool:
    if getattr(err, "sqlstate", None) in _CONFIGURATION_SQLSTATES:
        return True
    return _CONFIGURATION_MESSAGES.search(str(err)) is not None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
