"""Engine factory, schema upgrade through Alembic, and a retry helper for a busy database.

SQLite gets WAL, a busy timeout, enforced foreign keys and ``BEGIN IMMEDIATE`` transactions so
that many threads and processes can write one file; any other URL (Postgres) is used as given.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
# How a transaction on SQLite starts. IMMEDIATE takes the write lock up front, so a
# read-then-write transaction (get-or-create) waits on busy_timeout instead of failing with
# SQLITE_BUSY when its read snapshot goes stale. Long read-only work uses ``read_only_engine``.
SQLITE_BEGIN_MODES = ("DEFERRED", "IMMEDIATE", "EXCLUSIVE")
# WAL + FULL: a commit is on disk (the WAL fsynced) before "Saved" is shown; NORMAL could lose the
# last commits on power loss or an OS crash. Cost measured by benchmarks/sqlite_sync.py (docs/results.md).
SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
SQLITE_SYNCHRONOUS = "FULL"
PG_MIGRATION_LOCK_KEY = 0x6D6D617070  # "mmapp": transaction-level advisory lock held while migrating

T = TypeVar("T")


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, echo: bool = False,
                synchronous: str = SQLITE_SYNCHRONOUS) -> Engine:
    """Build an engine for ``url``; for a SQLite file, create its folder and tune it for concurrency
    and durability (``synchronous``: SQLite's ``PRAGMA synchronous``; ignored for other databases)."""
    synchronous = synchronous.upper()
    if synchronous not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS_MODES}, got {synchronous!r}")
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)

    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, echo=echo, connect_args={"timeout": busy_timeout_s})
    busy_timeout_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection, _connection_record) -> None:
        # The driver's own implicit BEGIN skips SELECT and SAVEPOINT; we emit BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")  # first: the next one may wait
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_sqlite(conn) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        mode = str(options.get("sqlite_begin", "IMMEDIATE")).upper()
        if mode not in SQLITE_BEGIN_MODES:
            raise ValueError(f"sqlite_begin must be one of {SQLITE_BEGIN_MODES}, got {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def read_only_engine(engine: Engine) -> Engine:
    """A view of ``engine`` for long read-only work (exports, dashboards): on SQLite its transactions
    start DEFERRED, so they never hold the write lock; elsewhere it behaves exactly like ``engine``."""
    return engine.execution_options(sqlite_begin="DEFERRED")


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at ``feedback_db/migrations``; no alembic.ini, no working-directory lookup."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def _run_alembic(engine: Engine, action: Callable[[Config], None]) -> None:
    cfg = alembic_config(engine)
    with engine.connect() as connection:
        cfg.attributes["connection"] = connection  # env.py reuses it, so our SQLite settings apply
        action(cfg)


def init_db(engine: Engine, *, revision: str = "head") -> None:
    """Upgrade the schema to ``revision``.

    Safe from several processes at once: the whole upgrade runs in one transaction that starts with
    ``BEGIN IMMEDIATE`` on SQLite (or under an advisory lock on Postgres), and reads the current
    revision only after taking that lock, so the second caller finds the schema done and does nothing.
    """
    retry_on_busy(lambda: _run_alembic(engine, lambda cfg: command.upgrade(cfg, revision)), attempts=5)


def downgrade_db(engine: Engine, *, revision: str = "base") -> None:
    """Downgrade the schema to ``revision`` (``base`` drops every table)."""
    _run_alembic(engine, lambda cfg: command.downgrade(cfg, revision))


_BUSY_MESSAGES = ("database is locked", "database is busy", "database table is locked")
_RETRYABLE_PG_CODES = ("40001", "40P01")  # serialization_failure, deadlock_detected


def is_busy_error(exc: BaseException) -> bool:
    """True for errors that mean "try again later": SQLite lock contention, Postgres serialization/deadlock."""
    if not isinstance(exc, OperationalError):
        return False
    message = str(exc.orig if exc.orig is not None else exc).lower()
    if any(m in message for m in _BUSY_MESSAGES):
        return True
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return code in _RETRYABLE_PG_CODES


def retry_on_busy(
    fn: Callable[[], T],
    attempts: int = 5,
    *,
    base_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it does not fail with a busy/locked database, at most ``attempts`` times.

    ``fn`` must run a whole transaction (open its own session), so a retry repeats all of it.
    Other errors, and the last busy error, propagate.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OperationalError as exc:
            if attempt == attempts or not is_busy_error(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("database busy (attempt %d/%d), retrying in %.2fs: %s", attempt, attempts, delay, exc.orig)
            sleep(delay)
    raise AssertionError("unreachable")
