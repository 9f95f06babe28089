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


def test_concurrent_insert_of_same_request_id_returns_the_winner(engine, meme_id):
    """Two writers insert the same request id at once: the second waits on the first's uncommitted row
    (INSERT ... ON CONFLICT DO NOTHING; on SQLite, BEGIN IMMEDIATE already queues it), then gets the
    winner's row back, and its own transaction stays usable."""
    first_inserted, let_first_commit = threading.Event(), threading.Event()

    def first() -> int:
        with Session(engine) as s, s.begin():
            row = repo.record_rating(s, request_id="race", prediction_id=meme_id, session_id="s", relevance=5)
            first_inserted.set()
            let_first_commit.wait(10)
            return row.id

    def second() -> tuple[int, int | None]:
        first_inserted.wait(10)
        with Session(engine) as s, s.begin():
            loser = repo.record_rating(s, request_id="race", prediction_id=meme_id, session_id="s", relevance=1)
            repo.record_rating(s, request_id="after", prediction_id=meme_id, session_id="s", relevance=3)
            return loser.id, loser.relevance

    with ThreadPoolExecutor(2) as pool:
        winner, loser = pool.submit(first), pool.submit(second)
        first_inserted.wait(10)
        let_first_commit.set()
        assert loser.result(timeout=30) == (winner.result(timeout=30), 5)
    assert _count(engine, Rating) == 2


def test_savepoint_path_absorbs_an_insert_that_lost_the_race(engine, meme_id, monkeypatch):
    """Databases without ON CONFLICT: the other writer commits between our lookup and our INSERT, and
    our savepoint absorbs the clash."""
    monkeypatch.setattr(repo, "_UPSERTS", {})
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


