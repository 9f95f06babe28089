"""Blind before/after comparison: pairs of current vs candidate outputs and raters' votes (issue 10, item 4).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blind_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("candidate_version", sa.String(64), nullable=False),
        sa.Column("current_version", sa.String(64), nullable=False),
        sa.Column("item_id", sa.String(64), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_relpath", sa.String(1024), nullable=False),
        sa.Column("output_a", sa.Text(), nullable=False),
        sa.Column("output_b", sa.Text(), nullable=False),
        sa.Column("candidate_side", sa.String(1), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("\"candidate_side\" IN ('a', 'b')", name=op.f("ck_blind_pairs_candidate_side")),
        sa.ForeignKeyConstraint(["run_id"], ["retrain_runs.id"], name=op.f("fk_blind_pairs_run_id_retrain_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blind_pairs")),
    )
    op.create_index(op.f("ix_blind_pairs_run_id"), "blind_pairs", ["run_id"])
    op.create_index(op.f("ix_blind_pairs_candidate_version"), "blind_pairs", ["candidate_version"])
    op.create_table(
        "blind_votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("rater", sa.String(96), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("\"choice\" IN ('a', 'b', 'same')", name=op.f("ck_blind_votes_choice")),
        sa.ForeignKeyConstraint(["pair_id"], ["blind_pairs.id"], name=op.f("fk_blind_votes_pair_id_blind_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blind_votes")),
    )
    op.create_index(op.f("ix_blind_votes_pair_id"), "blind_votes", ["pair_id"])
    op.create_index("uq_blind_votes_pair_rater", "blind_votes", ["pair_id", "rater"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_blind_votes_pair_rater", table_name="blind_votes")
    op.drop_index(op.f("ix_blind_votes_pair_id"), table_name="blind_votes")
    op.drop_table("blind_votes")
    op.drop_index(op.f("ix_blind_pairs_candidate_version"), table_name="blind_pairs")
    op.drop_index(op.f("ix_blind_pairs_run_id"), table_name="blind_pairs")
    op.drop_table("blind_pairs")
