from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import (
    PG_MIGRATION_LOCK_KEY,
    alembic_config,
    is_busy_error,
    make_engine,
    read_only_engine,
    retry_on_busy,
)

from .backends import postgres_only, sqlite_only
from .factories import add_upload

REPO_ROOT = Path(__file__).resolve().parents[2]


def _locked_error(message: str = "database is locked") -> OperationalError:
    return OperationalError("INSERT ...", {}, Exception(message))


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'er' / 'app.db'}")
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: a shown "Saved" survives power loss
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    assert (tmp_path / "deep" / "er" / "app.db").is_file()
    engine.dispose()


@sqlite_only
def test_transactions_are_real_sqlite_transactions(engine, store):
    # The driver's legacy mode would autocommit a released SAVEPOINT; ours must roll back with the outer transaction.
    with Session(engine) as s:
        with s.begin():
            add_upload(s, store)  # uses a savepoint inside
            s.rollback()
    with Session(engine) as s:
        assert s.execute(text("SELECT count(*) FROM uploads")).scalar() == 0


@sqlite_only
def test_unknown_begin_mode_is_refused(engine):
    with pytest.raises(ValueError, match="'LATER'"):
        with engine.execution_options(sqlite_begin="later").begin() as c:
            c.exec_driver_sql("SELECT 1")


def test_retry_on_busy_retries_then_returns():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _locked_error()
        return "stored"

    assert retry_on_busy(flaky, attempts=5, sleep=lambda _: None) == "stored"
    assert len(calls) == 3


def test_retry_on_busy_gives_up_after_attempts_and_skips_other_errors():
    calls = []

    def always_locked():
        calls.append(1)
        raise _locked_error()

    with pytest.raises(OperationalError, match="locked"):
        retry_on_busy(always_locked, attempts=3, sleep=lambda _: None)
    assert len(calls) == 3

    calls.clear()

    def broken():
        calls.append(1)
        raise _locked_error("no such table: ratings")

    with pytest.raises(OperationalError, match="no such table"):
        retry_on_busy(broken, attempts=3, sleep=lambda _: None)
    assert len(calls) == 1
    assert not is_busy_error(ValueError("database is locked"))


def test_retry_on_busy_survives_a_real_write_lock(db_path, store):
    """A writer that holds the file longer than the busy timeout: the write is retried, not lost."""
    impatient = make_engine(f"sqlite:///{db_path}", busy_timeout_s=0.05)
    holder = make_engine(f"sqlite:///{db_path}")
    locked, release = threading.Event(), threading.Event()

    def hold_write_lock():
        with holder.begin() as c:  # BEGIN IMMEDIATE
            c.exec_driver_sql("SELECT 1")
            locked.set()
            release.wait(5)

    t = threading.Thread(target=hold_write_lock)
    t.start()
    locked.wait(5)
    threading.Timer(0.3, release.set).start()

    def write():
        with Session(impatient) as s, s.begin():
            return add_upload(s, store).sha256

    with pytest.raises(OperationalError):
        write()  # without retry: fails fast
    sha = retry_on_busy(write, attempts=10, base_delay_s=0.05)
    t.join()
    with Session(impatient) as s:
        assert s.get(repo.Upload, sha) is not None
    impatient.dispose()
    holder.dispose()


def _init_db_in_processes(url: str, cwd: Path, n: int) -> list[subprocess.Popen]:
    script = "import sys; from feedback_db.engine import init_db, make_engine; init_db(make_engine(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, url], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]


def _assert_migrated_once(procs: list[subprocess.Popen], url: str) -> None:
    stderr = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), stderr
    from alembic.script import ScriptDirectory

    engine = make_engine(url)
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()  # the newest migration
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    assert {"predictions", "ratings", "corrections", "locks"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_init_db_from_several_processes_at_once(empty_db_url, tmp_path):
    """Processes started together on one fresh database, from an unrelated working directory: all succeed."""
    _assert_migrated_once(_init_db_in_processes(empty_db_url, tmp_path, 3), empty_db_url)


@postgres_only
def test_concurrent_init_db_on_postgres_waits_for_the_advisory_lock(empty_db_url, tmp_path):
    """Deterministic version of the race above: while the migration lock is held, every init_db
    waits before reading the schema revision; released, they run one after another."""
    holder = make_engine(empty_db_url)
    with holder.connect() as c:
        c.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})  # session-level
        c.commit()
        procs = _init_db_in_processes(empty_db_url, tmp_path, 3)
        waiting, deadline = 0, time.monotonic() + 60
        while waiting < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
            waiting = c.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar()
            c.commit()
        assert waiting == 3, [p.poll() for p in procs]
        assert inspect(c).get_table_names() == []
        c.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
        c.commit()
    holder.dispose()
    _assert_migrated_once(procs, empty_db_url)


def test_postgres_url_needs_no_special_code():
    # A plain postgresql:// URL picks psycopg 3, the driver in requirements.txt (not psycopg2).
    engine = make_engine("postgresql://user:secret@localhost:5432/mmapp")  # no connection is made here
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    engine.dispose()


@postgres_only
def test_retry_on_busy_survives_a_postgres_deadlock(engine):
    """Two transactions lock two rows in opposite order: Postgres aborts one with deadlock_detected,
    ``is_busy_error`` says retry, and the retry commits. t1 waits first, so its deadlock_timeout
    (1 s by default) runs out first and it is the one aborted."""
    with Session(engine) as s, s.begin():
        for name in ("a", "b"):
            repo.try_acquire_lock(s, name, "setup", 60)
    both_hold_one = threading.Barrier(2)
    attempts = {"t1": 0, "t2": 0}
    failures: list[BaseException] = []

    def lock_rows(first: str, second: str, owner: str, delay_s: float) -> None:
        attempts[owner] += 1
        with Session(engine) as s, s.begin():
            s.execute(select(repo.Lock).where(repo.Lock.name == first).with_for_update())
            if attempts[owner] == 1:
                both_hold_one.wait(5)
                time.sleep(delay_s)
            s.execute(update(repo.Lock).where(repo.Lock.name == second).values(owner=owner))

    def worker(*args) -> None:
        try:
            # the back-off lets t2 take the row t1 gave up before t1 tries again
            retry_on_busy(lambda: lock_rows(*args), attempts=3, base_delay_s=0.2)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=args) for args in (("a", "b", "t1", 0.0), ("b", "a", "t2", 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == [] and attempts == {"t1": 2, "t2": 1}
    with Session(engine) as s:
        # t2 committed first (a -> t2), then t1's retry (b -> t1)
        assert dict(s.execute(select(repo.Lock.name, repo.Lock.owner)).tuples().all()) == {"a": "t2", "b": "t1"}


@sqlite_only
def test_read_only_sessions_do_not_block_writers(db_path, store, meme_id):
    engine = make_engine(f"sqlite:///{db_path}", busy_timeout_s=0.2)
    with Session(read_only_engine(engine)) as reader:
        assert len(repo.recent_predictions(reader)) == 1  # read transaction stays open
        with Session(engine) as s, s.begin():
            repo.record_rating(s, request_id="r", prediction_id=meme_id, session_id="s", coherence=3)
    # by contrast, a default session holds the write lock from its first statement on
    with Session(engine) as holder, holder.begin():
        holder.execute(text("SELECT 1"))
        with pytest.raises(OperationalError, match="locked"):
            with Session(engine) as s, s.begin():
                s.execute(text("SELECT 1"))
    engine.dispose()