def _rate_from_threads(engine, prediction_id: int, request_ids_for, session_for=lambda t: f"sess-{t}") -> list[BaseException]:
    start, errors = threading.Barrier(20), []

    def worker(t: int) -> None:
        start.wait()
        try:
            for i, request_id in enumerate(request_ids_for(t)):
                with Session(engine) as s, s.begin():
                    repo.record_rating(
                        s, request_id=request_id, prediction_id=prediction_id, session_id=session_for(t),
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
    # one client retrying from twenty threads: its session owns the ids
    errors = _rate_from_threads(engine, meme_id, lambda t: [f"shared-{i}" for i in range(10)], lambda t: "sess-one")
    assert errors == []
    assert _count(engine, Rating) == 10


def test_another_sessions_request_id_is_refused_without_echoing_its_row(engine, meme_id, caption_id):
    with Session(engine) as s, s.begin():
        repo.record_rating(s, request_id="mine", prediction_id=meme_id, session_id="owner", coherence=5,
                           comment="private words")
        repo.record_correction(s, request_id="fix", prediction_id=meme_id, field="ocr_text", value="secret text",
                               session_id="owner")
    for record in (lambda s: repo.record_rating(s, request_id="mine", prediction_id=caption_id, session_id="intruder",
                                                coherence=1),
                   lambda s: repo.record_correction(s, request_id="fix", prediction_id=caption_id, field="caption",
                                                    value="x", session_id="intruder")):
        with pytest.raises(ValueError, match="already taken") as refused, Session(engine) as s, s.begin():
            record(s)
        message = str(refused.value)
        assert str(meme_id) not in message.replace("'mine'", "").replace("'fix'", "")
        assert "private" not in message and "secret" not in message and "ocr_text" not in message
    with Session(engine) as s:  # the owner's retry is still idempotent and its own mistakes still explained
        assert repo.record_rating(s, request_id="mine", prediction_id=meme_id, session_id="owner", coherence=5).id
        with pytest.raises(ValueError, match="already used with prediction_id"):
            repo.record_rating(s, request_id="mine", prediction_id=caption_id, session_id="owner", coherence=5)


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


# --- queries for retraining and its report ----------------------------------------------------


def test_used_caption_corrections_are_distinct_accepted_captions_oldest_first(engine, store, meme_id, caption_id):
    with Session(engine) as s, s.begin():
        other = add_prediction(s, add_upload(s, store, tag="dog"), kind="caption", label="dog").id
        ids = {}
        for key, pid, field, value in [
            ("dog", caption_id, "caption", "a dog"),
            ("cat", other, "caption", "a cat"),
            ("dog again", other, "caption", "a dog"),
            ("not yet", caption_id, "caption", "not used yet"),
            ("refused", caption_id, "caption", "refused"),
            ("ocr", meme_id, "ocr_text", "used but not a caption"),
        ]:
            ids[key] = repo.record_correction(
                s, request_id=key, prediction_id=pid, field=field, value=value, session_id="s"
            ).id
        repo.mark_corrections(s, [ids[k] for k in ("dog", "cat", "dog again", "ocr")], status="used", used_in_version="v1")
        repo.mark_corrections(s, [ids["refused"]], status="rejected")
    with Session(engine) as s:
        assert repo.used_caption_corrections(s) == ["a dog", "a cat"]


def test_latest_ocr_text_takes_the_newest_fix_that_was_not_rejected(engine, store):
    with Session(engine) as s, s.begin():
        a, b, c = (add_prediction(s, add_upload(s, store, tag=t)).id for t in "abc")
        fixes = {
            value: repo.record_correction(
                s, request_id=value, prediction_id=pid, field="ocr_text", value=value, session_id="s"
            ).id
            for pid, value in [(a, "first"), (a, "second"), (a, "third, rejected"), (b, "only fix")]
        }
        repo.mark_corrections(s, [fixes["third, rejected"]], status="rejected")
        repo.record_correction(s, request_id="l", prediction_id=c, field="label", value="positive", session_id="s")
    with Session(engine) as s:
        assert repo.latest_ocr_text(s, {a, b, c}) == {a: "second", b: "only fix"}
        assert repo.latest_ocr_text(s, [b]) == {b: "only fix"}
        assert repo.latest_ocr_text(s, []) == {}


def test_well_rated_captions_average_coherence_and_relevance_and_skip_corrected_ones(engine, store):
    t1 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    t2 = t1 + timedelta(hours=1)
    with Session(engine) as s, s.begin():
        def caption(tag):
            return add_prediction(s, add_upload(s, store, tag=tag), kind="caption", label=tag, model_version="v3")

        def rate(p, key, user, created_at=t1, **scores):
            repo.record_rating(s, request_id=key, prediction_id=p.id, session_id=f"s-{user}", user=user,
                               created_at=created_at, **scores)

        good, low, corrected, detail_only = (caption(t) for t in ("good", "low", "corrected", "detail"))
        meme = add_prediction(s, add_upload(s, store, tag="meme"))
        rate(good, "g1", "alice", coherence=5, relevance=4)  # 4.5
        rate(good, "g2", None, created_at=t2, relevance=4)  # 4.0 (relevance alone)
        rate(low, "l1", "carl", coherence=3, relevance=3, detail=5)
        rate(corrected, "c1", "dan", coherence=5, relevance=5)
        repo.record_correction(s, request_id="fix", prediction_id=corrected.id, field="caption", value="x", session_id="s")
        rate(detail_only, "d1", "eve", detail=5)
        rate(meme, "m1", "fay", coherence=5, relevance=5)
        good_id, low_id, good_sha = good.id, low.id, good.image_sha256
    with Session(engine) as s:
        [row] = repo.well_rated_captions(s, min_rating=4.0)
        assert row == {
            "prediction_id": good_id, "outputs": {"caption": "a photo of good"}, "model_version": "v3",
            "image_sha256": good_sha, "image_relpath": f"{good_sha[:2]}/{good_sha}.png", "mean_score": 4.25,
            "rated_at": t2, "user": "alice", "session_id": "s-alice",
        }
        assert row["rated_at"].utcoffset() == timedelta(0)
        assert [r["prediction_id"] for r in repo.well_rated_captions(s, min_rating=3.0)] == [good_id, low_id]
        assert repo.well_rated_captions(s, min_rating=4.3) == []


def test_ratings_with_outputs_describe_what_was_rated(engine, store, caption_id):
    with Session(engine) as s, s.begin():
        meme = add_prediction(s, add_upload(s, store, tag="m"), ablation="text", model_version="v2")
        first = repo.record_rating(s, request_id="r1", prediction_id=caption_id, session_id="s1", user="ann", coherence=4)
        second = repo.record_rating(s, request_id="r2", prediction_id=meme.id, session_id="s2", detail=2)
        ids, meme_id, meme_sha = (first.id, second.id), meme.id, meme.image_sha256
    with Session(engine) as s:
        rows = repo.ratings_with_outputs(s)
    assert [r["rating_id"] for r in rows] == list(ids)
    assert {k: rows[0][k] for k in ("prediction_id", "kind", "output", "ablation", "user", "coherence", "detail")} == {
        "prediction_id": caption_id, "kind": "caption", "output": "a photo of cat", "ablation": None, "user": "ann",
        "coherence": 4, "detail": None,
    }
    assert {k: rows[1][k] for k in ("prediction_id", "model_version", "image_sha256", "ablation", "output", "user",
                                    "session_id", "detail", "relevance")} == {
        "prediction_id": meme_id, "model_version": "v2", "image_sha256": meme_sha, "ablation": "text",
        "output": "sarcastic", "user": None, "session_id": "s2", "detail": 2, "relevance": None,
    }


def test_correction_counts_per_version_count_corrected_predictions_once(engine, store):
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store)
        p1, p2, _ = (add_prediction(s, upload, model_version="v0") for _ in range(3))
        add_prediction(s, upload, kind="caption", model_version="v1")
        for key, pid, field, value in [("a", p1.id, "label", "positive"), ("b", p1.id, "ocr_text", "hi"),
                                       ("c", p2.id, "label", "dark humor")]:
            repo.record_correction(s, request_id=key, prediction_id=pid, field=field, value=value, session_id="s")
    with Session(engine) as s:
        counts = repo.correction_counts_per_version(s)
    assert counts == {
        "v0": {"predictions": 3, "corrected_predictions": 2, "by_field": {"label": 2, "ocr_text": 1}},
        "v1": {"predictions": 1, "corrected_predictions": 0, "by_field": {}},
    }
    assert list(counts) == ["v0", "v1"]


