"""Alembic environment for feedback_db: runs against the connection ``init_db`` hands over.

Works without alembic.ini or a particular working directory. The whole upgrade is one transaction
(SQLite included), taken under a lock before the current revision is read, so concurrent callers
serialize and the later ones find nothing to do.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from feedback_db.engine import PG_MIGRATION_LOCK_KEY, make_engine
from feedback_db.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_, obj, autogen_context):
    # Migrations must not import feedback_db.models (it changes over time): spell the stored type.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kw) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates the table
        render_item=_render_item,
        compare_type=True,
        transactional_ddl=True,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():  # BEGIN IMMEDIATE on SQLite engines from make_engine
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK_KEY})")
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
