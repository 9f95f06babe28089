"""Rater accounts, login attempts and server-issued login sessions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "raters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("disabled_at", UTC, nullable=True),
        sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False),
        sa.Column("locked_until", UTC, nullable=True),
        sa.Column("last_login_at", UTC, nullable=True),
        sa.CheckConstraint("\"role\" IN ('operator', 'trusted', 'rater')", name=op.f("ck_raters_role")),
        sa.CheckConstraint("failed_logins >= 0", name=op.f("ck_raters_failed_logins")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raters")),
        sa.UniqueConstraint("name", name=op.f("uq_raters_name")),
    )
    op.create_table(
        "login_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("rater_id", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint(
            "\"outcome\" IN ('ok', 'wrong_password', 'unknown_user', 'locked', 'disabled')",
            name=op.f("ck_login_attempts_outcome"),
        ),
        sa.ForeignKeyConstraint(["rater_id"], ["raters.id"], name=op.f("fk_login_attempts_rater_id_raters")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_login_attempts")),
    )
    op.create_index(op.f("ix_login_attempts_name"), "login_attempts", ["name"])
    op.create_index(op.f("ix_login_attempts_created_at"), "login_attempts", ["created_at"])
    op.create_table(
        "auth_sessions",
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("rater_id", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("last_seen_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("revoked_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(["rater_id"], ["raters.id"], name=op.f("fk_auth_sessions_rater_id_raters")),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_auth_sessions")),
    )
    op.create_index(op.f("ix_auth_sessions_rater_id"), "auth_sessions", ["rater_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_sessions_rater_id"), table_name="auth_sessions")
    op.drop_table("auth_sessions")
    op.drop_index(op.f("ix_login_attempts_created_at"), table_name="login_attempts")
    op.drop_index(op.f("ix_login_attempts_name"), table_name="login_attempts")
    op.drop_table("login_attempts")
    op.drop_table("raters")
