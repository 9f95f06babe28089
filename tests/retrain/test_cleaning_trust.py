"""The trust rules of cleaning: trusted annotators count fully; anonymous sessions (and untrusted
accounts) cannot push anything in by numbers alone. Text embeddings are seeded random vectors: the
wordings of one caption are close to each other (cosine ~0.9), different captions are not."""
from __future__ import annotations

import numpy as np
import pytest

from retrain.cleaning import (
    ANONYMOUS_CAP,
    ANONYMOUS_UNCONFIRMED,
    LABEL_DISAGREEMENT,
    USER_SHARE,
    Candidate,
    CleaningConfig,
    cap_user_share,
    check_label_quorum,
    clean,
    confirm_untrusted,
)

DIM = 32
RNG = np.random.default_rng(0)
WRONG = RNG.normal(size=DIM)  # "a garbage fire"
RIGHT = RNG.normal(size=DIM)  # what the pictures show
KIND_IMAGES = [f"{i:064x}" for i in range(30)]  # 30 pictures of one kind
MEME = "f" * 64


def wording(base: np.ndarray, k: int) -> np.ndarray:
    """The k-th of ten wordings of one caption: a small, fixed nudge of its embedding (cosine ~0.9)."""
    return base + 0.3 * np.random.default_rng(100 + k).normal(size=DIM)


def caption(i: int, user: str, image: str, base: np.ndarray, k: int = 0, *, trusted: bool = False) -> Candidate:
    text = f"{'a garbage fire' if base is WRONG else 'a red tram'} variant {k}"
    return Candidate(f"c{i}", user, "pair", image, text, image_embedding=RNG.normal(size=DIM),
                     text_embedding=wording(base, k), trusted=trusted)


def label(i: int, user: str, value: str, *, trusted: bool = False, image: str = MEME) -> Candidate:
    return Candidate(f"l{i}", user, "label", image, "when the build is green", label=value, trusted=trusted)


def sybil_batch() -> list[Candidate]:
    """100 throwaway sessions: 3 corrections each, one of ten wordings of one wrong caption on 30
    pictures of one kind (300 corrections), and each session also labels one meme "dark humor"."""
    items: list[Candidate] = []
    for n in range(300):
        session = f"session:bot{n % 100}"
        items.append(caption(n, session, KIND_IMAGES[n % 30], WRONG, k=n % 10))
    items += [label(n, f"session:bot{n}", "dark humor") for n in range(100)]
    return items


def accepted_ids(cands, config) -> set[str]:
    return {c.item_id for c in clean(cands, config).accepted}


def test_a_sybil_batch_of_100_sessions_gets_nothing_in_by_default():
    config = CleaningConfig()  # the shipped default: anonymous_rule="trusted_agreement"
    assert config.anonymous_rule == "trusted_agreement"
    result = clean(sybil_batch(), config)
    assert result.accepted == []
    assert result.counts()[ANONYMOUS_UNCONFIRMED] == 400  # held back, not final: a trusted rater may confirm
    assert all(not r.final for r in result.rejected if r.reason == ANONYMOUS_UNCONFIRMED)


def test_a_sybil_batch_cannot_outvote_or_ride_on_a_trusted_annotator():
    trusted = [caption(1000 + j, "alice", image, RIGHT, trusted=True) for j, image in enumerate(KIND_IMAGES)]
    trusted.append(label(1000, "alice", "positive", trusted=True))
    result = clean(sybil_batch() + trusted, CleaningConfig())
    accepted = {c.item_id for c in result.accepted}
    assert accepted == {c.item_id for c in trusted}  # every trusted item, no sybil item
    reasons = {r.candidate.item_id: r.reason for r in result.rejected}
    assert {reasons[f"l{n}"] for n in range(100)} == {LABEL_DISAGREEMENT}  # 100 votes lose to one trusted label


def test_anonymous_items_that_agree_with_a_trusted_rater_are_kept():
    trusted = caption(1, "alice", KIND_IMAGES[0], RIGHT, trusted=True)
    agreeing = caption(2, "session:x", KIND_IMAGES[0], RIGHT, k=3)  # another wording of the same caption
    elsewhere = caption(3, "session:y", KIND_IMAGES[1], RIGHT, k=3)  # no trusted rater saw this picture
    kept, rejected = confirm_untrusted([trusted, agreeing, elsewhere], CleaningConfig())
    assert [c.item_id for c in kept] == ["c1", "c2"]
    assert [(r.candidate.item_id, r.reason) for r in rejected] == [("c3", ANONYMOUS_UNCONFIRMED)]


def test_quorum_rule_caps_what_a_sybil_script_gets_in_per_run():
    config = CleaningConfig(anonymous_rule="quorum", anonymous_quorum=3, max_anonymous_per_run=20)
    kept, rejected = confirm_untrusted(sybil_batch(), config)
    assert len(kept) == 20  # the script satisfies the quorum, so only the per-run cap bounds it
    assert sum(r.reason == ANONYMOUS_CAP for r in rejected) == 380
    lone = [caption(1, "session:a", KIND_IMAGES[0], RIGHT), caption(2, "session:b", KIND_IMAGES[1], RIGHT)]
    kept, rejected = confirm_untrusted(lone, config)  # one session per picture: no quorum
    assert kept == [] and {r.reason for r in rejected} == {ANONYMOUS_UNCONFIRMED}


def test_one_trusted_annotators_300_corrections_are_not_capped():
    images = [f"{i:064x}" for i in range(300)]
    mine = [Candidate(f"t{i}", "alice", "pair", image, f"caption {i}", trusted=True) for i, image in enumerate(images)]
    kept, rejected = cap_user_share(mine, max_share=0.3)
    assert len(kept) == 300 and rejected == []
    # an anonymous session beside them is still capped against the total
    theirs = [Candidate(f"a{i}", "session:z", "pair", f"{i + 1000:064x}", f"other {i}") for i in range(300)]
    kept, rejected = cap_user_share(mine + theirs, max_share=0.3)
    assert sum(c.trusted for c in kept) == 300
    assert {r.reason for r in rejected} == {USER_SHARE} and all(not r.candidate.trusted for r in rejected)
    assert sum(not c.trusted for c in kept) <= 0.3 * len(kept) + 1


def test_a_trusted_label_is_a_quorum_of_its_own_as_configured():
    votes = [label(1, "alice", "positive", trusted=True), label(2, "session:a", "sarcastic")]
    kept, _ = check_label_quorum(votes, quorum=2, trusted_votes=2)
    assert [c.item_id for c in kept] == ["l1"]
    kept, rejected = check_label_quorum(votes, quorum=3, trusted_votes=2)  # configured: not alone
    assert kept == [] and len(rejected) == 2


def test_anonymous_rule_is_validated():
    with pytest.raises(ValueError, match="anonymous_rule must be one of"):
        CleaningConfig(anonymous_rule="everyone")
