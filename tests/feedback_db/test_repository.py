from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import Correction, Prediction, Rating, Upload

from .factories import add_prediction, add_upload

UTC = timezone.utc


def _count(engine, model) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


# --- idempotency ------------------------------------------------------------------------------


def test_same_request_id_twice_stores_one_row(engine, store):
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        assert add_upload(s, store).sha256 == upload.sha256
        first = add_prediction(s, upload, request_id="req-p")
        again = add_prediction(s, upload, request_id="req-p", label="other output, same request")
        assert again.id == first.id and again.outputs["label"] == "sarcastic"
        prediction_id = first.id
    for _ in range(2):
        with Session(engine) as s, s.begin():
            r = repo.record_rating(s, request_id="req-r", prediction_id=prediction_id, session_id="s", coherence=4)
            c = repo.record_correction(
                s, request_id="req-c", prediction_id=prediction_id, field="label", value="positive", session_id="s"
            )
            assert (r.coherence, c.value) == (4, "positive")
    assert [_count(engine, m) for m in (Upload, Prediction, Rating, Correction)] == [1, 1, 1, 1]


def test_request_id_reused_for_another_prediction_is_refused(engine, meme_id, caption_id):
    with Session(engine) as s, s.begin():
        repo.record_rating(s, request_id="req-1", prediction_id=meme_id, session_id="s", detail=2)
        with pytest.raises(ValueError, match=f"prediction_id={meme_id}.*got {caption_id}"):
            repo.record_rating(s, request_id="req-1", prediction_id=caption_id, session_id="s", detail=2)


def test_concurrent_insert_of_same_request_id_returns_the_winner(engine, meme_id, monkeypatch):
    """The other writer commits between our lookup and our INSERT: our savepoint absorbs the clash."""
    with Session(engine) as s, s.begin():
        winner = repo.record_rating(s, request_id="race", prediction_id=meme_id, session_id="s", relevance=5).id

    real_find, calls = repo._find, []

    def find_misses_once(*args):
        calls.append(1)
        return None if len(calls) == 1 else real_find(*args)

    monkeypatch.setattr(repo, "_find", find_misses_once)
    with Session(engine) as s, s.begin():
        loser = repo.record_rating(s, request_id="race", prediction_id=meme_id, session_id="s", relevance=1)
        assert loser.id == winner and loser.relevance == 5
        # the outer transaction is still usable after the rolled-back savepoint
        repo.record_rating(s, request_id="after", prediction_id=meme_id, session_id="s", relevance=3)
    assert _count(engine, Rating) == 2


def test_caller_owns_the_transaction(engine, meme_id):
    with Session(engine) as s:
        with s.begin():
            repo.record_rating(s, request_id="r", prediction_id=meme_id, session_id="s", coherence=3)
            repo.record_correction(s, request_id="c", prediction_id=meme_id, field="label", value="dark humor", session_id="s")
            s.rollback()
    assert _count(engine, Rating) == _count(engine, Correction) == 0


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 6, -1, 3.5, True, "4"])
def test_rating_out_of_range_is_refused_with_the_value(engine, meme_id, bad):
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match=f"coherence .*got {bad!r}"):
            repo.record_rating(s, request_id="r", prediction_id=meme_id, session_id="s", coherence=bad)


def test_rating_needs_a_score_or_comment_and_a_known_prediction(engine, meme_id):
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="at least one score"):
            repo.record_rating(s, request_id="r", prediction_id=meme_id, session_id="s", comment="   ")
        with pytest.raises(ValueError, match="unknown prediction id 4242"):
            repo.record_rating(s, request_id="r", prediction_id=4242, session_id="s", detail=3)
        only_comment = repo.record_rating(s, request_id="r2", prediction_id=meme_id, session_id="s", comment=" meh ")
        assert only_comment.comment == "meh" and only_comment.coherence is None