def test_corrections_with_outputs_filter_by_ids_and_version(engine, store, caption_id):
    with Session(engine) as s, s.begin():
        meme = add_prediction(s, add_upload(s, store, tag="m"), input_text="WHEN IT WORKS")
        a = repo.record_correction(s, request_id="a", prediction_id=meme.id, field="label", value="positive", session_id="s")
        b = repo.record_correction(
            s, request_id="b", prediction_id=caption_id, field="caption", value="a dog", session_id="s2", user="ann"
        )
        c = repo.record_correction(s, request_id="c", prediction_id=caption_id, field="caption", value="a cat", session_id="s")
        repo.mark_corrections(s, [a.id, c.id], status="used", used_in_version="v1")
        a, b, c = a.id, b.id, c.id
    with Session(engine) as s:
        [row] = repo.corrections_with_outputs(s, correction_ids=[b])
        assert {k: row[k] for k in ("correction_id", "field", "value", "status", "user", "session_id", "kind",
                                    "output", "prediction_id", "used_in_version")} == {
            "correction_id": b, "field": "caption", "value": "a dog", "status": "new", "user": "ann",
            "session_id": "s2", "kind": "caption", "output": "a photo of cat", "prediction_id": caption_id,
            "used_in_version": None,
        }
        used = repo.corrections_with_outputs(s, used_in_version="v1")
        assert [r["correction_id"] for r in used] == [a, c]
        assert (used[0]["output"], used[0]["input_text"], used[0]["model_version"]) == ("sarcastic", "WHEN IT WORKS", "v0")
        assert [r["correction_id"] for r in repo.corrections_with_outputs(s, used_in_version="v1", limit=1)] == [a]
        assert [r["correction_id"] for r in repo.corrections_with_outputs(s, correction_ids=[a, b], used_in_version="v1")] == [a]
        assert repo.corrections_with_outputs(s, correction_ids=[]) == []
        assert len(repo.corrections_with_outputs(s)) == 3
        with pytest.raises(ValueError, match="limit.*0"):
            repo.corrections_with_outputs(s, limit=0)


