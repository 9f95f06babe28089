from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.orm import Session

from feedback_db import repository as repo

T0 = datetime(2024, 6, 1, 3, 0, tzinfo=timezone.utc)


def _in_tx(engine, fn):
    with Session(engine) as s, s.begin():
        return fn(s)


def test_second_owner_is_refused_until_release(engine):
    assert _in_tx(engine, lambda s: repo.try_acquire_lock(s, "retrain", "host-a:1", 60))
    assert not _in_tx(engine, lambda s: repo.try_acquire_lock(s, "retrain", "host-b:2", 60))
    assert _in_tx(engine, lambda s: repo.try_acquire_lock(s, "retrain", "host-a:1", 60))  # re-entrant: extends
    assert not _in_tx(engine, lambda s: repo.release_lock(s, "retrain", "host-b:2"))
    assert _in_tx(engine, lambda s: repo.lock_holder(s, "retrain").owner) == "host-a:1"
    assert _in_tx(engine, lambda s: repo.release_lock(s, "retrain", "host-a:1"))
    assert _in_tx(engine, lambda s: repo.lock_holder(s, "retrain")) is None
    assert _in_tx(engine, lambda s: repo.try_acquire_lock(s, "retrain", "host-b:2", 60))


def test_expired_lock_is_taken_over_and_the_old_owner_learns_it(engine):
    assert _in_tx(engine, lambda s: repo.try_acquire_lock(s, "scheduler", "a", 30, now=T0))
    assert not _in_tx(engine, lambda s: repo.try_acquire_lock(s, "scheduler", "b", 30, now=T0 + timedelta(seconds=29)))
    assert _in_tx(engine, lambda s: repo.refresh_lock(s, "scheduler", "a", 30, now=T0 + timedelta(seconds=20)))
    # a's lease now runs to T0+50s
    assert not _in_tx(engine, lambda s: repo.try_acquire_lock(s, "scheduler", "b", 30, now=T0 + timedelta(seconds=49)))
    assert _in_tx(engine, lambda s: repo.try_acquire_lock(s, "scheduler", "b", 30, now=T0 + timedelta(seconds=50)))
    assert not _in_tx(engine, lambda s: repo.refresh_lock(s, "scheduler", "a", 30))
    assert not _in_tx(engine, lambda s: repo.release_lock(s, "scheduler", "a"))


def _race(engine, n: int, attempt) -> list[bool]:
    start = threading.Barrier(n)

    def one(i: int) -> bool:
        start.wait()
        return _in_tx(engine, lambda s: attempt(s, i))

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_exactly_one_of_many_concurrent_owners_gets_a_free_or_expired_lock(engine):
    assert _race(engine, 10, lambda s, i: repo.try_acquire_lock(s, "retrain", f"w{i}", 60)).count(True) == 1
    later = datetime.now(timezone.utc) + timedelta(seconds=61)
    won = _race(engine, 10, lambda s, i: repo.try_acquire_lock(s, "retrain", f"late{i}", 60, now=later))
    assert won.count(True) == 1


def test_invalid_lock_arguments(engine):
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="ttl_s.*0"):
            repo.try_acquire_lock(s, "x", "a", 0)
        with pytest.raises(ValueError, match="owner"):
            repo.try_acquire_lock(s, "x", "", 10)


def test_a_missed_slot_fires_once_across_processes(engine):
    assert _in_tx(engine, lambda s: repo.get_scheduler_state(s, "nightly")) is None
    assert _race(engine, 8, lambda s, i: repo.claim_scheduled_slot(s, "nightly", T0)).count(True) == 1
    assert _in_tx(engine, lambda s: repo.get_scheduler_state(s, "nightly")) == T0
    assert not _in_tx(engine, lambda s: repo.claim_scheduled_slot(s, "nightly", T0 - timedelta(days=1)))
    assert _race(engine, 8, lambda s, i: repo.claim_scheduled_slot(s, "nightly", T0 + timedelta(days=1))).count(True) == 1
    _in_tx(engine, lambda s: repo.set_scheduler_state(s, "nightly", T0))
    assert _in_tx(engine, lambda s: repo.get_scheduler_state(s, "nightly")) == T0
    _in_tx(engine, lambda s: repo.set_scheduler_state(s, "weekly", T0))
    assert _in_tx(engine, lambda s: repo.get_scheduler_state(s, "weekly")) == T0


