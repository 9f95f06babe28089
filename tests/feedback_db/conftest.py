"""Fixtures: every test that asks for ``engine`` runs on SQLite, and again on PostgreSQL when
``MMAPP_TEST_POSTGRES_URL`` is set (``export MMAPP_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)``).
Each test starts from an empty database at the newest schema revision on either backend."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db.blobstore import BlobStore
from feedback_db.engine import init_db, make_engine
from feedback_db.models import Base

from .backends import BACKENDS, POSTGRES_URL_ENV, PostgresDatabases
from .factories import add_prediction, add_upload

POSTGRES_SKIP_REASON = (
    f"{POSTGRES_URL_ENV} is not set; to run the Postgres variants: export {POSTGRES_URL_ENV}=$(bash .ci/postgres.sh)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A skip mark (not a skip inside a fixture) lets `pytest -ra` fold the reason into one line per file.
    if os.environ.get(POSTGRES_URL_ENV):
        return
    here = Path(__file__).parent
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres" and item.path.is_relative_to(here):
            item.add_marker(pytest.mark.skip(reason=POSTGRES_SKIP_REASON))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(POSTGRES_SKIP_REASON)
    databases = PostgresDatabases(url)
    yield databases
    databases.close()


@pytest.fixture(scope="session")
def postgres_shared_db(postgres: PostgresDatabases) -> str:
    """One Postgres database for the run, brought to head and emptied before each test that uses it
    (``_empty_at_head``: about 5x faster than a CREATE DATABASE per test)."""
    return postgres.create()


def _empty_at_head(url: str) -> None:
    engine = make_engine(url)
    try:
        init_db(engine)  # no-op at head; restores the schema after a test that downgraded it and failed
        with engine.begin() as c:
            c.exec_driver_sql("SET LOCAL lock_timeout = '10s'")  # fail, not hang, if a test leaked a transaction
            tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
            c.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")  # ids start at 1, as on SQLite
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file upgraded through Alembic; each test gets a copy (faster than migrating per test)."""
    path = tmp_path_factory.mktemp("template") / "feedback.db"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    engine.dispose()  # last connection closed: WAL checkpointed into the main file
    return path


@pytest.fixture
def db_path(migrated_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "db" / "feedback.db"
    path.parent.mkdir()
    shutil.copyfile(migrated_template, path)
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str:
    """URL of a migrated database with no rows, for this test alone (SQLite: a fresh file)."""
    if backend == "sqlite":
        return f"sqlite:///{request.getfixturevalue('db_path')}"
    url = request.getfixturevalue("postgres_shared_db")
    _empty_at_head(url)
    return url


@pytest.fixture
def empty_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a database with no tables yet (SQLite: a file not created yet), for tests of ``init_db``."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty' / 'feedback.db'}"
        return
    postgres: PostgresDatabases = request.getfixturevalue("postgres")
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def meme_id(engine: Engine, store: BlobStore) -> int:
    with Session(engine) as s, s.begin():
        return add_prediction(s, add_upload(s, store)).id


@pytest.fixture
def caption_id(engine: Engine, store: BlobStore) -> int:
    with Session(engine) as s, s.begin():
        return add_prediction(s, add_upload(s, store, tag="cat"), kind="caption", label="cat").id
