"""Initial schema: uploads, predictions, ratings, corrections, model registry, retrain bookkeeping, locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

UTC = sa.DateTime(timezone=True)  # stored as UTC; SQLite keeps it naive, the ORM type re-attaches UTC


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("relpath", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_uploads")),
    )
    op.create_index(op.f("ix_uploads_created_at"), "uploads", ["created_at"])

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("input_text", sa.Text(), nullable=True),
        sa.Column("ablation", sa.String(8), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("stage_ms", sa.JSON(), nullable=False),
        sa.Column("embedding_ref", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("\"kind\" IN ('caption', 'meme')", name=op.f("ck_predictions_kind")),
        sa.CheckConstraint("\"ablation\" IN ('image', 'text')", name=op.f("ck_predictions_ablation")),
        sa.CheckConstraint("latency_ms >= 0", name=op.f("ck_predictions_latency_ms")),
        sa.ForeignKeyConstraint(
            ["image_sha256"], ["uploads.sha256"], name=op.f("fk_predictions_image_sha256_uploads")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_predictions_request_id")),
    )
    op.create_index(op.f("ix_predictions_created_at"), "predictions", ["created_at"])
    op.create_index(op.f("ix_predictions_image_sha256"), "predictions", ["image_sha256"])
    op.create_index(op.f("ix_predictions_model_version"), "predictions", ["model_version"])

    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=True),
        sa.Column("coherence", sa.Integer(), nullable=True),
        sa.Column("relevance", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("coherence BETWEEN 1 AND 5", name=op.f("ck_ratings_coherence")),
        sa.CheckConstraint("relevance BETWEEN 1 AND 5", name=op.f("ck_ratings_relevance")),
        sa.CheckConstraint("detail BETWEEN 1 AND 5", name=op.f("ck_ratings_detail")),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_ratings_prediction_id_predictions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ratings")),
        sa.UniqueConstraint("request_id", name=op.f("uq_ratings_request_id")),
    )
    op.create_index(op.f("ix_ratings_created_at"), "ratings", ["created_at"])
    op.create_index(op.f("ix_ratings_prediction_id"), "ratings", ["prediction_id"])

    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=True),
        sa.Column("field", sa.String(16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("status", sa.String(16), server_default="new", nullable=False),
        sa.Column("used_in_version", sa.String(64), nullable=True),
        sa.CheckConstraint("\"field\" IN ('caption', 'ocr_text', 'label')", name=op.f("ck_corrections_field")),
        sa.CheckConstraint("\"status\" IN ('new', 'used', 'rejected')", name=op.f("ck_corrections_status")),
        sa.CheckConstraint("length(value) > 0", name=op.f("ck_corrections_value_not_empty")),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_corrections_prediction_id_predictions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
        sa.UniqueConstraint("request_id", name=op.f("uq_corrections_request_id")),
    )
    op.create_index(op.f("ix_corrections_created_at"), "corrections", ["created_at"])
    op.create_index(op.f("ix_corrections_prediction_id"), "corrections", ["prediction_id"])
    op.create_index(op.f("ix_corrections_status"), "corrections", ["status"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("parent_version", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("report_path", sa.String(1024), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("promoted_at", UTC, nullable=True),
        sa.CheckConstraint(
            "\"status\" IN ('candidate', 'promoted', 'rejected', 'retired')", name=op.f("ck_model_versions_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    op.create_index(
        "uq_model_versions_one_current",
        "model_versions",
        ["is_current"],
        unique=True,
        sqlite_where=sa.text("is_current"),
        postgresql_where=sa.text("is_current"),
    )

    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("candidate_version", sa.String(64), nullable=True),
        sa.Column("started_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
        sa.Column("heartbeat_at", UTC, nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("report_path", sa.String(1024), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.CheckConstraint("\"trigger\" IN ('schedule', 'operator', 'cli')", name=op.f("ck_retrain_runs_trigger")),
        sa.CheckConstraint(
            "\"status\" IN ('running', 'succeeded', 'failed', 'refused', 'promoted')",
            name=op.f("ck_retrain_runs_status"),
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_retrain_runs_progress")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_runs")),
    )
    op.create_index(op.f("ix_retrain_runs_started_at"), "retrain_runs", ["started_at"])

    op.create_table(
        "rejected_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("correction_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["retrain_runs.id"], name=op.f("fk_rejected_items_run_id_retrain_runs")
        ),
        sa.ForeignKeyConstraint(
            ["correction_id"], ["corrections.id"], name=op.f("fk_rejected_items_correction_id_corrections")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_items")),
    )
    op.create_index(op.f("ix_rejected_items_run_id"), "rejected_items", ["run_id"])
    op.create_index(op.f("ix_rejected_items_correction_id"), "rejected_items", ["correction_id"])

    op.create_table(
        "locks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("acquired_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_locks")),
    )

    op.create_table(
        "scheduler_state",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_fired_for", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_scheduler_state")),
    )


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "scheduler_state",
        "locks",
        "rejected_items",
        "retrain_runs",
        "model_versions",
        "corrections",
        "ratings",
        "predictions",
        "uploads",
    ):
        op.drop_table(table)