def test_correction_validation(engine, meme_id, caption_id):
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="'mood'"):
            repo.record_correction(s, request_id="c", prediction_id=meme_id, field="mood", value="x", session_id="s")
        with pytest.raises(ValueError, match="non-empty.*'  '"):
            repo.record_correction(s, request_id="c", prediction_id=meme_id, field="caption", value="  ", session_id="s")
        with pytest.raises(ValueError, match="unknown prediction id 77"):
            repo.record_correction(s, request_id="c", prediction_id=77, field="caption", value="x", session_id="s")
        with pytest.raises(ValueError, match="meme prediction.*'caption'"):
            repo.record_correction(s, request_id="c", prediction_id=caption_id, field="label", value="x", session_id="s")
        fixed = repo.record_correction(
            s, request_id="c", prediction_id=caption_id, field="caption", value=" a cat on a mat ", session_id="s"
        )
        assert (fixed.value, fixed.status) == ("a cat on a mat", "new")


def test_prediction_validation(engine, store):
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        with pytest.raises(ValueError, match="'video'"):
            add_prediction(s, upload, kind="video")
        with pytest.raises(ValueError, match="'audio'"):
            add_prediction(s, upload, ablation="audio")
        with pytest.raises(ValueError, match="IP address.*'203.0.113.9'"):
            add_prediction(s, upload, session_id="203.0.113.9")
        with pytest.raises(ValueError, match="unknown upload"):
            repo.record_prediction(
                s, request_id="p", kind="meme", image_sha256="f" * 64, model_version="v0",
                outputs={}, latency_ms=1.0, session_id="s",
            )
        assert add_prediction(s, upload, ablation="text").ablation == "text"


# --- concurrency ------------------------------------------------------------------------------


def _rate_from_threads(engine, prediction_id: int, request_ids_for) -> list[BaseException]:
    start, errors = threading.Barrier(20), []

    def worker(t: int) -> None:
        start.wait()
        try:
            for i, request_id in enumerate(request_ids_for(t)):
                with Session(engine) as s, s.begin():
                    repo.record_rating(
                        s, request_id=request_id, prediction_id=prediction_id, session_id=f"sess-{t}",
                        coherence=1 + (t + i) % 5,
                    )
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(worker, range(20)))
    return errors


def test_twenty_threads_ten_ratings_each_store_exactly_200(engine, meme_id):
    errors = _rate_from_threads(engine, meme_id, lambda t: [f"t{t}-r{i}" for i in range(10)])
    assert errors == []
    assert _count(engine, Rating) == 200


def test_twenty_threads_submitting_the_same_requests_store_each_once(engine, meme_id):
    errors = _rate_from_threads(engine, meme_id, lambda t: [f"shared-{i}" for i in range(10)])
    assert errors == []
    assert _count(engine, Rating) == 10


# --- tables for the operator ------------------------------------------------------------------


def test_recent_predictions_and_feedback(engine, store, meme_id, caption_id):
    with Session(engine) as s, s.begin():
        repo.record_rating(s, request_id="r1", prediction_id=meme_id, session_id="s", coherence=5, comment="spot on")
        repo.record_correction(s, request_id="c1", prediction_id=caption_id, field="caption", value="a dog", session_id="s")
    with Session(engine) as s:
        preds = repo.recent_predictions(s, limit=10)
        assert [p["id"] for p in preds] == [caption_id, meme_id]
        assert preds[0]["output"] == "a photo of cat" and preds[1]["output"] == "sarcastic"
        assert (preds[1]["n_ratings"], preds[1]["n_corrections"]) == (1, 0)
        assert len(repo.recent_predictions(s, limit=1)) == 1

        feedback = repo.recent_feedback(s, limit=10)
        assert [f["type"] for f in feedback] == ["correction", "rating"]
        assert len({frozenset(f) for f in feedback}) == 1  # same columns on every row
        assert feedback[0]["value"] == "a dog" and feedback[1]["coherence"] == 5
        assert len(repo.recent_feedback(s, limit=1)) == 1
        with pytest.raises(ValueError, match="limit.*0"):
            repo.recent_feedback(s, limit=0)


