"""Retention (issue 11, items 2 and 8): unrated uploads lose their image file after the retention time,
rated/corrected ones keep it; expired export folders are deleted; old login-log rows are deleted; the
scheduler runs the job."""
from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.blobstore import BlobStore
from feedback_db.engine import init_db, make_engine
from feedback_db.models import Upload
from mmapp.config import load_config
from retrain.housekeeping import expire_exports, purge_login_attempts, purge_unrated_uploads, run_housekeeping
from retrain.scheduler import RetrainScheduler


def stored(s, store, tag: str, *, days_old: float, rate: str = ""):
    data = f"image {tag}".encode()
    sha, relpath = store.put(data, "png")
    upload = repo.record_upload(s, sha256=sha, relpath=relpath, format="png", width=1, height=1, n_bytes=len(data))
    upload.created_at = datetime.now(timezone.utc) - timedelta(days=days_old)
    p = repo.record_prediction(s, request_id=f"p-{tag}", kind="caption", image_sha256=sha, model_version="v",
                               outputs={"caption": "x"}, latency_ms=1.0, session_id="s", created_at=upload.created_at)
    if rate == "rating":
        repo.record_rating(s, request_id=f"r-{tag}", prediction_id=p.id, session_id="s", coherence=3)
    elif rate == "correction":
        repo.record_correction(s, request_id=f"c-{tag}", prediction_id=p.id, field="caption", value="y",
                               session_id="s")
    return store.path(relpath)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    init_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "uploads")


def test_only_old_unrated_uploads_lose_their_file(engine, store):
    with Session(engine) as s, s.begin():
        old_unrated = stored(s, store, "old", days_old=40)
        old_rated = stored(s, store, "rated", days_old=40, rate="rating")
        old_corrected = stored(s, store, "fixed", days_old=40, rate="correction")
        new_unrated = stored(s, store, "new", days_old=1)
    deleted = purge_unrated_uploads(engine, store, 30)
    assert len(deleted) == 1 and not old_unrated.exists()
    assert old_rated.exists() and old_corrected.exists() and new_unrated.exists()
    assert purge_unrated_uploads(engine, store, 30) == []  # idempotent
    with Session(engine) as s:  # the rows stay: the prediction log and the hash
        assert len(repo.recent_predictions(s, 10)) == 4


def test_an_old_picture_uploaded_again_keeps_its_file_from_its_new_prediction_on(engine, store):
    with Session(engine) as s, s.begin():
        path = stored(s, store, "again", days_old=40)
        sha = s.scalar(select(Upload.sha256))
        repo.record_prediction(s, request_id="p-again-today", kind="caption", image_sha256=sha, model_version="v",
                               outputs={"caption": "x"}, latency_ms=1.0, session_id="s2")
    assert purge_unrated_uploads(engine, store, 30) == [] and path.exists()
    assert purge_unrated_uploads(engine, store, 30, now=datetime.now(timezone.utc) + timedelta(days=31)) == [sha]
    assert not path.exists()


def test_expired_exports_are_deleted_fresh_ones_kept(tmp_path):
    old, fresh, zipped = tmp_path / "old-folder", tmp_path / "fresh-folder", tmp_path / "old.zip"
    for folder in (old, fresh):
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "feedback.csv").write_text("a,b\n")
    zipped.write_bytes(b"PK")
    past = time.time() - 7200
    for path in (old, zipped):
        os.utime(path, (past, past))
    assert sorted(expire_exports(tmp_path, 3600)) == sorted([old, zipped])
    assert fresh.exists() and not old.exists() and not zipped.exists()
    assert expire_exports(tmp_path / "missing", 3600) == []


def test_the_scheduler_runs_housekeeping_in_every_process(tmp_path):
    config = load_config("offline", env={}, storage={"home": str(tmp_path)}, scheduler={"housekeeping_s": 0.2},
                         app={"export_ttl_s": 0})
    engine = make_engine(config.storage.resolved_database_url)
    init_db(engine)
    (config.paths.exports / "stale").mkdir(parents=True)
    ran = threading.Event()

    def housekeeping():
        run_housekeeping(config, engine)
        ran.set()

    scheduler = RetrainScheduler(config, engine, run_fn=lambda trigger: None, housekeeping=housekeeping).start()
    try:
        assert ran.wait(10)
    finally:
        scheduler.shutdown()
        engine.dispose()
    assert not (config.paths.exports / "stale").exists()


def test_old_login_attempts_are_deleted_in_batches_and_recent_ones_kept(engine):
    now = datetime.now(timezone.utc)
    with Session(engine) as s, s.begin():
        rater = repo.create_rater(s, name="ann", password_hash="x", role="trusted")
        for i in range(25):  # a guessing burst 100 days ago, then a login today and one 10 days ago
            repo.record_login_attempt(s, name="ann", outcome="wrong_password", rater=rater, now=now - timedelta(days=100))
        repo.record_login_attempt(s, name="ann", outcome="ok", rater=rater, now=now - timedelta(days=10))
        repo.record_login_attempt(s, name="nobody", outcome="unknown_user", now=now)
    assert purge_login_attempts(engine, 0) == 0  # 0 keeps everything
    assert purge_login_attempts(engine, 90, now=now, batch=10) == 25  # three batches: 10, 10, 5
    with Session(engine) as s:
        left = repo.login_attempts(s)
    assert sorted(a.outcome for a in left) == ["ok", "unknown_user"]
    assert purge_login_attempts(engine, 90, now=now) == 0
