"""Read and write feedback rows, the model registry, cross-process locks and scheduler state.

Every function takes a ``Session`` and neither commits nor rolls back: the caller owns the
transaction (``with Session(engine) as s, s.begin(): ...``). Inserts keyed by a client
``request_id`` are idempotent: a repeated request returns the row stored the first time.
"""
from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Optional, TypeVar

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from feedback_db.models import (
    ABLATIONS,
    LOGIN_OUTCOMES,
    RATER_ROLES,
    AuthSession,
    LoginAttempt,
    Rater,
    CORRECTION_FIELDS,
    CORRECTION_STATUSES,
    PREDICTION_KINDS,
    RUN_STATUSES,
    RUN_TRIGGERS,
    Base,
    Correction,
    Lock,
    ModelVersion,
    Prediction,
    Rating,
    RejectedItem,
    RetrainRun,
    SchedulerState,
    Upload,
    utcnow,
)
from feedback_db.models import BLIND_CHOICES, BLIND_SIDES, BlindPair, BlindVote

M = TypeVar("M", bound=Base)

RATING_SCORES = ("coherence", "relevance", "detail")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_KEY_CHARS = 128  # request_id column width
_IN_CHUNK = 5_000  # values per IN (...) list: well under SQLite's and Postgres's bound-parameter limits


# --- validation -------------------------------------------------------------------------------


def _check_one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_key(name: str, value: Any, max_chars: int = _MAX_KEY_CHARS) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_chars:
        raise ValueError(f"{name} must be at most {max_chars} characters, got {len(value)}: {value[:40]!r}...")
    return value


def _check_session_id(session_id: Any) -> str:
    _check_key("session_id", session_id, 64)
    try:
        ipaddress.ip_address(session_id)
    except ValueError:
        return session_id
    raise ValueError(f"session_id must be an anonymous id, not a client IP address, got {session_id!r}")


def _check_sha256(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"{name} must be 64 lowercase hex characters, got {value!r}")
    return value


def _check_aware(name: str, value: Optional[datetime]) -> Optional[datetime]:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value!r}")
    return value


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    return limit


def _require_prediction(s: Session, prediction_id: Any) -> Prediction:
    if isinstance(prediction_id, bool) or not isinstance(prediction_id, int):
        raise ValueError(f"prediction_id must be an int, got {prediction_id!r}")
    prediction = s.get(Prediction, prediction_id)
    if prediction is None:
        raise ValueError(f"unknown prediction id {prediction_id!r}")
    return prediction


# --- idempotent insert ------------------------------------------------------------------------

_UPSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}  # dialects with ON CONFLICT DO NOTHING


def _find(s: Session, model: type[M], key_col: InstrumentedAttribute[Any], key: Any) -> Optional[M]:
    return s.scalars(select(model).where(key_col == key)).one_or_none()


def _get_or_insert(
    s: Session, model: type[M], key_col: InstrumentedAttribute[Any], key: Any, build: Callable[[], M]
) -> tuple[M, bool]:
    """Return ``(row, created)``. A concurrent insert of the same key is resolved by fetching the
    winner's row, so neither caller sees an error.

    On SQLite and Postgres this is one ``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING`` (then a
    lookup only when the key was taken): the app writes a few rows per request, and the ORM's unit of
    work plus a savepoint per row cost more Python time than everything else in storing a prediction.
    Other databases get a lookup, then the insert inside a savepoint."""
    upsert = _UPSERTS.get(s.get_bind().dialect.name)
    if upsert is not None:
        row = build()
        state = sa_inspect(row)
        values = {a.key: getattr(row, a.key) for a in state.mapper.column_attrs if a.key in state.dict}
        stmt = upsert(model).values(values).on_conflict_do_nothing(index_elements=[key_col]).returning(model)
        inserted = s.scalars(stmt).one_or_none()
        if inserted is not None:
            return inserted, True
        existing = _find(s, model, key_col, key)
        if existing is None:  # cannot happen: the conflict was on this key
            raise RuntimeError(f"{model.__name__} {key!r} conflicted on insert but cannot be found")
        return existing, False
    existing = _find(s, model, key_col, key)
    if existing is not None:
        return existing, False
    row = build()
    try:
        with s.begin_nested():
            s.add(row)
    except IntegrityError:
        existing = _find(s, model, key_col, key)
        if existing is None:
            raise  # some other constraint failed, not our key
        return existing, False
    return row, True


def _same_request(row: Any, request_id: str, *, session_id: Optional[str] = None, **expected: Any) -> None:
    # Request ids are chosen by clients, so they are scoped to their owner (``session_id``): another
    # session's id is refused without a word about its row (no stored value in the message, no row handed back).
    if session_id is not None and row.session_id != session_id:
        raise ValueError(f"request_id {request_id!r} is already taken; send a different one (or none)")
    # A request_id reused by its owner for a different target is a client bug; silently returning the
    # old row would hide it.
    for name, value in expected.items():
        if getattr(row, name) != value:
            raise ValueError(
                f"request_id {request_id!r} was already used with {name}={getattr(row, name)!r}, got {value!r}"
            )


# --- writes from the app ----------------------------------------------------------------------


def record_upload(
    s: Session, *, sha256: str, relpath: str, format: str, width: int, height: int, n_bytes: int
) -> Upload:
    """Get or create the upload row for an image already written to the blob store."""
    _check_sha256("sha256", sha256)
    _check_key("relpath", relpath, 255)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
        raise ValueError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
    upload, _ = _get_or_insert(
        s,
        Upload,
        Upload.sha256,
        sha256,
        lambda: Upload(
            sha256=sha256, relpath=relpath, format=format.lower().lstrip("."), width=width, height=height, n_bytes=n_bytes
        ),
    )
    return upload


