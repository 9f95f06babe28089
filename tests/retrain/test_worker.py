"""The retrain worker: the web process only records a request; one worker takes it; a worker that
dies mid-run is noticed at once (its run failed, its lease freed) and restarted."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import make_engine
from retrain.job import begin_run, running_run_id
from retrain.worker import (RetrainWorker, WorkerSupervisor, check_runner, pending_request, request_run,
                            take_request)

from .world import feed_new_concepts

REPO = Path(__file__).resolve().parents[2]


def race_take_request(engines) -> list[bool]:
    """Every engine tries to take the pending request at the same moment; who got it."""
    barrier, taken = threading.Barrier(len(engines)), []

    def worker(e):
        barrier.wait()
        taken.append(take_request(e))
    threads = [threading.Thread(target=worker, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return taken


def test_one_request_is_taken_by_exactly_one_worker(engine, home):
    assert request_run(engine)["started"] and pending_request(engine) is not None
    engines = [make_engine(f"sqlite:///{home / 'mmapp.db'}") for _ in range(4)]
    taken = race_take_request(engines)
    assert sorted(taken) == [False, False, False, True] and pending_request(engine) is None
    assert not take_request(engine)  # the same request is never taken twice
    for e in engines:
        e.dispose()


def test_a_request_while_a_run_is_going_is_refused_with_its_id(engine, config):
    handle = begin_run(engine, trigger="cli", settings=config.retrain)
    out = request_run(engine)
    assert not out["started"] and out["run_id"] == handle.run_id and pending_request(engine) is None
    handle.close()


def test_the_worker_runs_an_operator_request(config, engine, source):
    feed_new_concepts(engine, source, 120)
    worker = RetrainWorker(config, engine, features_factory=lambda: source)
    assert not worker.poll_once()  # nothing requested yet
    request_run(engine)
    assert worker.poll_once()
    deadline = time.monotonic() + 120
    while True:
        with Session(engine) as s:
            runs = repo.recent_retrain_runs(s, limit=1)
        if runs and runs[0].status != "running":
            break
        assert time.monotonic() < deadline, "the requested run never finished"
        time.sleep(0.2)
    assert runs[0].trigger == "operator" and runs[0].status == "promoted", runs[0].message


_HOLD_A_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from feedback_db.engine import make_engine
    from retrain.job import begin_run
    from tests.retrain.world import make_config
    from pathlib import Path
    home = Path(sys.argv[1])
    handle = begin_run(make_engine(f"sqlite:///{{home / 'mmapp.db'}}"), trigger="operator",
                       settings=make_config(home).retrain)
    print("holding", handle is not None, flush=True)
    time.sleep(600)
""")


def test_a_killed_worker_is_noticed_restarted_and_its_run_failed_at_once(engine, home, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_A_RUN.format(repo=str(REPO)))
    supervisor = WorkerSupervisor([sys.executable, str(script), str(home)], engine, restart_after_s=0.5)
    supervisor.start()
    try:
        deadline = time.monotonic() + 60
        while running_run_id(engine) is None:
            assert time.monotonic() < deadline, "the child never opened its run"
            time.sleep(0.1)
        first = supervisor.proc
        os.kill(first.pid, signal.SIGKILL)  # mid-run, no chance to clean up
        while supervisor.restarts == 0 or running_run_id(engine) is not None:
            assert time.monotonic() < deadline + 30, "the dead worker's run was not released"
            time.sleep(0.1)
        with Session(engine) as s:
            dead = repo.recent_retrain_runs(s, limit=5)[-1]
        assert dead.status == "failed" and "died" in dead.message
        assert supervisor.proc.pid != first.pid  # restarted
        while running_run_id(engine) is None:  # the restarted worker opens a new run: nothing blocks it
            assert time.monotonic() < deadline + 60, "no new run could start after the kill"
            time.sleep(0.1)
        with Session(engine) as s:
            runs = repo.recent_retrain_runs(s, limit=5)
        assert [r.status for r in runs[:2]] == ["running", "failed"] and runs[0].id != dead.id
    finally:
        supervisor.shutdown(timeout_s=5)
    assert supervisor.proc.poll() is not None


def test_a_worker_whose_app_died_stops_by_itself_and_hands_the_lease_on(config, engine):
    """`python app.py` SIGKILLed: its worker child is re-parented; it notices at its next poll and stops
    (scheduler lease released) instead of living on unsupervised beside the next app's worker."""
    from retrain.scheduler import LEASE_NAME

    dead = subprocess.Popen(["true"])
    dead.wait()
    config = dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, worker_poll_s=0.2))
    assert not RetrainWorker(config, engine, parent_pid=os.getppid()).orphaned()
    worker = RetrainWorker(config, engine, features_factory=lambda: None, parent_pid=dead.pid)
    assert worker.orphaned()
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the orphaned worker kept serving"
    with Session(engine) as s:
        assert repo.lock_holder(s, LEASE_NAME) is None


def test_one_request_is_taken_by_exactly_one_worker_on_postgres():
    """The same race on PostgreSQL (READ COMMITTED): the claim is one conditional UPDATE, so the losers
    re-check its WHERE after the winner commits and find the request handled."""
    from feedback_db.engine import init_db
    from tests.feedback_db.backends import POSTGRES_URL_ENV, PostgresDatabases

    if not os.environ.get(POSTGRES_URL_ENV):
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    databases = PostgresDatabases(os.environ[POSTGRES_URL_ENV])
    engines = []
    try:
        url = databases.create()
        engines = [make_engine(url) for _ in range(6)]
        init_db(engines[0])
        for _ in range(3):  # three requests in a row: each taken once
            assert request_run(engines[0])["started"]
            taken = race_take_request(engines)
            assert taken.count(True) == 1 and pending_request(engines[0]) is None
            time.sleep(0.01)  # the next request has a later timestamp
    finally:
        for e in engines:
            e.dispose()
        databases.close()


def test_the_worker_lowers_its_own_priority_and_refuses_to_raise_it():
    """retrain.worker_nice: the worker process lowers its niceness (in a child: it cannot be undone here)."""
    code = textwrap.dedent("""
        import os
        from retrain.worker import lower_priority
        before = os.nice(0)
        print(lower_priority(10) - before, lower_priority(0) - before)
        try:
            lower_priority(-1)
        except ValueError as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "10 10" and out[1].startswith("refused: retrain.worker_nice must be >= 0")


def test_the_app_refuses_a_negative_worker_nice_at_start(config):
    """check_runner (python app.py, the operator's "retrain now") refuses it before any worker child starts."""
    bad = dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, worker_nice=-5))
    with pytest.raises(ValueError, match="retrain.worker_nice must be >= 0"):
        check_runner(bad)
    assert check_runner(config) == config.retrain.runner
