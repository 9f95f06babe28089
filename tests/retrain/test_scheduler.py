"""Exactly one scheduler fires across processes; a missed slot runs once; the operator trigger runs once."""
from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import make_engine
from feedback_db.models import RetrainRun
from mmapp.config import SchedulerConfig
from retrain.scheduler import RetrainScheduler, cron_trigger, latest_slot, trigger_now

from .world import feed_new_concepts

REPO = Path(__file__).resolve().parents[2]
UTC = timezone.utc


def test_latest_slot_daily_and_with_seconds():
    daily = cron_trigger("0 3 * * *", "UTC")
    assert latest_slot(daily, datetime(2026, 5, 10, 2, 59, tzinfo=UTC)) == datetime(2026, 5, 9, 3, 0, tzinfo=UTC)
    assert latest_slot(daily, datetime(2026, 5, 10, 3, 0, tzinfo=UTC)) == datetime(2026, 5, 10, 3, 0, tzinfo=UTC)
    every_2s = cron_trigger("*/2 * * * * *", "UTC")
    assert latest_slot(every_2s, datetime(2026, 5, 10, 3, 0, 5, 500, tzinfo=UTC)) == datetime(2026, 5, 10, 3, 0, 4, tzinfo=UTC)
    with pytest.raises(ValueError, match="5 fields"):
        cron_trigger("0 3 * *")


def make_schedulers(config, home, n, calls):
    engines = [make_engine(f"sqlite:///{home / 'mmapp.db'}") for _ in range(n)]
    config = dataclasses.replace(config, scheduler=SchedulerConfig(timezone="UTC", lease_ttl_s=30))
    return [RetrainScheduler(config, e, lambda trigger, i=i: calls.append((i, trigger)), owner=f"proc-{i}")
            for i, e in enumerate(engines)]


def test_only_the_leader_fires_and_each_slot_once(config, home):
    calls = []
    a, b = make_schedulers(config, home, 2, calls)
    started = datetime(2026, 5, 10, 2, 0, tzinfo=UTC)
    assert a.heartbeat(started) and not b.heartbeat(started)  # first start ever: nothing to catch up
    assert calls == []
    now = datetime(2026, 5, 10, 3, 0, 1, tzinfo=UTC)  # the 03:00 tick reaches both processes
    assert a.fire(now) and not b.fire(now)
    assert not a.fire(now)  # the same slot again (a late duplicate tick) does nothing
    b.is_leader = True  # even a second leader (lease lapse) cannot run a claimed slot
    assert not b.fire(now)
    assert calls == [(0, "schedule")]
    assert a.fire(now + timedelta(days=1)) and len(calls) == 2


def test_a_missed_night_runs_once_on_start_up(config, home, engine):
    with Session(engine) as s, s.begin():  # the last run was four nights ago; every process was down since
        repo.set_scheduler_state(s, "retrain", datetime(2026, 5, 6, 3, 0, tzinfo=UTC))
    calls = []
    a, b = make_schedulers(config, home, 2, calls)
    now = datetime(2026, 5, 10, 9, 0, tzinfo=UTC)
    a.heartbeat(now)
    b.heartbeat(now)
    assert calls == [(0, "schedule")]
    a.shutdown()  # the leader goes away; the other takes over and finds nothing missed
    assert b.heartbeat(now) and calls == [(0, "schedule")]
    with Session(engine) as s:
        assert repo.get_scheduler_state(s, "retrain") == datetime(2026, 5, 10, 3, 0, tzinfo=UTC)


_PROCESS_SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from feedback_db.engine import make_engine
from mmapp.config import load_config
from retrain.scheduler import latest_slot, start_scheduler

home, log = Path(sys.argv[1]), Path(sys.argv[2])
config = load_config("offline", env={{}}, storage={{"home": str(home)}}, retrain={{"cron": "* * * * * *"}},  # every second
                     scheduler={{"timezone": "UTC", "heartbeat_s": 0.5, "lease_ttl_s": 2.0}})
engine = make_engine(f"sqlite:///{{home / 'mmapp.db'}}")
holder = {{}}

def run_fn(trigger):
    slot = latest_slot(holder["s"].trigger, __import__("datetime").datetime.now(__import__("datetime").timezone.utc))
    with open(log, "a") as fh:
        fh.write(f"{{os.getpid()}} {{slot.isoformat()}}\\n")

holder["s"] = start_scheduler(config, engine, run_fn)
time.sleep(float(sys.argv[3]))
holder["s"].shutdown()
"""


def test_two_app_processes_fire_each_slot_once(home, tmp_path):
    log = tmp_path / "fired.log"
    script = _PROCESS_SCRIPT.format(repo=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), str(log), "4"], cwd=tmp_path,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()[-3000:]
    lines = log.read_text().split("\n") if log.exists() else []
    slots = [line.split()[1] for line in lines if line]
    assert len(slots) >= 2, f"expected the every-second cron to fire, got {lines}"
    assert len(slots) == len(set(slots)), f"a slot fired twice: {collections.Counter(slots).most_common(3)}"
    assert len({line.split()[0] for line in lines if line}) <= 2


def test_operator_trigger_twice_gives_one_run(config, engine, source, home):
    feed_new_concepts(engine, source, 60)
    engines = [make_engine(f"sqlite:///{home / 'mmapp.db'}") for _ in range(2)]
    barrier = threading.Barrier(2)
    results = [None, None]

    def click(i):
        barrier.wait()
        results[i] = trigger_now(config, engines[i], features=source, wait=True)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["started"] for r in results) == [False, True]
    winner = next(r for r in results if r["started"])
    assert winner["outcome"]["status"] in ("promoted", "refused")
    with Session(engine) as s:
        runs = s.scalars(select(RetrainRun)).all()
    assert [(r.id, r.trigger) for r in runs] == [(winner["run_id"], "operator")]
    for e in engines:
        e.dispose()
