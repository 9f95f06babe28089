"""Blind comparison rows (issue 10, item 4): pairs of one run, one vote per rater per pair, decoded counts.
Runs on SQLite and, with MMAPP_TEST_POSTGRES_URL, on Postgres."""
from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import BlindPair, BlindVote


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _pair(i: int, side: str) -> dict[str, str]:
    return {"item_id": f"correction:{i}", "image_sha256": _sha(f"img{i}"), "image_relpath": f"ab/{i}.png",
            "output_a": f"a caption {i}", "output_b": f"another caption {i}", "candidate_side": side}


@pytest.fixture
def held(engine) -> tuple[int, str]:
    """A bootstrap version (current), a run, and a held candidate with 3 pairs (candidate on a, b, a)."""
    with Session(engine) as s, s.begin():
        repo.register_version(s, version="v0", path="/m/v0", sha256=_sha("v0"))
        s.flush()
        repo.promote(s, "v0")
        run = repo.start_retrain_run(s, trigger="cli", owner="test")
        repo.register_version(s, version="v1", path="/m/v1", sha256=_sha("v1"), parent_version="v0")
        s.flush()
        repo.add_blind_pairs(s, run_id=run.id, candidate_version="v1", current_version="v0",
                             pairs=[_pair(1, "a"), _pair(2, "b"), _pair(3, "a")])
        return run.id, "v1"


def test_pairs_are_stored_and_served_fewest_votes_first_once_per_rater(engine, held):
    with Session(engine) as s, s.begin():
        first = repo.next_blind_pair(s, rater="account:ann")
        assert first.item_id == "correction:1" and first.candidate_version == "v1"
        repo.record_blind_vote(s, pair_id=first.id, rater="account:ann", choice="a")
        assert repo.next_blind_pair(s, rater="account:bob").item_id == "correction:2"  # fewest votes first
        seen = [first.item_id]
        while (p := repo.next_blind_pair(s, rater="account:ann")) is not None:
            repo.record_blind_vote(s, pair_id=p.id, rater="account:ann", choice="same")
            seen.append(p.item_id)
        assert sorted(seen) == ["correction:1", "correction:2", "correction:3"]


def test_one_vote_per_rater_per_pair(engine, held):
    with Session(engine) as s, s.begin():
        pair = repo.next_blind_pair(s, rater="session:x")
        vote, created = repo.record_blind_vote(s, pair_id=pair.id, rater="session:x", choice="a")
        again, created_again = repo.record_blind_vote(s, pair_id=pair.id, rater="session:x", choice="b")
        assert created and not created_again and again.id == vote.id and again.choice == "a"
        assert s.scalar(select(func.count()).select_from(BlindVote)) == 1


def test_tally_decodes_sides(engine, held):
    with Session(engine) as s, s.begin():
        pairs = {p.item_id: p for p in s.scalars(select(BlindPair))}
        # pair 1: candidate is a; pair 2: candidate is b
        repo.record_blind_vote(s, pair_id=pairs["correction:1"].id, rater="r1", choice="a")  # candidate
        repo.record_blind_vote(s, pair_id=pairs["correction:1"].id, rater="r2", choice="b")  # current
        repo.record_blind_vote(s, pair_id=pairs["correction:2"].id, rater="r1", choice="b")  # candidate
        repo.record_blind_vote(s, pair_id=pairs["correction:2"].id, rater="r3", choice="same")
        assert repo.blind_tally(s, "v1") == {"candidate": 2, "current": 1, "same": 1, "votes": 4, "pairs": 3,
                                             "raters": 3}
        assert repo.blind_tally(s, "nothing") == {"candidate": 0, "current": 0, "same": 0, "votes": 0, "pairs": 0,
                                                  "raters": 0}
        assert [v.version for v in repo.held_candidates(s)] == ["v1"]


def test_bad_input_is_refused_and_nothing_half_written(engine, held):
    run_id, _ = held
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="candidate_side"):
            repo.add_blind_pairs(s, run_id=run_id, candidate_version="v1", current_version="v0",
                                 pairs=[_pair(7, "a"), _pair(8, "c")])
        with pytest.raises(ValueError, match="output_b"):
            repo.add_blind_pairs(s, run_id=run_id, candidate_version="v1", current_version="v0",
                                 pairs=[{**_pair(9, "a"), "output_b": " "}])
        with pytest.raises(ValueError, match="unknown retrain run"):
            repo.add_blind_pairs(s, run_id=run_id + 99, candidate_version="v1", current_version="v0", pairs=[])
        assert s.scalar(select(func.count()).select_from(BlindPair)) == 3
        pair = repo.next_blind_pair(s, rater="r")
        with pytest.raises(ValueError, match="choice"):
            repo.record_blind_vote(s, pair_id=pair.id, rater="r", choice="both")
        with pytest.raises(ValueError, match="unknown blind pair"):
            repo.record_blind_vote(s, pair_id=10_000, rater="r", choice="a")


def test_pairs_of_rejected_versions_are_not_shown(engine, held):
    with Session(engine) as s, s.begin():
        repo.reject_version(s, "v1")
        assert repo.next_blind_pair(s, rater="r") is None
        assert repo.held_candidates(s) == []