def test_retrain_run_lifecycle(engine, meme_id):
    with Session(engine) as s, s.begin():
        run = repo.start_retrain_run(s, trigger="operator", owner="host:42")
        correction = repo.record_correction(
            s, request_id="c", prediction_id=meme_id, field="label", value="positive", session_id="s"
        )
        repo.update_retrain_run(s, run.id, progress=0.5, message="fine-tuning", stats={"n_new": 1})
        repo.record_rejected_item(s, run_id=run.id, correction_id=correction.id, reason="outlier", detail={"z": -3.1})
        repo.finish_retrain_run(s, run.id, status="succeeded", candidate_version="v2", stats={"n_used": 0})
        run_id = run.id
        with pytest.raises(ValueError, match="'running'"):
            repo.finish_retrain_run(s, run.id, status="running")
        with pytest.raises(ValueError, match="1.5"):
            repo.update_retrain_run(s, run.id, progress=1.5)
    with Session(engine) as s:
        [run] = repo.recent_retrain_runs(s)
        assert (run.id, run.status, run.progress, run.candidate_version) == (run_id, "succeeded", 1.0, "v2")
        assert run.stats == {"n_new": 1, "n_used": 0} and run.finished_at is not None
        assert [(r.reason, r.detail) for r in run.rejected_items] == [("outlier", {"z": -3.1})]


def test_runs_without_heartbeat_are_marked_failed(engine):
    with Session(engine) as s, s.begin():
        alive = repo.start_retrain_run(s, trigger="schedule", owner="a:1").id
        dead = repo.start_retrain_run(s, trigger="cli", owner="b:2").id
    with Session(engine) as s, s.begin():
        assert repo.fail_stale_retrain_runs(s, older_than_s=300, now=datetime.now(timezone.utc) + timedelta(seconds=10)) == 0
        s.get(repo.RetrainRun, dead).heartbeat_at = datetime.now(timezone.utc) - timedelta(hours=1)
        assert repo.fail_stale_retrain_runs(s, older_than_s=300) == 1
    with Session(engine) as s:
        assert s.get(repo.RetrainRun, alive).status == "running"
        assert s.get(repo.RetrainRun, dead).status == "failed"


def test_a_dead_owners_runs_fail_and_its_leases_go_at_once(engine):
    with Session(engine) as s, s.begin():
        dead = repo.start_retrain_run(s, trigger="operator", owner="host:12:abcd").id
        other = repo.start_retrain_run(s, trigger="cli", owner="host:123:ef01").id  # pid 123 is not pid 12
        under = repo.start_retrain_run(s, trigger="cli", owner="host_12:99:aa").id  # '_' is no wildcard
        assert repo.try_acquire_lock(s, "retrain", "host:12:abcd", 300)
        assert repo.try_acquire_lock(s, "retrain-scheduler", "host:123:ef01", 300)
    with Session(engine) as s, s.begin():
        assert repo.fail_runs_of_dead_owner(s, "host:12:", message="the worker died") == 1
    with Session(engine) as s:
        assert s.get(repo.RetrainRun, dead).status == "failed" and s.get(repo.RetrainRun, dead).message == "the worker died"
        assert s.get(repo.RetrainRun, other).status == "running" and s.get(repo.RetrainRun, under).status == "running"
        assert repo.lock_holder(s, "retrain") is None
        assert repo.lock_holder(s, "retrain-scheduler").owner == "host:123:ef01"
