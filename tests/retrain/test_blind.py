"""Blind before/after evaluation: the win-rate interval against a naive reference, and a synthetic retrain whose
held candidate is promoted when raters prefer it and rejected when they do not (real SQLite, real model folders)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import BlindPair, Correction, ModelVersion, RetrainRun
from mmapp.model_store import ModelStore
from retrain.blind import decide_held, judge, read_win_rate, wilson_interval, win_rate
from retrain.job import run_retrain
from retrain.report import build_report

from .world import feed_new_concepts, make_config


def naive_wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval by definition: every p the score test does not reject, found on a fine grid."""
    grid = np.linspace(0, 1, 200_001)
    phat = successes / n
    keep = np.abs(phat - grid) <= z * np.sqrt(grid * (1 - grid) / n) + 1e-12
    return float(grid[keep].min()), float(grid[keep].max())


@pytest.mark.parametrize("successes,n", [(0, 5), (5, 5), (3, 10), (7.5, 12), (31, 40), (1, 1), (250, 1000)])
def test_wilson_interval_matches_the_score_test_by_brute_force(successes, n):
    low, high = wilson_interval(successes, n)
    ref_low, ref_high = naive_wilson(successes, n)
    assert low == pytest.approx(ref_low, abs=2e-5) and high == pytest.approx(ref_high, abs=2e-5)
    assert low <= successes / n <= high


def test_wilson_interval_refuses_impossible_counts_and_is_uninformative_without_votes():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in ((3, 2), (-1, 4)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(*bad)


def test_win_rate_counts_same_as_half_and_judge_waits_for_votes():
    w = win_rate({"candidate": 6, "current": 2, "same": 2, "pairs": 4, "raters": 3})
    assert w.votes == 10 and w.rate == pytest.approx(0.7)
    assert (w.low, w.high) == pytest.approx(wilson_interval(7, 10))
    assert judge(w, min_votes=11, min_win_rate=0.4)[0] == "waiting"
    assert judge(w, min_votes=10, min_win_rate=0.39)[0] == "promoted"  # lower bound ~0.40
    assert judge(w, min_votes=10, min_win_rate=0.5)[0] == "rejected"


def _vote(engine, version: str, *, favour: str, raters: int) -> None:
    """Each rater votes on every pair of ``version`` (held ones are offered first): for the candidate's side or
    the other one."""
    with Session(engine) as s, s.begin():
        for r in range(raters):
            while (pair := repo.next_blind_pair(s, rater=f"account:r{r}")) is not None:
                if pair.candidate_version != version:
                    break
                other = "b" if pair.candidate_side == "a" else "a"
                repo.record_blind_vote(s, pair_id=pair.id, rater=f"account:r{r}",
                                       choice=pair.candidate_side if favour == "candidate" else other)


def _registry(engine) -> dict[str, tuple[str, bool]]:
    with Session(engine) as s:
        return {v.version: (v.status, v.is_current) for v in s.scalars(select(ModelVersion))}


@pytest.mark.parametrize("favour", ["candidate", "current"])
def test_a_held_candidate_is_decided_by_blind_votes(home, engine, source, favour):
    config = make_config(home, blind_required=True, blind_pairs=12, blind_min_votes=20, blind_min_win_rate=0.5)
    feed_new_concepts(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    assert out.status == "held", out.message
    store = ModelStore(home / "models")
    assert _registry(engine)[out.version] == ("candidate", False)  # saved, registered, not served
    assert store.current() == "bootstrap" and store.exists(out.version)
    with Session(engine) as s:
        pairs = s.scalars(select(BlindPair).where(BlindPair.candidate_version == out.version)).all()
        assert 0 < len(pairs) <= 12 and len(pairs) == out.stats["blind"]["pairs"]
        assert all(p.output_a != p.output_b and p.current_version == "bootstrap" for p in pairs)
        assert {p.candidate_side for p in pairs} <= {"a", "b"}
        assert s.get(RetrainRun, out.run_id).status == "succeeded"
        assert not s.scalars(select(Correction).where(Correction.status == "used")).all()  # not yet served

    assert [d.action for d in decide_held(config, engine)] == ["waiting"]  # no votes yet
    _vote(engine, out.version, favour=favour, raters=max(2, math.ceil(20 / len(pairs))))
    result = read_win_rate(engine, out.version)
    assert result.votes >= 20 and result.rate == (1.0 if favour == "candidate" else 0.0)

    report = json.loads(build_report(config, engine, version=out.version)["json"].read_text())["blind"]
    assert (report["votes"], report["rate"], report["required"]) == (result.votes, result.rate, True)
    assert (report["low"], report["high"]) == pytest.approx(wilson_interval(result.rate * result.votes, result.votes))

    decisions = decide_held(config, engine)
    assert [d.version for d in decisions] == [out.version]
    with Session(engine) as s:
        run = s.get(RetrainRun, out.run_id)
        used = s.scalars(select(Correction).where(Correction.status == "used")).all()
    if favour == "candidate":
        assert decisions[0].action == "promoted"
        assert _registry(engine)[out.version] == ("promoted", True) and store.current() == out.version
        assert run.status == "promoted" and used and all(c.used_in_version == out.version for c in used)
    else:
        assert decisions[0].action == "rejected"
        assert _registry(engine)[out.version] == ("rejected", False) and store.current() == "bootstrap"
        assert run.status == "refused" and not used
    assert decide_held(config, engine) == []  # decided once


def test_without_the_requirement_pairs_are_stored_and_promotion_is_unchanged(home, engine, source):
    config = make_config(home, blind_pairs=8)
    feed_new_concepts(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted", out.message
    assert 0 < out.stats["blind"]["pairs"] <= 8
    with Session(engine) as s, s.begin():
        pair = repo.next_blind_pair(s, rater="session:x")
        assert pair is not None and pair.candidate_version == out.version


def test_a_held_candidate_whose_parent_no_longer_serves_is_rejected_as_stale(home, engine, source):
    held_config = make_config(home, blind_required=True, blind_pairs=8, blind_min_votes=1)
    feed_new_concepts(engine, source, 120)
    held = run_retrain(held_config, engine, features=source)
    assert held.status == "held", held.message
    feed_new_concepts(engine, source, 60, start=120)
    later = run_retrain(make_config(home, blind_pairs=8), engine, features=source)
    assert later.status == "promoted", later.message
    _vote(engine, held.version, favour="candidate", raters=1)
    decisions = decide_held(held_config, engine)
    assert [(d.version, d.action) for d in decisions] == [(held.version, "rejected")]
    assert "stale" in decisions[0].reason
    assert _registry(engine)[held.version] == ("rejected", False) and _registry(engine)[later.version][1]


def test_decide_held_command(home, engine, source, capsys):
    from retrain.__main__ import main

    assert main(["--home", str(home), "decide-held"]) == 0
    assert "no candidate is held" in capsys.readouterr().out


def test_the_worker_decides_held_candidates_between_runs_not_during_one(home, engine, source):
    from retrain.worker import RetrainWorker

    config = make_config(home, blind_required=True, blind_pairs=8, blind_min_votes=4, blind_min_win_rate=0.3)
    feed_new_concepts(engine, source, 120)
    held = run_retrain(config, engine, features=source)
    assert held.status == "held", held.message
    _vote(engine, held.version, favour="candidate", raters=4)
    worker = RetrainWorker(config, engine)
    with worker._run_lock:  # a run in flight: the poll leaves the decision for later
        assert worker.decide_held() == []
    assert [(d.version, d.action) for d in worker.decide_held()] == [(held.version, "promoted")]
    assert ModelStore(home / "models").current() == held.version
