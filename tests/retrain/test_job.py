"""The retrain run end to end on the synthetic world: real SQLite file, real model folders."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db.engine import make_engine
from feedback_db.models import Correction, ModelVersion, RejectedItem, RetrainRun
from mmapp.model_store import ModelStore
from retrain.job import begin_run, run_retrain
from retrain.promotion import adopt_store_current, promote_version, rollback_version

from .world import feed_new_concepts, feed_poison, make_config

REPO = Path(__file__).resolve().parents[2]


def registry(engine):
    with Session(engine) as s:
        return [(v.version, v.status, v.is_current) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]


def assert_one_current(engine, store, expected):
    current = [v for v, _, is_current in registry(engine) if is_current]
    assert current == [expected]
    assert store.current() == expected


def test_new_concepts_are_learned_and_promoted(config, engine, source, home):
    feed_new_concepts(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted", out.message
    store = ModelStore(home / "models")
    assert_one_current(engine, store, out.version)
    assert registry(engine)[0] == ("bootstrap", "retired", False)
    assert out.metrics["candidate"]["heldout_corrections.mean_R@1"] > out.metrics["current"]["heldout_corrections.mean_R@1"]

    with Session(engine) as s:
        statuses = {c.status for c in s.scalars(select(Correction))}
        used = s.scalars(select(Correction).where(Correction.status == "used")).all()
        rejected = s.scalars(select(RejectedItem)).all()
        run = s.get(RetrainRun, out.run_id)
        assert run.status == "promoted" and run.progress == 1.0 and run.report_path
    assert statuses <= {"used", "new", "rejected"} and used and all(c.used_in_version == out.version for c in used)
    assert all(r.reason and r.detail.get("text") for r in rejected)  # every rejection keeps its reason and item
    manifest = json.loads(Path(out.stats["manifest_path"]).read_text())
    assert manifest["seed"] == 0 and len(manifest["data"]["snapshot_sha256"]) == 64 and manifest["code_version"]
    assert manifest["metrics"]["candidate"] and manifest["config"]["retrain"]["replay_size"] == 120
    assert store.load(out.version).meta.manifest["version"] == out.version
    assert Path(out.report["html"]).is_file()
    local = out.stats["training"]["alignment"]["local_mix"]  # chosen, or skipped with the reason
    assert "near_mix" in local or local.get("skipped")
    assert out.stats["towers"].startswith("frozen")


def test_a_requested_unfreeze_is_reported_not_silently_dropped(config, engine, source, caplog):
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, unfreeze_last_n=2))
    feed_new_concepts(engine, source, 60)
    out = run_retrain(config, engine, features=source)
    assert "unfreeze_last_n=2" in out.stats["towers"]
    assert "unfreeze_last_n=2 is not applied" in caplog.text


@pytest.mark.parametrize("rater_min_items", [10, 0])
def test_poisoned_corrections_are_mostly_rejected_and_not_promoted(config, engine, source, rater_min_items):
    # 12 trolls, 10 random captions each. Per rater (the default) each troll's batch as a whole fits no better
    # than random captions: all of it goes (chance_rater) and nothing is left to train. Pair by pair (0) the
    # lucky ~16 % pass the chance test and the gate must refuse the candidate.
    config = dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, rater_min_items=rater_min_items))
    feed_new_concepts(engine, source, 120)
    first = run_retrain(config, engine, features=source)
    assert first.status == "promoted"
    feed_poison(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    with Session(engine) as s:
        poison = s.scalars(select(Correction).where(Correction.value.like("totally unrelated%"))).all()
        reasons = {r.reason for r in s.scalars(select(RejectedItem).where(RejectedItem.run_id == out.run_id))}
    rejected = sum(c.status == "rejected" for c in poison)
    if rater_min_items:
        assert rejected == len(poison) and reasons == {"chance_rater"}
        assert out.status == "skipped" and "nothing to learn" in out.message
    else:
        assert rejected >= 0.7 * len(poison), f"only {rejected} of {len(poison)} poisoned corrections rejected"
        assert out.status == "refused", out.message
    assert out.current_version == first.version


def test_nothing_new_is_a_quick_no_op(config, engine, source):
    out = run_retrain(config, engine, features=source)
    assert out.status == "skipped" and "nothing to learn" in out.message
    with Session(engine) as s:
        assert s.get(RetrainRun, out.run_id).status == "succeeded"


def test_two_triggers_at_the_same_moment_give_one_run(home):
    engines = [make_engine(f"sqlite:///{home / 'mmapp.db'}") for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    handles = [None] * len(engines)

    def trigger(i):
        barrier.wait()
        handles[i] = begin_run(engines[i], trigger="operator", settings=make_config(home).retrain)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [h for h in handles if h is not None]
    assert len(started) == 1
    with Session(engines[0]) as s:
        assert [r.status for r in s.scalars(select(RetrainRun))] == ["running"]
    started[0].close()
    for e in engines:
        e.dispose()


def test_a_busy_database_is_retried_not_lost(home, caplog):
    impatient = make_engine(f"sqlite:///{home / 'mmapp.db'}", busy_timeout_s=0.05)
    blocker = sqlite3.connect(home / "mmapp.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    threading.Timer(0.15, lambda: blocker.execute("COMMIT")).start()
    with caplog.at_level("WARNING", logger="feedback_db.engine"):
        handle = begin_run(impatient, trigger="cli", settings=make_config(home).retrain)
    assert handle is not None
    assert any("database busy" in r.message for r in caplog.records)
    handle.close()
    blocker.close()
    impatient.dispose()


def test_promotion_is_atomic_and_rollback_restores_exactly_one_current(config, engine, source, home):
    store = ModelStore(home / "models")
    adopt_store_current(engine, store)
    feed_new_concepts(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted"

    # A failure inside the promotion transaction registers nothing and leaves the pointer alone.
    boot = store.load("bootstrap")
    store.save("half-done", boot.space, meta=boot.meta, fusion_head=boot.fusion_head,
               fusion_config=boot.fusion_config, fusion_name="concat")

    def crash(_s):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        promote_version(engine, store, version="half-done", parent_version=out.version, metrics={}, manifest={},
                        in_transaction=crash)
    assert "half-done" not in [v for v, _, _ in registry(engine)]
    assert_one_current(engine, store, out.version)

    assert rollback_version(engine, store, "bootstrap") == "bootstrap"
    assert_one_current(engine, store, "bootstrap")
    assert rollback_version(engine, store) == out.version  # default: the previously promoted one
    assert_one_current(engine, store, out.version)
    with pytest.raises(ValueError, match="unknown model version"):
        rollback_version(engine, store, "nope")
    assert_one_current(engine, store, out.version)


_KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from feedback_db.engine import make_engine
from retrain.job import run_retrain
from tests.retrain.world import SyntheticSource, make_config

home, marker = Path(sys.argv[1]), Path(sys.argv[2])
config = make_config(home, n_bootstrap=20, heartbeat_s=0.2, lock_ttl_s=1.5, stale_after_s=1.5,
                     finetune={{"epochs": 100000}})  # trains until killed
run_retrain(config, make_engine(f"sqlite:///{{home / 'mmapp.db'}}"),
            features=SyntheticSource(registry_path=home / "world.json"),
            on_stage=lambda name: name == "train" and marker.write_text("training"))
"""


def test_kill_9_mid_training_leaves_the_current_model_and_the_next_run_succeeds(config, engine, source, home, tmp_path):
    feed_new_concepts(engine, source, 120)
    marker = tmp_path / "training"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(repo=str(REPO)), str(home), str(marker)],
                            cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached training"
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the training loop
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    store = ModelStore(home / "models")
    assert registry(engine) == [("bootstrap", "promoted", True)]  # no partial version registered
    assert store.current() == "bootstrap" and store.list_versions() == ["bootstrap"]
    with Session(engine) as s:
        (dead,) = s.scalars(select(RetrainRun)).all()
        assert dead.status == "running"
        assert {c.status for c in s.scalars(select(Correction))} == {"new"}

    time.sleep(1.6)  # the dead worker's lease and heartbeat expire
    out = run_retrain(make_config(home, lock_ttl_s=1.5, stale_after_s=1.5), engine, features=source)
    assert out.status == "promoted", out.message
    with Session(engine) as s:
        assert s.get(RetrainRun, dead.id).status == "failed"
        assert "heartbeat" in s.get(RetrainRun, dead.id).message
    assert_one_current(engine, store, out.version)
