from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from feedback_db.engine import alembic_config, downgrade_db, init_db, make_engine
from feedback_db.models import Base

from .factories import add_prediction, add_upload


def _ddl(engine) -> dict[str, list[str]]:
    """Each table's columns, constraints and indexes as the database itself spells them."""
    with engine.connect() as c:
        if engine.dialect.name == "sqlite":
            rows = c.execute(
                text("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name != 'alembic_version'")
            ).all()
            return {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in rows}
        rows = c.execute(
            text(
                """
                SELECT table_name, concat_ws(' ', column_name, data_type, character_maximum_length,
                                             is_nullable, column_default)
                FROM information_schema.columns WHERE table_schema = current_schema()
                UNION ALL
                SELECT conrelid::regclass::text, conname || ' ' || pg_get_constraintdef(oid)
                FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
                UNION ALL
                SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = current_schema()
                """
            )
        ).all()
    ddl: dict[str, list[str]] = {}
    for table, line in rows:
        if table != "alembic_version":
            ddl.setdefault(table, []).append(line)
    return {table: sorted(lines) for table, lines in ddl.items()}


def test_migrated_schema_matches_models(engine):
    with engine.connect() as c:
        diffs = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diffs == []


def test_migrated_ddl_equals_create_all(engine, empty_db_url):
    # Stricter than compare_metadata: also covers CHECK constraints and the partial unique index.
    reference = make_engine(empty_db_url)
    Base.metadata.create_all(reference)
    assert _ddl(engine) == _ddl(reference)
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


def test_fresh_database_via_init_db(empty_db_url):
    engine = make_engine(empty_db_url)
    init_db(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()
