from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from feedback_db.models import Correction, ModelVersion, Prediction, Rating, Upload

from .factories import add_upload


def _insert_fails(engine, row) -> None:
    with pytest.raises(IntegrityError):
        with Session(engine) as s, s.begin():
            s.add(row)


def test_foreign_keys_are_enforced(engine):
    _insert_fails(engine, Rating(request_id="r1", prediction_id=999, session_id="s", coherence=3))
    _insert_fails(engine, Correction(request_id="c1", prediction_id=999, session_id="s", field="label", value="x"))
    _insert_fails(
        engine,
        Prediction(
            request_id="p1", kind="meme", image_sha256="0" * 64, model_version="v0", outputs={},
            latency_ms=1.0, session_id="s",
        ),
    )


def test_check_constraints_hold_even_without_the_repository(engine, meme_id):
    _insert_fails(engine, Rating(request_id="r1", prediction_id=meme_id, session_id="s", coherence=6))
    _insert_fails(engine, Rating(request_id="r2", prediction_id=meme_id, session_id="s", detail=0))
    _insert_fails(engine, Correction(request_id="c1", prediction_id=meme_id, session_id="s", field="mood", value="x"))
    _insert_fails(engine, Correction(request_id="c2", prediction_id=meme_id, session_id="s", field="label", value=""))


def test_at_most_one_current_version_in_the_database(engine):
    def version(name: str) -> ModelVersion:
        return ModelVersion(version=name, path=f"/m/{name}", sha256="a" * 64, status="promoted", is_current=True)

    with Session(engine) as s, s.begin():
        s.add(version("v1"))
    _insert_fails(engine, version("v2"))


def test_timestamps_are_stored_as_utc_and_read_back_aware(engine, store):
    berlin = timezone(timedelta(hours=2))
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        upload.created_at = datetime(2024, 5, 1, 12, 0, tzinfo=berlin)
        sha = upload.sha256
    with Session(engine) as s:
        stored = s.get(Upload, sha).created_at
        assert stored == datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
        assert stored.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(engine, store):
    with pytest.raises(StatementError, match="naive"):
        with Session(engine) as s, s.begin():
            add_upload(s, store).created_at = datetime(2024, 5, 1, 12, 0)