def record_prediction(
    s: Session,
    *,
    request_id: str,
    kind: str,
    image_sha256: str,
    model_version: str,
    outputs: dict[str, Any],
    latency_ms: float,
    session_id: str,
    input_text: Optional[str] = None,
    ablation: Optional[str] = None,
    stage_ms: Optional[dict[str, float]] = None,
    embedding_ref: str = "",
    user: Optional[str] = None,
    created_at: Optional[datetime] = None,
) -> Prediction:
    """Store one model output. Meme predictions keep their predicted label in ``outputs["label"]``,
    captions in ``outputs["caption"]`` (the tables and exports read those keys)."""
    _check_key("request_id", request_id)
    _check_one_of("kind", kind, PREDICTION_KINDS)
    _check_one_of("ablation", ablation, (None, *ABLATIONS))
    _check_sha256("image_sha256", image_sha256)
    _check_key("model_version", model_version, 64)
    _check_session_id(session_id)
    _check_aware("created_at", created_at)
    if not isinstance(outputs, dict):
        raise ValueError(f"outputs must be a dict, got {type(outputs).__name__}")
    if not isinstance(latency_ms, (int, float)) or isinstance(latency_ms, bool) or not latency_ms >= 0:
        raise ValueError(f"latency_ms must be a non-negative number, got {latency_ms!r}")
    if s.get(Upload, image_sha256) is None:
        raise ValueError(f"unknown upload sha256 {image_sha256!r}; call record_upload first")

    prediction, created = _get_or_insert(
        s,
        Prediction,
        Prediction.request_id,
        request_id,
        lambda: Prediction(
            request_id=request_id,
            kind=kind,
            image_sha256=image_sha256,
            input_text=input_text,
            ablation=ablation,
            model_version=model_version,
            outputs=outputs,
            latency_ms=float(latency_ms),
            stage_ms=dict(stage_ms or {}),
            embedding_ref=embedding_ref,
            session_id=session_id,
            user=user,
            created_at=created_at or utcnow(),
        ),
    )
    if not created:
        _same_request(prediction, request_id, session_id=session_id, kind=kind, image_sha256=image_sha256)
    return prediction


def record_rating(
    s: Session,
    *,
    request_id: str,
    prediction_id: int,
    session_id: str,
    coherence: Optional[int] = None,
    relevance: Optional[int] = None,
    detail: Optional[int] = None,
    comment: Optional[str] = None,
    user: Optional[str] = None,
    created_at: Optional[datetime] = None,
) -> Rating:
    """Store a 1-5 rating on any of coherence/relevance/detail, and/or a free-text comment."""
    _check_key("request_id", request_id)
    _check_session_id(session_id)
    _check_aware("created_at", created_at)
    scores = {"coherence": coherence, "relevance": relevance, "detail": detail}
    for name, value in scores.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5):
            raise ValueError(f"{name} must be an int from 1 to 5 or None, got {value!r}")
    comment = comment.strip() if isinstance(comment, str) else comment
    if comment is not None and not isinstance(comment, str):
        raise ValueError(f"comment must be a string or None, got {type(comment).__name__}")
    comment = comment or None
    if all(v is None for v in scores.values()) and comment is None:
        raise ValueError("a rating needs at least one score (coherence, relevance, detail) or a comment")
    _require_prediction(s, prediction_id)

    rating, created = _get_or_insert(
        s,
        Rating,
        Rating.request_id,
        request_id,
        lambda: Rating(
            request_id=request_id,
            prediction_id=prediction_id,
            session_id=session_id,
            user=user,
            comment=comment,
            created_at=created_at or utcnow(),
            **scores,
        ),
    )
    if not created:
        _same_request(rating, request_id, session_id=session_id, prediction_id=prediction_id)
    return rating


def record_correction(
    s: Session,
    *,
    request_id: str,
    prediction_id: int,
    field: str,
    value: str,
    session_id: str,
    user: Optional[str] = None,
    created_at: Optional[datetime] = None,
) -> Correction:
    """Store a user's corrected caption, OCR text or meme label for a prediction (status 'new')."""
    _check_key("request_id", request_id)
    _check_one_of("field", field, CORRECTION_FIELDS)
    _check_session_id(session_id)
    _check_aware("created_at", created_at)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"correction value must be a non-empty string, got {value!r}")
    value = value.strip()
    prediction = _require_prediction(s, prediction_id)
    if field == "label" and prediction.kind != "meme":
        raise ValueError(f"a label correction needs a meme prediction, prediction {prediction_id} is {prediction.kind!r}")

    correction, created = _get_or_insert(
        s,
        Correction,
        Correction.request_id,
        request_id,
        lambda: Correction(
            request_id=request_id,
            prediction_id=prediction_id,
            session_id=session_id,
            user=user,
            field=field,
            value=value,
            status="new",
            created_at=created_at or utcnow(),
        ),
    )
    if not created:
        _same_request(correction, request_id, session_id=session_id, prediction_id=prediction_id, field=field)
    return correction


def prediction_for_feedback(s: Session, prediction_id: int) -> Optional[dict[str, Any]]:
    """What a feedback request needs of one prediction (kind, session_id, user, outputs, input_text), or None."""
    if isinstance(prediction_id, bool) or not isinstance(prediction_id, int):
        raise ValueError(f"prediction_id must be an int, got {prediction_id!r}")
    row = s.get(Prediction, prediction_id)
    if row is None:
        return None
    return {"id": row.id, "kind": row.kind, "session_id": row.session_id, "user": row.user,
            "outputs": dict(row.outputs or {}), "input_text": row.input_text}


# --- retention -----------------------------------------------------------------------------------


def unrated_uploads(s: Session, *, before: datetime, sha256: Optional[str] = None) -> list[tuple[str, str]]:
    """``(sha256, relpath)`` of uploads that no prediction newer than ``before`` shows and no prediction of
    which got a rating or a correction: what the retention job may delete the image file of (the rows stay).
    An old picture uploaded again is kept from its new prediction on. ``sha256``: that upload only."""
    _check_aware("before", before)
    rated = select(Prediction.image_sha256).where(
        or_(Prediction.id.in_(select(Rating.prediction_id)), Prediction.id.in_(select(Correction.prediction_id))))
    recent = select(Prediction.image_sha256).where(Prediction.created_at >= before)
    query = select(Upload.sha256, Upload.relpath).where(
        Upload.created_at < before, Upload.sha256.not_in(rated), Upload.sha256.not_in(recent))
    if sha256 is not None:
        query = query.where(Upload.sha256 == sha256)
    return [(sha, relpath) for sha, relpath in s.execute(query.order_by(Upload.created_at))]


def upload_digests(s: Session) -> list[str]:
    """The sha256 of every stored upload (a load test takes back its pictures' cache entries with them)."""
    return list(s.scalars(select(Upload.sha256).order_by(Upload.created_at)))


def lock_upload(s: Session, sha256: str) -> Optional[str]:
    """Lock the upload row for the rest of the transaction (a prediction of it being stored at the same
    time waits on its foreign key, on Postgres; SQLite's write transaction already excludes it); its relpath."""
    return s.scalar(select(Upload.relpath).where(Upload.sha256 == _check_sha256("sha256", sha256)).with_for_update())


# --- queries for the operator tables ----------------------------------------------------------


def output_summary(outputs: dict[str, Any]) -> str:
    """The one string a table shows for a prediction: its caption or its meme label."""
    for key in ("caption", "label"):
        if isinstance(outputs.get(key), str):
            return outputs[key]
    return ""


