"""The retrain worker: the web process only records a request; one worker takes it; a worker that
dies mid-run is noticed at once (its run failed, its lease freed) and restarted."""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import make_engine
from retrain.job import begin_run, running_run_id
from retrain.worker import RetrainWorker, WorkerSupervisor, pending_request, request_run, take_request

from .world import feed_new_concepts

REPO = Path(__file__).resolve().parents[2]


def test_one_request_is_taken_by_exactly_one_worker(engine, home):
    assert request_run(engine)["started"] and pending_request(engine) is not None
    engines = [make_engine(f"sqlite:///{home / 'mmapp.db'}") for _ in range(4)]
    barrier, taken = threading.Barrier(4), []

    def worker(e):
        barrier.wait()
        taken.append(take_request(e))
    threads = [threading.Thread(target=worker, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
    finally:
        supervisor.shutdown(timeout_s=5)
    assert supervisor.proc.poll() is not None
