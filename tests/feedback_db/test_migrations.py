from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

from feedback_db.engine import alembic_config, downgrade_db, init_db, make_engine
from feedback_db.models import Base

from .factories import add_prediction, add_upload


def _sqlite_ddl(engine) -> dict[str, list[str]]:
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name != 'alembic_version'")
        ).all()
    return {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in rows}


def test_migrated_schema_matches_models(engine):
    with engine.connect() as c:
        diffs = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diffs == []


def test_migrated_ddl_equals_create_all(engine, tmp_path):
    # Stricter than compare_metadata: also covers CHECK constraints and the partial unique index.
    reference = create_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    Base.metadata.create_all(reference)
    assert _sqlite_ddl(engine) == _sqlite_ddl(reference)
    reference.dispose()


def test_single_head_and_db_at_head(engine):
    heads = ScriptDirectory.from_config(alembic_config(engine)).get_heads()
    assert len(heads) == 1
    with engine.connect() as c:
        assert MigrationContext.configure(c).get_current_heads() == tuple(heads)


def test_downgrade_to_base_then_upgrade_again(engine):
    downgrade_db(engine, revision="base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    with engine.connect() as c:
        assert MigrationContext.configure(c).get_current_heads() == ()
    init_db(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())


def test_init_db_again_keeps_data(engine, store):
    with Session(engine) as s, s.begin():
        add_prediction(s, add_upload(s, store))
    init_db(engine)
    with Session(engine) as s:
        assert s.execute(text("SELECT count(*) FROM predictions")).scalar() == 1


def test_fresh_database_via_init_db(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new' / 'feedback.db'}")
    init_db(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()
