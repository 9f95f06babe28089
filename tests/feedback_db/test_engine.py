from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import init_db, is_busy_error, make_engine, read_only_engine, retry_on_busy

from .factories import add_upload

REPO_ROOT = Path(__file__).resolve().parents[2]


def _locked_error(message: str = "database is locked") -> OperationalError:
    return OperationalError("INSERT ...", {}, Exception(message))


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'er' / 'app.db'}")
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    assert (tmp_path / "deep" / "er" / "app.db").is_file()
    engine.dispose()


def test_transactions_are_real_sqlite_transactions(engine, store):
    # The driver's legacy mode would autocommit a released SAVEPOINT; ours must roll back with the outer transaction.
    with Session(engine) as s:
        with s.begin():
            add_upload(s, store)  # uses a savepoint inside
            s.rollback()
    with Session(engine) as s:
        assert s.execute(text("SELECT count(*) FROM uploads")).scalar() == 0


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


def test_init_db_from_several_processes_at_once(tmp_path):
    """Processes started together on one fresh file, from an unrelated working directory: all succeed."""
    db = tmp_path / "shared" / "feedback.db"
    script = (
        "import sys; from feedback_db.engine import init_db, make_engine; "
        "init_db(make_engine(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"sqlite:///{db}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    stderr = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], stderr
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
    assert {"predictions", "ratings", "corrections", "locks"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_postgres_url_needs_no_special_code():
    pytest.importorskip("psycopg2")
    engine = make_engine("postgresql://user:secret@localhost:5432/mmapp")  # no connection is made here
    assert engine.dialect.name == "postgresql"


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