def recent_predictions(s: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Newest predictions first, flat dicts (one per row of a table) with feedback counts."""
    _check_limit(limit)
    n_ratings = select(func.count(Rating.id)).where(Rating.prediction_id == Prediction.id).scalar_subquery()
    n_corrections = (
        select(func.count(Correction.id)).where(Correction.prediction_id == Prediction.id).scalar_subquery()
    )
    rows = s.execute(
        select(Prediction, n_ratings, n_corrections).order_by(Prediction.id.desc()).limit(limit)
    ).all()
    return [
        {
            "id": p.id,
            "created_at": p.created_at,
            "kind": p.kind,
            "output": output_summary(p.outputs),
            "input_text": p.input_text,
            "ablation": p.ablation,
            "model_version": p.model_version,
            "latency_ms": p.latency_ms,
            "image_sha256": p.image_sha256,
            "session_id": p.session_id,
            "user": p.user,
            "n_ratings": nr,
            "n_corrections": nc,
        }
        for p, nr, nc in rows
    ]


def recent_feedback(s: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Ratings and corrections merged, newest first; every dict has the same keys (None where n/a)."""
    _check_limit(limit)
    ratings = s.execute(
        select(Rating, Prediction.kind).join(Rating.prediction).order_by(Rating.created_at.desc(), Rating.id.desc()).limit(limit)
    ).all()
    corrections = s.execute(
        select(Correction, Prediction.kind)
        .join(Correction.prediction)
        .order_by(Correction.created_at.desc(), Correction.id.desc())
        .limit(limit)
    ).all()
    blank = dict.fromkeys((*RATING_SCORES, "comment", "field", "value", "status"))
    merged = [
        {
            **blank,
            "type": "rating",
            "id": r.id,
            "created_at": r.created_at,
            "prediction_id": r.prediction_id,
            "kind": kind,
            "session_id": r.session_id,
            "user": r.user,
            "coherence": r.coherence,
            "relevance": r.relevance,
            "detail": r.detail,
            "comment": r.comment,
        }
        for r, kind in ratings
    ] + [
        {
            **blank,
            "type": "correction",
            "id": c.id,
            "created_at": c.created_at,
            "prediction_id": c.prediction_id,
            "kind": kind,
            "session_id": c.session_id,
            "user": c.user,
            "field": c.field,
            "value": c.value,
            "status": c.status,
        }
        for c, kind in corrections
    ]
    merged.sort(key=lambda row: (row["created_at"], row["type"], row["id"]), reverse=True)
    return merged[:limit]


def _utc_day(s: Session, column: InstrumentedAttribute[datetime]) -> Any:
    """SQL expression for the UTC calendar day of ``column`` as 'YYYY-MM-DD'."""
    if s.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.date(column)  # SQLite stores naive UTC text, so date() is the UTC day


def counts_per_day(s: Session, days: int = 30, *, now: Optional[datetime] = None) -> list[dict[str, Any]]:
    """Predictions, ratings and corrections per UTC day for the last ``days`` days (oldest first, zeros kept)."""
    _check_limit(days)
    today = (_check_aware("now", now) or utcnow()).astimezone(timezone.utc).date()
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
    table = {
        (first + timedelta(days=i)).isoformat(): {"predictions": 0, "ratings": 0, "corrections": 0}
        for i in range(days)
    }
    for name, model in (("predictions", Prediction), ("ratings", Rating), ("corrections", Correction)):
        day = _utc_day(s, model.created_at)
        for d, n in s.execute(select(day, func.count()).where(model.created_at >= since).group_by(day)):
            if str(d) in table:
                table[str(d)][name] = n
    return [{"day": d, **counts} for d, counts in table.items()]


def counts_per_label(s: Session) -> list[dict[str, Any]]:
    """Meme predictions counted by (predicted label, corrected label).

    The corrected label is a prediction's latest non-rejected label correction, None when nobody
    corrected it; rows with predicted == corrected are confirmations. Most frequent pairs first.
    """
    latest = (
        select(Correction.prediction_id, func.max(Correction.id).label("correction_id"))
        .where(Correction.field == "label", Correction.status != "rejected")
        .group_by(Correction.prediction_id)
        .subquery()
    )
    fix = aliased(Correction)
    predicted = Prediction.outputs["label"].as_string()
    n = func.count(Prediction.id)
    rows = s.execute(
        select(predicted, fix.value, n)
        .select_from(Prediction)
        .outerjoin(latest, latest.c.prediction_id == Prediction.id)
        .outerjoin(fix, fix.id == latest.c.correction_id)
        .where(Prediction.kind == "meme")
        .group_by(predicted, fix.value)
    ).all()
    table = [{"predicted_label": p, "corrected_label": c, "n": count} for p, c, count in rows]
    table.sort(key=lambda r: (-r["n"], str(r["predicted_label"]), str(r["corrected_label"])))
    return table


def corrections_since(
    s: Session,
    since: str | datetime | None = None,
    *,
    statuses: Optional[Iterable[str]] = None,
    users: Optional[Iterable[str]] = None,
    images: Optional[Iterable[str]] = None,
) -> list[dict[str, Any]]:
    """Corrections created after ``since`` (a datetime, or a registered version name meaning "after
    that version was created"; None = all), each joined with its prediction and image. Oldest first.
    ``statuses`` restricts to e.g. ``("new",)``, ``users`` to those account names, ``images`` to those
    image sha256s (queried in chunks, so any number may be given)."""
    query = (
        select(Correction, Prediction, Upload)
        .join(Correction.prediction)
        .join(Prediction.upload)
        .order_by(Correction.id)
    )
    if isinstance(since, str):
        version = get_version(s, since)
        if version is None:
            raise ValueError(f"unknown model version {since!r}")
        query = query.where(Correction.created_at > version.created_at)
    elif isinstance(since, datetime):
        query = query.where(Correction.created_at > _check_aware("since", since))
    elif since is not None:
        raise ValueError(f"since must be a version name, an aware datetime or None, got {since!r}")
    if statuses is not None:
        statuses = tuple(statuses)
        for status in statuses:
            _check_one_of("status", status, CORRECTION_STATUSES)
        query = query.where(Correction.status.in_(statuses))
    if users is not None:
        query = query.where(Correction.user.in_(list(users)))
    if images is None:
        queries = [query]
    else:
        images = sorted(set(images))
        queries = [query.where(Prediction.image_sha256.in_(images[i:i + _IN_CHUNK]))
                   for i in range(0, len(images), _IN_CHUNK)]
    rows = [
        {
            "correction_id": c.id,
            "field": c.field,
            "value": c.value,
            "status": c.status,
            "created_at": c.created_at,
            "session_id": c.session_id,
            "user": c.user,
            "prediction_id": p.id,
            "kind": p.kind,
            "outputs": p.outputs,
            "input_text": p.input_text,
            "ablation": p.ablation,
            "model_version": p.model_version,
            "embedding_ref": p.embedding_ref,
            "image_sha256": u.sha256,
            "image_relpath": u.relpath,
            "image_format": u.format,
            "width": u.width,
            "height": u.height,
        }
        for q in queries
        for c, p, u in s.execute(q)
    ]
    return rows if len(queries) == 1 else sorted(rows, key=lambda r: r["correction_id"])


def mark_corrections(
    s: Session, correction_ids: Iterable[int], *, status: str, used_in_version: Optional[str] = None
) -> int:
    """Set the status of corrections (e.g. 'used' by a retrain that produced ``used_in_version``); returns rows changed."""
    _check_one_of("status", status, CORRECTION_STATUSES)
    ids = list(correction_ids)
    if not ids:
        return 0
    result = s.execute(
        update(Correction)
        .where(Correction.id.in_(ids))
        .values(status=status, used_in_version=used_in_version)
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount


# --- queries for retraining and its report ----------------------------------------------------


def used_caption_corrections(s: Session) -> list[str]:
    """Distinct values of caption corrections a retrain accepted (status 'used'), oldest first."""
    rows = s.scalars(
        select(Correction.value)
        .where(Correction.field == "caption", Correction.status == "used")
        .order_by(Correction.id)
    )
    return list(dict.fromkeys(rows))


def latest_ocr_text(s: Session, prediction_ids: Iterable[int]) -> dict[int, str]:
    """For each prediction that has one, the value of its latest non-rejected 'ocr_text' correction."""
    ids = list(prediction_ids)
    if not ids:
        return {}
    latest = (
        select(Correction.prediction_id, func.max(Correction.id).label("correction_id"))
        .where(Correction.field == "ocr_text", Correction.status != "rejected", Correction.prediction_id.in_(ids))
        .group_by(Correction.prediction_id)
        .subquery()
    )
    rows = s.execute(
        select(Correction.prediction_id, Correction.value).join(latest, Correction.id == latest.c.correction_id)
    )
    return {prediction_id: value for prediction_id, value in rows}


def well_rated_captions(s: Session, *, min_rating: float) -> list[dict[str, Any]]:
    """Caption predictions nobody corrected whose ratings average at least ``min_rating``, by prediction id.

    A rating's score is the mean of its coherence and relevance (either one alone if the other is
    missing); ratings with neither are ignored. ``rated_at`` is the latest rating's time; ``user`` and
    ``session_id`` are the first rater's.
    """
    corrected = select(Correction.prediction_id).where(Correction.field == "caption")
    score = (
        func.coalesce(Rating.coherence, Rating.relevance) + func.coalesce(Rating.relevance, Rating.coherence)
    ) / 2.0
    rows = s.execute(
        select(Prediction, Upload, func.avg(score), func.max(Rating.created_at), func.min(Rating.id))
        .join(Rating, Rating.prediction_id == Prediction.id)
        .join(Upload, Upload.sha256 == Prediction.image_sha256)
        .where(
            Prediction.kind == "caption",
            Prediction.id.not_in(corrected),
            Rating.coherence.is_not(None) | Rating.relevance.is_not(None),
        )
        .group_by(Prediction.id, Upload.sha256)
        .having(func.avg(score) >= min_rating)
        .order_by(Prediction.id)
    ).all()
    out = []
    for p, u, mean_score, rated_at, first_rating_id in rows:
        first = s.get(Rating, first_rating_id)
        out.append(
            {
                "prediction_id": p.id,
                "outputs": p.outputs,
                "model_version": p.model_version,
                "image_sha256": u.sha256,
                "image_relpath": u.relpath,
                "mean_score": float(mean_score),
                "rated_at": rated_at,
                "user": first.user,
                "session_id": first.session_id,
            }
        )
    return out


def ratings_with_outputs(s: Session) -> list[dict[str, Any]]:
    """Every rating with what was rated (its prediction's version, kind, image, ablation and output), oldest first."""
    rows = s.execute(select(Rating, Prediction).join(Rating.prediction).order_by(Rating.id)).all()
    return [
        {
            "rating_id": r.id,
            "prediction_id": r.prediction_id,
            "model_version": p.model_version,
            "kind": p.kind,
            "image_sha256": p.image_sha256,
            "ablation": p.ablation,
            "output": output_summary(p.outputs),
            "user": r.user,
            "session_id": r.session_id,
            "created_at": r.created_at,
            **{score: getattr(r, score) for score in RATING_SCORES},
        }
        for r, p in rows
    ]


def correction_counts_per_version(s: Session) -> dict[str, dict[str, Any]]:
    """Per model version that made predictions: how many it made, how many of them received at least
    one correction, and corrections per field. Versions in name order."""
    predictions = dict(
        s.execute(select(Prediction.model_version, func.count(Prediction.id)).group_by(Prediction.model_version)).all()
    )
    corrected = dict(
        s.execute(
            select(Prediction.model_version, func.count(func.distinct(Correction.prediction_id)))
            .join(Correction.prediction)
            .group_by(Prediction.model_version)
        ).all()
    )
    by_field: dict[str, dict[str, int]] = {}
    for version, field, n in s.execute(
        select(Prediction.model_version, Correction.field, func.count(Correction.id))
        .join(Correction.prediction)
        .group_by(Prediction.model_version, Correction.field)
    ):
        by_field.setdefault(version, {})[field] = n
    return {
        version: {
            "predictions": n,
            "corrected_predictions": corrected.get(version, 0),
            "by_field": by_field.get(version, {}),
        }
        for version, n in sorted(predictions.items())
    }


def corrections_with_outputs(
    s: Session,
    *,
    correction_ids: Optional[Iterable[int]] = None,
    used_in_version: Optional[str] = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Corrections beside what the model had said, oldest first, at most ``limit``. ``correction_ids``
    restricts to those ids (an empty list matches none); ``used_in_version`` to corrections a retrain
    used for that version. Both filters apply together."""
    _check_limit(limit)
    query = select(Correction, Prediction).join(Correction.prediction)
    if correction_ids is not None:
        query = query.where(Correction.id.in_(list(correction_ids)))
    if used_in_version is not None:
        query = query.where(Correction.used_in_version == used_in_version)
    return [
        {
            "correction_id": c.id,
            "field": c.field,
            "value": c.value,
            "status": c.status,
            "used_in_version": c.used_in_version,
            "user": c.user,
            "session_id": c.session_id,
            "prediction_id": p.id,
            "kind": p.kind,
            "output": output_summary(p.outputs),
            "input_text": p.input_text,
            "model_version": p.model_version,
        }
        for c, p in s.execute(query.order_by(Correction.id).limit(limit))
    ]


# --- model registry ---------------------------------------------------------------------------


def register_version(
    s: Session,
    *,
    version: str,
    path: str,
    sha256: str,
    parent_version: Optional[str] = None,
    metrics: Optional[dict[str, Any]] = None,
    manifest: Optional[dict[str, Any]] = None,
    report_path: Optional[str] = None,
    status: str = "candidate",
) -> ModelVersion:
    """Add a model version (not current). Registering the same version with the same sha256 again
    returns the existing row; the same name with different weights is refused."""
    _check_key("version", version, 64)
    _check_key("path", path, 1024)
    _check_sha256("sha256", sha256)
    _check_one_of("status", status, ("candidate", "rejected"))
    if parent_version is not None and get_version(s, parent_version) is None:
        raise ValueError(f"unknown parent_version {parent_version!r}")
    row, created = _get_or_insert(
        s,
        ModelVersion,
        ModelVersion.version,
        version,
        lambda: ModelVersion(
            version=version,
            path=path,
            sha256=sha256,
            parent_version=parent_version,
            status=status,
            is_current=False,
            metrics=dict(metrics or {}),
            manifest=dict(manifest or {}),
            report_path=report_path,
            created_at=utcnow(),
        ),
    )
    if not created:
        _same_request(row, version, sha256=sha256)
    return row


def get_version(s: Session, version: str) -> Optional[ModelVersion]:
    return _find(s, ModelVersion, ModelVersion.version, version)


def _require_version(s: Session, version: str) -> ModelVersion:
    row = get_version(s, version)
    if row is None:
        known = s.scalars(select(ModelVersion.version).order_by(ModelVersion.id)).all()
        raise ValueError(f"unknown model version {version!r}; registered: {known}")
    return row


def current_version(s: Session) -> Optional[ModelVersion]:
    return s.scalars(select(ModelVersion).where(ModelVersion.is_current.is_(True))).one_or_none()


def list_versions(s: Session) -> list[ModelVersion]:
    """All versions, newest first."""
    return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def _make_current(s: Session, target: ModelVersion) -> ModelVersion:
    # Clear the old flag in its own statement first: the partial unique index allows one current row.
    s.execute(
        update(ModelVersion)
        .where(ModelVersion.is_current.is_(True), ModelVersion.id != target.id)
        .values(is_current=False, status="retired")
        .execution_options(synchronize_session="fetch")
    )
    s.execute(
        update(ModelVersion)
        .where(ModelVersion.id == target.id)
        .values(is_current=True, status="promoted", promoted_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    return target


def promote(s: Session, version: str) -> ModelVersion:
    """Make ``version`` the one current model; the previous current one becomes 'retired'."""
    target = _require_version(s, version)
    if target.status == "rejected":
        raise ValueError(f"model version {version!r} was rejected and cannot be promoted")
    if target.is_current:
        return target
    return _make_current(s, target)


def rollback_to(s: Session, version: Optional[str] = None) -> ModelVersion:
    """Make an earlier, previously promoted version current again (default: the one promoted most
    recently before the current one). The version rolled back from becomes 'retired'."""
    if version is None:
        target = s.scalars(
            select(ModelVersion)
            .where(ModelVersion.is_current.is_(False), ModelVersion.promoted_at.is_not(None))
            .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
            .limit(1)
        ).one_or_none()
        if target is None:
            raise ValueError("no earlier promoted model version to roll back to")
    else:
        target = _require_version(s, version)
        if target.promoted_at is None:
            raise ValueError(f"model version {version!r} was never promoted (status {target.status!r}); use promote()")
        if target.status == "rejected":
            raise ValueError(f"model version {version!r} was rejected and cannot be made current")
    if target.is_current:
        return target
    return _make_current(s, target)


def reject_version(s: Session, version: str) -> ModelVersion:
    """Mark a candidate (or an old version) rejected so it is never promoted."""
    target = _require_version(s, version)
    if target.is_current:
        raise ValueError(f"model version {version!r} is current; roll back or promote another first")
    target.status = "rejected"
    return target


# --- cross-process locks ----------------------------------------------------------------------


def try_acquire_lock(s: Session, name: str, owner: str, ttl_s: float, *, now: Optional[datetime] = None) -> bool:
    """Take the lease ``name`` for ``owner`` for ``ttl_s`` seconds if it is free, expired or already
    ``owner``'s (then it is extended). Returns whether ``owner`` holds it.

    Correct across processes on SQLite and Postgres: the take-over is one conditional UPDATE, the
    first acquisition an INSERT whose primary-key violation means someone else won. Commit right
    away: the lease counts only once the transaction is committed.
    """
    _check_key("lock name", name, 64)
    _check_key("owner", owner)
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
    now = _check_aware("now", now) or utcnow()
    expires_at = now + timedelta(seconds=ttl_s)
    taken = s.execute(
        update(Lock)
        .where(Lock.name == name, or_(Lock.expires_at <= now, Lock.owner == owner))
        .values(owner=owner, acquired_at=now, expires_at=expires_at)
        .execution_options(synchronize_session="fetch")
    )
    if taken.rowcount == 1:
        return True
    try:
        with s.begin_nested():
            s.add(Lock(name=name, owner=owner, acquired_at=now, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


def refresh_lock(s: Session, name: str, owner: str, ttl_s: float, *, now: Optional[datetime] = None) -> bool:
    """Extend ``owner``'s lease; False if someone else has taken it (stop working then)."""
    now = _check_aware("now", now) or utcnow()
    result = s.execute(
        update(Lock)
        .where(Lock.name == name, Lock.owner == owner)
        .values(expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


def release_lock(s: Session, name: str, owner: str) -> bool:
    """Drop ``owner``'s lease; False if it was not theirs (already expired and taken over)."""
    result = s.execute(
        delete(Lock).where(Lock.name == name, Lock.owner == owner).execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


def lock_holder(s: Session, name: str, *, now: Optional[datetime] = None) -> Optional[Lock]:
    """The unexpired lease ``name``, or None."""
    now = _check_aware("now", now) or utcnow()
    return s.scalars(select(Lock).where(Lock.name == name, Lock.expires_at > now)).one_or_none()


# --- scheduler state --------------------------------------------------------------------------


def get_scheduler_state(s: Session, name: str) -> Optional[datetime]:
    """The scheduled slot job ``name`` last fired for, or None if it never ran."""
    row = s.get(SchedulerState, name)
    return row.last_fired_for if row is not None else None


def set_scheduler_state(s: Session, name: str, last_fired_for: datetime) -> None:
    """Record unconditionally that job ``name`` ran for slot ``last_fired_for``."""
    _check_key("scheduler name", name, 64)
    _check_aware("last_fired_for", last_fired_for)
    updated = s.execute(
        update(SchedulerState)
        .where(SchedulerState.name == name)
        .values(last_fired_for=last_fired_for, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    if updated.rowcount == 0:
        row, created = _get_or_insert(
            s,
            SchedulerState,
            SchedulerState.name,
            name,
            lambda: SchedulerState(name=name, last_fired_for=last_fired_for, updated_at=utcnow()),
        )
        if not created:  # another process inserted it between our UPDATE and INSERT
            row.last_fired_for, row.updated_at = last_fired_for, utcnow()


def claim_scheduled_slot(s: Session, name: str, slot: datetime) -> bool:
    """Atomically record that job ``name`` fires for ``slot`` if no process has fired for it (or a
    later slot) yet. True means the caller should run the job; every other caller gets False."""
    _check_key("scheduler name", name, 64)
    _check_aware("slot", slot)
    advanced = s.execute(
        update(SchedulerState)
        .where(SchedulerState.name == name, SchedulerState.last_fired_for < slot)
        .values(last_fired_for=slot, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    if advanced.rowcount == 1:
        return True
    try:
        with s.begin_nested():
            s.add(SchedulerState(name=name, last_fired_for=slot, updated_at=utcnow()))
    except IntegrityError:
        return False  # the row exists with a slot >= ours, or a concurrent caller just created it
    return True


# --- retrain bookkeeping ----------------------------------------------------------------------


def start_retrain_run(s: Session, *, trigger: str, owner: str, message: str = "") -> RetrainRun:
    _check_one_of("trigger", trigger, RUN_TRIGGERS)
    _check_key("owner", owner)
    now = utcnow()
    run = RetrainRun(
        trigger=trigger, status="running", owner=owner, message=message, started_at=now, heartbeat_at=now, progress=0.0, stats={}
    )
    s.add(run)
    s.flush()
    return run


def _require_run(s: Session, run_id: int) -> RetrainRun:
    run = s.get(RetrainRun, run_id)
    if run is None:
        raise ValueError(f"unknown retrain run id {run_id!r}")
    return run


def update_retrain_run(
    s: Session,
    run_id: int,
    *,
    progress: Optional[float] = None,
    message: Optional[str] = None,
    candidate_version: Optional[str] = None,
    stats: Optional[dict[str, Any]] = None,
) -> RetrainRun:
    """Report progress; also the heartbeat that tells others the run is alive."""
    run = _require_run(s, run_id)
    if progress is not None:
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be within [0, 1], got {progress!r}")
        run.progress = float(progress)
    if message is not None:
        run.message = message
    if candidate_version is not None:
        run.candidate_version = candidate_version
    if stats is not None:
        run.stats = {**run.stats, **stats}
    run.heartbeat_at = utcnow()
    return run


def finish_retrain_run(
    s: Session,
    run_id: int,
    *,
    status: str,
    message: Optional[str] = None,
    report_path: Optional[str] = None,
    candidate_version: Optional[str] = None,
    stats: Optional[dict[str, Any]] = None,
) -> RetrainRun:
    _check_one_of("status", status, tuple(st for st in RUN_STATUSES if st != "running"))
    run = update_retrain_run(s, run_id, message=message, candidate_version=candidate_version, stats=stats)
    run.status = status
    run.finished_at = run.heartbeat_at
    if status in ("succeeded", "promoted"):
        run.progress = 1.0
    if report_path is not None:
        run.report_path = report_path
    return run


def recent_retrain_runs(s: Session, limit: int = 20) -> list[RetrainRun]:
    _check_limit(limit)
    return list(s.scalars(select(RetrainRun).order_by(RetrainRun.id.desc()).limit(limit)))


def all_retrain_runs(s: Session) -> list[RetrainRun]:
    """Every retrain run, oldest first."""
    return list(s.scalars(select(RetrainRun).order_by(RetrainRun.id)))


def latest_run_for_candidate(s: Session, version: str) -> Optional[RetrainRun]:
    """The newest retrain run whose candidate was ``version`` (registered or refused), or None."""
    return s.scalars(
        select(RetrainRun).where(RetrainRun.candidate_version == version).order_by(RetrainRun.id.desc()).limit(1)
    ).one_or_none()


def set_run_report_path(s: Session, run_id: int, path: str, *, version: Optional[str] = None) -> RetrainRun:
    """Record where the run's report was written, and on the registered ``version`` too when given
    (a version name that is not registered is left alone: a refused candidate has no row)."""
    _check_key("report_path", path, 1024)
    run = _require_run(s, run_id)
    run.report_path = path
    if version is not None:
        row = get_version(s, version)
        if row is not None:
            row.report_path = path
    return run


def fail_stale_retrain_runs(s: Session, *, older_than_s: float, now: Optional[datetime] = None) -> int:
    """Mark 'running' runs whose heartbeat is older than ``older_than_s`` as failed (their worker died)."""
    now = _check_aware("now", now) or utcnow()
    result = s.execute(
        update(RetrainRun)
        .where(RetrainRun.status == "running", RetrainRun.heartbeat_at < now - timedelta(seconds=older_than_s))
        .values(status="failed", finished_at=now, message="worker stopped sending heartbeats")
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount


def fail_runs_of_dead_owner(s: Session, owner_prefix: str, *, message: str) -> int:
    """A worker process known to be dead (its supervisor saw it exit): mark its 'running' runs failed
    and drop every lease it held at once, instead of waiting for the heartbeat and lease to expire.
    ``owner_prefix`` is ``host:pid:`` of that process. Returns the runs marked."""
    _check_key("owner prefix", owner_prefix)
    pattern = owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    now = utcnow()
    result = s.execute(
        update(RetrainRun)
        .where(RetrainRun.status == "running", RetrainRun.owner.like(pattern, escape="\\"))
        .values(status="failed", finished_at=now, message=message[:2000])
        .execution_options(synchronize_session="fetch")
    )
    s.execute(delete(Lock).where(Lock.owner.like(pattern, escape="\\")).execution_options(synchronize_session="fetch"))
    return result.rowcount


def record_rejected_item(
    s: Session, *, run_id: int, reason: str, correction_id: Optional[int] = None, detail: Optional[dict[str, Any]] = None
) -> RejectedItem:
    _require_run(s, run_id)
    _check_key("reason", reason, 64)
    if correction_id is not None and s.get(Correction, correction_id) is None:
        raise ValueError(f"unknown correction id {correction_id!r}")
    item = RejectedItem(run_id=run_id, correction_id=correction_id, reason=reason, detail=dict(detail or {}))
    s.add(item)
    s.flush()
    return item


def rejected_items(
    s: Session, *, run_id: Optional[int] = None, correction_ids: Optional[Iterable[int]] = None
) -> list[RejectedItem]:
    """Items retrain runs held back, in the order they were recorded; ``run_id`` restricts to one run,
    ``correction_ids`` to those corrections (an empty list matches none)."""
    query = select(RejectedItem).order_by(RejectedItem.id)
    if run_id is not None:
        query = query.where(RejectedItem.run_id == run_id)
    if correction_ids is not None:
        query = query.where(RejectedItem.correction_id.in_(list(correction_ids)))
    return list(s.scalars(query))


# --- rater accounts, login attempts, login sessions -------------------------------------------

_RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def check_rater_name(name: Any) -> str:
    if not isinstance(name, str) or not _RATER_NAME.fullmatch(name):
        raise ValueError("a rater name is 1-64 characters from A-Z a-z 0-9 . _ @ -, starting with a letter or "
                         f"digit, got {str(name)[:40]!r}")
    return name


def create_rater(s: Session, *, name: str, role: str, password_hash: str, created_by: Optional[str] = None) -> Rater:
    """A new account; ValueError if the name is taken (names are never reused for another person)."""
    check_rater_name(name)
    _check_one_of("role", role, RATER_ROLES)
    _check_key("password_hash", password_hash, 255)
    if get_rater(s, name) is not None:
        raise ValueError(f"a rater named {name!r} already exists")
    row = Rater(name=name, role=role, password_hash=password_hash, created_by=created_by)
    s.add(row)
    s.flush()
    return row


def get_rater(s: Session, name: str) -> Optional[Rater]:
    return s.scalars(select(Rater).where(Rater.name == name)).one_or_none()


def _require_rater(s: Session, name: str) -> Rater:
    row = get_rater(s, name)
    if row is None:
        raise ValueError(f"no rater named {name!r}")
    return row


def list_raters(s: Session) -> list[Rater]:
    return list(s.scalars(select(Rater).order_by(Rater.name)))


def update_rater(s: Session, name: str, *, role: Optional[str] = None, password_hash: Optional[str] = None,
                 disabled: Optional[bool] = None, now: Optional[datetime] = None) -> Rater:
    """Change an account's role, password or disabled flag. A new password, a role change or disabling
    ends the account's open login sessions; a new password also clears its lockout."""
    row = _require_rater(s, name)
    now = _check_aware("now", now) or utcnow()
    if role is not None:
        _check_one_of("role", role, RATER_ROLES)
        row.role = role
    if password_hash is not None:
        row.password_hash = _check_key("password_hash", password_hash, 255)
        row.failed_logins, row.locked_until = 0, None
    if disabled is not None:
        row.disabled_at = now if disabled else None
    s.flush()
    revoke_rater_sessions(s, row.id, now=now)
    return row


def unlock_rater(s: Session, name: str) -> Rater:
    row = _require_rater(s, name)
    row.failed_logins, row.locked_until = 0, None
    s.flush()
    return row


def record_login_attempt(s: Session, *, name: str, outcome: str, rater: Optional[Rater] = None,
                         locked_until: Optional[datetime] = None, now: Optional[datetime] = None) -> LoginAttempt:
    """Log one login try and update the account's failure count (reset on success, +1 on a wrong
    password, with ``locked_until`` as the policy decided)."""
    _check_one_of("outcome", outcome, LOGIN_OUTCOMES)
    now = _check_aware("now", now) or utcnow()
    if rater is not None:
        if outcome == "ok":
            rater.failed_logins, rater.locked_until, rater.last_login_at = 0, None, now
        elif outcome == "wrong_password":
            rater.failed_logins += 1
            rater.locked_until = _check_aware("locked_until", locked_until)
    row = LoginAttempt(name=str(name)[:64], rater_id=rater.id if rater is not None else None, outcome=outcome,
                       created_at=now)
    s.add(row)
    s.flush()
    return row


def login_attempts(s: Session, *, name: Optional[str] = None, limit: int = 100) -> list[LoginAttempt]:
    query = select(LoginAttempt).order_by(LoginAttempt.id.desc()).limit(_check_limit(limit))
    if name is not None:
        query = query.where(LoginAttempt.name == name)
    return list(s.scalars(query))


def delete_login_attempts(s: Session, *, before: datetime, limit: int = 10_000) -> int:
    """Delete at most ``limit`` login-log rows older than ``before`` (oldest first); returns how many.
    Batches keep each write transaction short on a log a guessing script has filled."""
    before = _check_aware("before", before)
    ids = list(s.scalars(select(LoginAttempt.id).where(LoginAttempt.created_at < before)
                         .order_by(LoginAttempt.id).limit(_check_limit(limit))))
    if ids:
        s.execute(delete(LoginAttempt).where(LoginAttempt.id.in_(ids)))
    return len(ids)


def create_auth_session(s: Session, *, token_sha256: str, rater: Rater, expires_at: datetime,
                        now: Optional[datetime] = None) -> AuthSession:
    _check_sha256("token_sha256", token_sha256)
    now = _check_aware("now", now) or utcnow()
    row = AuthSession(token_sha256=token_sha256, rater_id=rater.id, created_at=now, last_seen_at=now,
                      expires_at=_check_aware("expires_at", expires_at))
    s.add(row)
    s.flush()
    return row


def session_rater(s: Session, token_sha256: str, *, idle_s: float,
                  now: Optional[datetime] = None) -> Optional[tuple[Rater, AuthSession]]:
    """The account a login session belongs to (with the session row), or None when the session is
    unknown, revoked, past its absolute expiry, idle longer than ``idle_s``, or its account is
    disabled. Reads only: the caller moves ``last_seen_at`` forward with :func:`touch_auth_session`."""
    if not isinstance(token_sha256, str) or not _SHA256.fullmatch(token_sha256):
        return None
    now = _check_aware("now", now) or utcnow()
    row = s.get(AuthSession, token_sha256)
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    if (now - row.last_seen_at).total_seconds() > idle_s:
        return None
    rater = s.get(Rater, row.rater_id)
    if rater is None or rater.disabled_at is not None:
        return None
    return rater, row


def touch_auth_session(s: Session, token_sha256: str, *, now: Optional[datetime] = None) -> None:
    """Mark a session as used now (its idle clock restarts)."""
    now = _check_aware("now", now) or utcnow()
    s.execute(update(AuthSession).where(AuthSession.token_sha256 == _check_sha256("token_sha256", token_sha256),
                                        AuthSession.last_seen_at < now).values(last_seen_at=now))


def revoke_auth_session(s: Session, token_sha256: str, *, now: Optional[datetime] = None) -> bool:
    now = _check_aware("now", now) or utcnow()
    row = s.get(AuthSession, token_sha256) if _SHA256.fullmatch(str(token_sha256)) else None
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now
    s.flush()
    return True


def revoke_rater_sessions(s: Session, rater_id: int, *, now: Optional[datetime] = None) -> int:
    now = _check_aware("now", now) or utcnow()
    result = s.execute(update(AuthSession).where(AuthSession.rater_id == rater_id, AuthSession.revoked_at.is_(None))
                       .values(revoked_at=now))
    return result.rowcount or 0


def purge_auth_sessions(s: Session, *, before: datetime) -> int:
    """Delete sessions that ended (expired or revoked) before ``before``."""
    _check_aware("before", before)
    result = s.execute(delete(AuthSession).where(or_(AuthSession.expires_at < before, AuthSession.revoked_at < before)))
    return result.rowcount or 0


def rater_roles(s: Session) -> dict[str, str]:
    """Role of every enabled account by name; names not listed are anonymous (or disabled) for cleaning."""
    rows = s.execute(select(Rater.name, Rater.role).where(Rater.disabled_at.is_(None))).all()
    return {name: role for name, role in rows}


def feedback_counts_per_rater(s: Session) -> list[dict[str, Any]]:
    """Per account: role, ratings, corrections (all, used, rejected), last feedback time; anonymous sessions
    are one row ("(anonymous)")."""
    out: dict[str, dict[str, Any]] = {}
    roles = {r.name: r for r in list_raters(s)}

    def entry(user: Optional[str]) -> dict[str, Any]:
        key = user if user in roles else "(anonymous)" if user is None else user
        if key not in out:
            r = roles.get(key)
            out[key] = {"user": key, "role": r.role if r else ("anonymous" if user is None else "unknown"),
                        "disabled": bool(r and r.disabled_at), "ratings": 0, "corrections": 0, "used": 0,
                        "rejected": 0}
        return out[key]

    for user, n in s.execute(select(Rating.user, func.count()).group_by(Rating.user)).all():
        entry(user)["ratings"] += n
    for user, status, n in s.execute(select(Correction.user, Correction.status, func.count())
                                     .group_by(Correction.user, Correction.status)).all():
        e = entry(user)
        e["corrections"] += n
        if status in ("used", "rejected"):
            e[status] += n
    for name in roles:
        entry(name)
    return sorted(out.values(), key=lambda e: (e["user"] == "(anonymous)", e["user"]))


# --- blind before/after comparison (issue 10, item 4) -------------------------------------------


def add_blind_pairs(s: Session, *, run_id: int, candidate_version: str, current_version: str,
                    pairs: Iterable[dict[str, str]]) -> list[BlindPair]:
    """Store comparison pairs of one run. Each pair: ``item_id``, ``image_sha256``, ``image_relpath``,
    ``output_a``, ``output_b``, ``candidate_side`` ('a' | 'b'). All or nothing: a bad pair raises before any is added."""
    _require_run(s, run_id)
    _check_key("candidate_version", candidate_version, 64)
    _check_key("current_version", current_version, 64)
    rows = []
    for p in pairs:
        _check_one_of("candidate_side", p["candidate_side"], BLIND_SIDES)
        _check_key("item_id", p["item_id"], 64)
        _check_sha256("image_sha256", p["image_sha256"])
        _check_key("image_relpath", p["image_relpath"], 1024)
        for side in ("output_a", "output_b"):
            if not isinstance(p[side], str) or not p[side].strip():
                raise ValueError(f"{side} must be a non-empty string, got {p[side]!r}")
        rows.append(BlindPair(run_id=run_id, candidate_version=candidate_version, current_version=current_version,
                              item_id=p["item_id"], image_sha256=p["image_sha256"], image_relpath=p["image_relpath"],
                              output_a=p["output_a"], output_b=p["output_b"], candidate_side=p["candidate_side"]))
    s.add_all(rows)
    s.flush()
    return rows


def get_blind_pair(s: Session, pair_id: int) -> Optional[BlindPair]:
    return s.get(BlindPair, pair_id)


def next_blind_pair(s: Session, *, rater: str) -> Optional[BlindPair]:
    """A pair ``rater`` has not voted on, of a version still open to judgement (held candidate or
    promoted, not rejected or retired): held candidates first, then the pair with the fewest votes."""
    _check_key("rater", rater, 96)
    voted = select(BlindVote.pair_id).where(BlindVote.rater == rater)
    votes = (select(BlindVote.pair_id, func.count().label("n")).group_by(BlindVote.pair_id).subquery())
    held_first = (ModelVersion.status != "candidate")  # False sorts first
    return s.scalars(
        select(BlindPair)
        .join(ModelVersion, ModelVersion.version == BlindPair.candidate_version)
        .outerjoin(votes, votes.c.pair_id == BlindPair.id)
        .where(ModelVersion.status.in_(("candidate", "promoted")), BlindPair.id.not_in(voted))
        .order_by(held_first, func.coalesce(votes.c.n, 0), BlindPair.id)
        .limit(1)
    ).first()


def record_blind_vote(s: Session, *, pair_id: int, rater: str, choice: str) -> tuple[BlindVote, bool]:
    """One vote per rater per pair: returns ``(vote, created)``; a second vote leaves the first standing."""
    _check_key("rater", rater, 96)
    _check_one_of("choice", choice, BLIND_CHOICES)
    if s.get(BlindPair, pair_id) is None:
        raise ValueError(f"unknown blind pair {pair_id!r}")
    query = select(BlindVote).where(BlindVote.pair_id == pair_id, BlindVote.rater == rater)
    existing = s.scalars(query).one_or_none()
    if existing is not None:
        return existing, False
    row = BlindVote(pair_id=pair_id, rater=rater, choice=choice)
    try:
        with s.begin_nested():
            s.add(row)
    except IntegrityError:  # a concurrent vote by the same rater won
        return s.scalars(query).one(), False
    return row, True


def blind_tally(s: Session, candidate_version: str) -> dict[str, int]:
    """Votes on ``candidate_version``'s pairs, decoded: candidate wins, current wins, same; pairs and raters."""
    rows = s.execute(
        select(BlindPair.candidate_side, BlindVote.choice, func.count())
        .join(BlindVote, BlindVote.pair_id == BlindPair.id)
        .where(BlindPair.candidate_version == candidate_version)
        .group_by(BlindPair.candidate_side, BlindVote.choice)
    ).all()
    out = {"candidate": 0, "current": 0, "same": 0}
    for side, choice, n in rows:
        out["same" if choice == "same" else "candidate" if choice == side else "current"] += n
    out["votes"] = sum(out.values())
    out["pairs"] = s.scalar(select(func.count()).select_from(BlindPair)
                            .where(BlindPair.candidate_version == candidate_version)) or 0
    out["raters"] = s.scalar(select(func.count(func.distinct(BlindVote.rater)))
                             .join(BlindPair, BlindPair.id == BlindVote.pair_id)
                             .where(BlindPair.candidate_version == candidate_version)) or 0
    return out


def held_candidates(s: Session) -> list[ModelVersion]:
    """Versions saved and registered but held (status 'candidate', never promoted), oldest first."""
    return list(s.scalars(select(ModelVersion)
                          .where(ModelVersion.status == "candidate", ModelVersion.promoted_at.is_(None))
                          .order_by(ModelVersion.id)))