def test_counts_per_day_buckets_by_utc_day_and_keeps_empty_days(engine, store):
    now = datetime(2024, 6, 10, 15, 0, tzinfo=UTC)
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        p1 = add_prediction(s, upload, created_at=datetime(2024, 6, 10, 0, 30, tzinfo=UTC))
        add_prediction(s, upload, created_at=datetime(2024, 6, 9, 23, 30, tzinfo=UTC))
        add_prediction(s, upload, created_at=datetime(2024, 6, 10, 1, 30, tzinfo=timezone(timedelta(hours=3))))
        add_prediction(s, upload, created_at=datetime(2024, 5, 1, tzinfo=UTC))  # outside the window
        repo.record_rating(s, request_id="r", prediction_id=p1.id, session_id="s", detail=4, created_at=now)
    with Session(engine) as s:
        table = repo.counts_per_day(s, days=3, now=now)
    assert table == [
        {"day": "2024-06-08", "predictions": 0, "ratings": 0, "corrections": 0},
        {"day": "2024-06-09", "predictions": 2, "ratings": 0, "corrections": 0},  # 01:30+03:00 is 22:30 UTC the day before
        {"day": "2024-06-10", "predictions": 1, "ratings": 1, "corrections": 0},
    ]


def test_counts_per_label_uses_the_latest_accepted_label_correction(engine, store):
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        a = add_prediction(s, upload, label="sarcastic")
        b = add_prediction(s, upload, label="sarcastic")
        add_prediction(s, upload, label="positive")
        add_prediction(s, upload, kind="caption")  # not a meme: not counted
        repo.record_correction(s, request_id="c1", prediction_id=a.id, field="label", value="positive", session_id="s")
        repo.record_correction(s, request_id="c2", prediction_id=a.id, field="label", value="dark humor", session_id="s")
        rejected = repo.record_correction(s, request_id="c3", prediction_id=b.id, field="label", value="positive", session_id="s")
        repo.mark_corrections(s, [rejected.id], status="rejected")
    with Session(engine) as s:
        assert repo.counts_per_label(s) == [
            {"predicted_label": "positive", "corrected_label": None, "n": 1},
            {"predicted_label": "sarcastic", "corrected_label": None, "n": 1},
            {"predicted_label": "sarcastic", "corrected_label": "dark humor", "n": 1},
        ]


def test_corrections_since_datetime_version_and_status(engine, store):
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with Session(engine) as s, s.begin():
        p = add_prediction(s, add_upload(s, store), input_text="WHEN THE CODE WORKS")
        old = repo.record_correction(
            s, request_id="old", prediction_id=p.id, field="ocr_text", value="when the code works", session_id="s",
            created_at=t0,
        )
        repo.register_version(s, version="v1", path="/m/v1", sha256="1" * 64)  # created now, after `old`
        new = repo.record_correction(
            s, request_id="new", prediction_id=p.id, field="label", value="positive", session_id="s",
            created_at=datetime.now(UTC) + timedelta(seconds=1),
        )
        repo.mark_corrections(s, [old.id], status="used", used_in_version="v1")
        old_id, new_id = old.id, new.id
    with Session(engine) as s:
        assert [c["correction_id"] for c in repo.corrections_since(s)] == [old_id, new_id]
        assert [c["correction_id"] for c in repo.corrections_since(s, t0)] == [new_id]
        [row] = repo.corrections_since(s, "v1")
        assert row["correction_id"] == new_id
        assert row["image_relpath"].endswith(f"{row['image_sha256']}.png") and row["outputs"]["label"] == "sarcastic"
        assert [c["correction_id"] for c in repo.corrections_since(s, statuses=["new"])] == [new_id]
        assert s.get(Correction, old_id).used_in_version == "v1"
        with pytest.raises(ValueError, match="'v9'"):
            repo.corrections_since(s, "v9")