def test_retrain_runs_oldest_first_and_latest_run_for_a_candidate(engine):
    with Session(engine) as s, s.begin():
        runs = [repo.start_retrain_run(s, trigger="cli", owner=f"host:{i}").id for i in range(3)]
        for run_id, candidate in zip(runs, ("v1", "v2", "v1")):
            repo.update_retrain_run(s, run_id, candidate_version=candidate)
    with Session(engine) as s:
        assert [r.id for r in repo.all_retrain_runs(s)] == runs
        assert repo.latest_run_for_candidate(s, "v1").id == runs[2]
        assert repo.latest_run_for_candidate(s, "v2").id == runs[1]
        assert repo.latest_run_for_candidate(s, "v9") is None


def test_set_run_report_path_on_the_run_and_its_registered_version(engine):
    with Session(engine) as s, s.begin():
        repo.register_version(s, version="v1", path="/m/v1", sha256="1" * 64)
        promoted, refused, other = (repo.start_retrain_run(s, trigger="cli", owner="h:1").id for _ in range(3))
    with Session(engine) as s, s.begin():
        repo.set_run_report_path(s, promoted, "/reports/v1/report.html", version="v1")
        repo.set_run_report_path(s, refused, "/reports/v2/report.html", version="v2")  # a refused candidate: no row
        repo.set_run_report_path(s, other, "/reports/other/report.html")
        with pytest.raises(ValueError, match="unknown retrain run id 999"):
            repo.set_run_report_path(s, 999, "/x.html")
        with pytest.raises(ValueError, match="report_path.*''"):
            repo.set_run_report_path(s, promoted, "")
    with Session(engine) as s:
        assert [r.report_path for r in repo.all_retrain_runs(s)] == [
            "/reports/v1/report.html", "/reports/v2/report.html", "/reports/other/report.html"
        ]
        assert repo.get_version(s, "v1").report_path == "/reports/v1/report.html"
        assert repo.get_version(s, "v2") is None


def test_rejected_items_by_run_and_by_correction(engine, meme_id):
    with Session(engine) as s, s.begin():
        c1, c2 = (
            repo.record_correction(s, request_id=k, prediction_id=meme_id, field="label", value="positive", session_id="s").id
            for k in ("c1", "c2")
        )
        r1, r2 = (repo.start_retrain_run(s, trigger="cli", owner="h:1").id for _ in range(2))
        items = [
            repo.record_rejected_item(s, run_id=run, correction_id=c, reason=reason).id
            for run, c, reason in [(r1, c1, "outlier"), (r1, None, "user_share"), (r2, c2, "near_duplicate"),
                                   (r2, c1, "outlier")]
        ]
    with Session(engine) as s:
        assert [(i.id, i.reason) for i in repo.rejected_items(s, run_id=r1)] == [(items[0], "outlier"),
                                                                               (items[1], "user_share")]
        assert [i.id for i in repo.rejected_items(s, correction_ids=[c1])] == [items[0], items[3]]
        assert [i.id for i in repo.rejected_items(s, run_id=r2, correction_ids=[c1])] == [items[3]]
        assert repo.rejected_items(s, correction_ids=[]) == []
        assert [i.id for i in repo.rejected_items(s)] == items


def test_corrections_since_filters_by_user_and_image_in_chunks(engine, monkeypatch):
    monkeypatch.setattr(repo, "_IN_CHUNK", 2)  # force several IN (...) queries
    with Session(engine) as s, s.begin():
        shas = []
        for i in range(5):
            upload = add_upload(s, tag=f"chunk{i}")
            p = add_prediction(s, upload, kind="caption")
            repo.record_correction(s, request_id=f"chunk-c{i}", prediction_id=p.id, field="caption", value=f"v{i}",
                                   session_id="s", user="ann" if i % 2 == 0 else "bob")
            shas.append(upload.sha256)
    with Session(engine) as s:
        rows = repo.corrections_since(s, None, images=[shas[4], shas[0], shas[3], shas[1], "0" * 64])
        assert [r["value"] for r in rows] == ["v0", "v1", "v3", "v4"]  # oldest first across chunks
        assert [r["value"] for r in repo.corrections_since(s, None, users=["ann"], images=shas[:4])] == ["v0", "v2"]
        assert repo.corrections_since(s, None, images=[]) == []
