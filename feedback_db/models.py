"""ORM tables for uploads, predictions, user feedback, the model registry and retrain bookkeeping.

Rows hold references (hashes, version names, paths), never model code or image bytes.
Every timestamp is stored as UTC and read back timezone-aware.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PREDICTION_KINDS = ("caption", "meme")
ABLATIONS = ("image", "text")  # the modality that was dropped; None = both used
CORRECTION_FIELDS = ("caption", "ocr_text", "label")
CORRECTION_STATUSES = ("new", "used", "rejected")
VERSION_STATUSES = ("candidate", "promoted", "rejected", "retired")
RUN_TRIGGERS = ("schedule", "operator", "cli")
RUN_STATUSES = ("running", "succeeded", "failed", "refused", "promoted")
RATER_ROLES = ("operator", "trusted", "rater")  # rater: an account whose feedback follows the anonymous rules
LOGIN_OUTCOMES = ("ok", "wrong_password", "unknown_user", "locked", "disabled")
BLIND_SIDES = ("a", "b")
BLIND_CHOICES = ("a", "b", "same")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime stored as UTC; refuses naive values, returns aware ones (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"timestamps must be timezone-aware, got naive {value!r}")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f'"{column}" IN ({", ".join(repr(v) for v in values)})'


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), str: String(255)}


class Upload(Base):
    """An image in the blob store, addressed by the SHA-256 of its bytes."""

    __tablename__ = "uploads"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    relpath: Mapped[str] = mapped_column(String(255))  # relative to the blob store root, '/'-separated
    format: Mapped[str] = mapped_column(String(16))  # file extension: png, jpg, webp, ...
    width: Mapped[int]
    height: Mapped[int]
    n_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    predictions: Mapped[list[Prediction]] = relationship(back_populates="upload")


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (
        CheckConstraint(_one_of("kind", PREDICTION_KINDS), name="kind"),
        CheckConstraint(_one_of("ablation", ABLATIONS), name="ablation"),
        CheckConstraint("latency_ms >= 0", name="latency_ms"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)  # client idempotency key
    kind: Mapped[str] = mapped_column(String(16))
    image_sha256: Mapped[str] = mapped_column(ForeignKey("uploads.sha256"), index=True)
    input_text: Mapped[Optional[str]] = mapped_column(Text)  # OCR or user-edited text
    ablation: Mapped[Optional[str]] = mapped_column(String(8))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    outputs: Mapped[dict[str, Any]]  # meme: {"label": ..., "scores": {...}}; caption: {"caption": ...}
    latency_ms: Mapped[float]
    stage_ms: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"ocr": 12.3, "encode": ...}
    embedding_ref: Mapped[str] = mapped_column(String(255), default="")  # embedding cache keys
    session_id: Mapped[str] = mapped_column(String(64))  # anonymous per-browser id; never an IP
    user: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    upload: Mapped[Upload] = relationship(back_populates="predictions")
    ratings: Mapped[list[Rating]] = relationship(back_populates="prediction", order_by="Rating.id")
    corrections: Mapped[list[Correction]] = relationship(back_populates="prediction", order_by="Correction.id")


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = tuple(
        CheckConstraint(f"{score} BETWEEN 1 AND 5", name=score) for score in ("coherence", "relevance", "detail")
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    session_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[Optional[str]] = mapped_column(String(64))
    coherence: Mapped[Optional[int]]  # 1..5
    relevance: Mapped[Optional[int]]  # 1..5
    detail: Mapped[Optional[int]]  # 1..5
    comment: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    prediction: Mapped[Prediction] = relationship(back_populates="ratings")


class Correction(Base):
    __tablename__ = "corrections"
    __table_args__ = (
        CheckConstraint(_one_of("field", CORRECTION_FIELDS), name="field"),
        CheckConstraint(_one_of("status", CORRECTION_STATUSES), name="status"),
        CheckConstraint("length(value) > 0", name="value_not_empty"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    session_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[Optional[str]] = mapped_column(String(64))
    field: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="new", server_default="new", index=True)
    used_in_version: Mapped[Optional[str]] = mapped_column(String(64))

    prediction: Mapped[Prediction] = relationship(back_populates="corrections")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_one_of("status", VERSION_STATUSES), name="status"),
        # At most one current version, enforced by the database, not only by promote().
        Index(
            "uq_model_versions_one_current",
            "is_current",
            unique=True,
            sqlite_where=text("is_current"),
            postgresql_where=text("is_current"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(1024))  # checkpoint location (file or folder)
    sha256: Mapped[str] = mapped_column(String(64))  # of the checkpoint file or its manifest
    parent_version: Mapped[Optional[str]] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    is_current: Mapped[bool] = mapped_column(default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)  # data, config and code fingerprints
    report_path: Mapped[Optional[str]] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[Optional[datetime]]


class RetrainRun(Base):
    __tablename__ = "retrain_runs"
    __table_args__ = (
        CheckConstraint(_one_of("trigger", RUN_TRIGGERS), name="trigger"),
        CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")
    candidate_version: Mapped[Optional[str]] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[Optional[datetime]]
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    progress: Mapped[float] = mapped_column(default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(128))  # host:pid of the worker
    report_path: Mapped[Optional[str]] = mapped_column(String(1024))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)

    rejected_items: Mapped[list[RejectedItem]] = relationship(back_populates="run", order_by="RejectedItem.id")


class RejectedItem(Base):
    """A correction (or other training item) a retrain run held back, and why."""

    __tablename__ = "rejected_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("retrain_runs.id"), index=True)
    correction_id: Mapped[Optional[int]] = mapped_column(ForeignKey("corrections.id"), index=True)
    reason: Mapped[str] = mapped_column(String(64))  # e.g. "outlier", "near_duplicate", "user_share"
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)

    run: Mapped[RetrainRun] = relationship(back_populates="rejected_items")


class Lock(Base):
    """A named lease shared by all processes: held by ``owner`` until ``expires_at``."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class SchedulerState(Base):
    """The last scheduled slot a job ran for, so a missed slot runs once on start-up, not once per process."""

    __tablename__ = "scheduler_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_fired_for: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Rater(Base):
    """An account: the operator, a trusted annotator, or a plain rater. Anonymous sessions have none.

    ``password_hash`` is a versioned KDF string (``scrypt$n$r$p$salt$hash``); never the password.
    ``failed_logins``/``locked_until`` drive the per-account backoff.
    """

    __tablename__ = "raters"
    __table_args__ = (
        CheckConstraint(_one_of("role", RATER_ROLES), name="role"),
        CheckConstraint("failed_logins >= 0", name="failed_logins"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_by: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[Optional[datetime]]
    failed_logins: Mapped[int] = mapped_column(default=0, server_default="0")
    locked_until: Mapped[Optional[datetime]]
    last_login_at: Mapped[Optional[datetime]]


class LoginAttempt(Base):
    """One login try, as the server saw it: the name typed and the outcome. No IP, no password."""

    __tablename__ = "login_attempts"
    __table_args__ = (CheckConstraint(_one_of("outcome", LOGIN_OUTCOMES), name="outcome"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)  # as typed, cut to 64 characters
    rater_id: Mapped[Optional[int]] = mapped_column(ForeignKey("raters.id"))
    outcome: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class AuthSession(Base):
    """A server-issued login: the browser holds the token in an HttpOnly cookie, the database only its sha256."""

    __tablename__ = "auth_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]  # absolute end, whatever the activity
    revoked_at: Mapped[Optional[datetime]]


class BlindPair(Base):
    """One held-out item with the current and the candidate version's output, sides shuffled (issue 10, item 4).

    ``candidate_side`` says which of ``output_a``/``output_b`` the candidate wrote; it is never shown to a rater.
    """

    __tablename__ = "blind_pairs"
    __table_args__ = (CheckConstraint(_one_of("candidate_side", BLIND_SIDES), name="candidate_side"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("retrain_runs.id"), index=True)
    candidate_version: Mapped[str] = mapped_column(String(64), index=True)
    current_version: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[str] = mapped_column(String(64))  # the held-out feedback item (e.g. "c123")
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_relpath: Mapped[str] = mapped_column(String(1024))  # under the upload store
    output_a: Mapped[str] = mapped_column(Text)
    output_b: Mapped[str] = mapped_column(Text)
    candidate_side: Mapped[str] = mapped_column(String(1))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlindVote(Base):
    """One rater's pick on one blind pair; one vote per rater per pair (the database enforces it)."""

    __tablename__ = "blind_votes"
    __table_args__ = (
        CheckConstraint(_one_of("choice", BLIND_CHOICES), name="choice"),
        Index("uq_blind_votes_pair_rater", "pair_id", "rater", unique=True),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("blind_pairs.id"), index=True)
    rater: Mapped[str] = mapped_column(String(96))  # "account:<name>" or "session:<id>"
    choice: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
