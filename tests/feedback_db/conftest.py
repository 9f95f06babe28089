from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db.blobstore import BlobStore
from feedback_db.engine import init_db, make_engine

from .factories import add_prediction, add_upload


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


@pytest.fixture
def engine(db_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{db_path}")
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
