"""Each cleaning rule on a small hand-made case, then the whole chain."""
from __future__ import annotations

import numpy as np
import pytest

from retrain.cleaning import (
    CHANCE_AGREEMENT,
    CHANCE_RATER,
    EXACT_DUPLICATE,
    LABEL_DISAGREEMENT,
    NEAR_DUPLICATE,
    NO_QUORUM,
    SIMILARITY_OUTLIER,
    USER_SHARE,
    Candidate,
    CleaningConfig,
    cap_user_share,
    check_label_quorum,
    clean,
    drop_exact_duplicates,
    drop_near_duplicates,
    flag_chance_agreement,
    flag_similarity_outliers,
    user_quota,
)


def pair(i, user="u1", image="a" * 64, text="a cat", agreement=float("nan"), img=None, txt=None):
    return Candidate(f"c{i}", user, "pair", image, text, image_embedding=img, text_embedding=txt, agreement=agreement)


def label(i, user, lab, image="b" * 64, text="best day ever"):
    return Candidate(f"l{i}", user, "label", image, text, label=lab)


def ids(items):
    return [getattr(x, "item_id", None) or x.candidate.item_id for x in items]


def test_quorum_keeps_agreed_label_and_rejects_the_dissenter():
    kept, rejected = check_label_quorum(
        [label(1, "u1", "sarcastic"), label(2, "u2", "sarcastic"), label(3, "u3", "positive")], quorum=2)
    assert ids(kept) == ["l1", "l2"]
    assert [(r.candidate.item_id, r.reason) for r in rejected] == [("l3", LABEL_DISAGREEMENT)]
    assert rejected[0].detail["agreed_label"] == "sarcastic" and rejected[0].final


def test_quorum_holds_back_a_split_vote_and_ignores_single_raters():
    items = [label(1, "u1", "sarcastic"), label(2, "u2", "positive"),  # two raters disagree on image b
             label(3, "u3", "dark humor", image="c" * 64)]  # one rater on image c: nothing to agree on
    kept, rejected = check_label_quorum(items, quorum=2)
    assert ids(kept) == ["l3"]
    assert {r.reason for r in rejected} == {NO_QUORUM} and not rejected[0].final
    assert rejected[0].detail["votes"] == {"sarcastic": 1, "positive": 1}


def test_quorum_counts_a_users_repeated_votes_once():
    items = [label(1, "u1", "sarcastic"), label(2, "u1", "sarcastic"), label(3, "u2", "positive")]
    _, rejected = check_label_quorum(items, quorum=2)
    assert len(rejected) == 3 and {r.reason for r in rejected} == {NO_QUORUM}


def test_exact_duplicates_fold_case_and_punctuation():
    kept, rejected = drop_exact_duplicates([pair(1, text="A cat."), pair(2, text="a  cat"),
                                            pair(3, text="a dog"), pair(4, image="f" * 64, text="a cat")])
    assert ids(kept) == ["c1", "c3", "c4"]
    assert rejected[0].reason == EXACT_DUPLICATE and rejected[0].detail == {"duplicate_of": "c1"}
    # another rater's identical caption agrees: collapsed into the first, not rejected
    kept, rejected = drop_exact_duplicates([pair(1, text="A cat."), pair(2, user="u2", text="a  cat")])
    assert ids(kept) == ["c1"] and rejected == []


def test_near_duplicates_need_both_image_and_text_close():
    rng = np.random.default_rng(0)
    img, txt, other = rng.normal(size=16), rng.normal(size=8), rng.normal(size=8)
    items = [pair(1, img=img, txt=txt),
             pair(2, image="d" * 64, img=img + 0.01 * rng.normal(size=16), txt=txt + 0.01 * rng.normal(size=8)),
             pair(3, image="e" * 64, img=img, txt=other)]  # same picture, a different caption: kept
    kept, rejected = drop_near_duplicates(items, 0.98)
    assert ids(kept) == ["c1", "c3"]
    assert rejected[0].reason == NEAR_DUPLICATE and rejected[0].detail["duplicate_of"] == "c1"
    assert rejected[0].detail["image_cos"] >= 0.98 and rejected[0].detail["text_cos"] >= 0.98


def test_outliers_against_trusted_reference():
    reference = np.array([0.30, 0.32, 0.28, 0.31, 0.29, 0.33, 0.27, 0.30])
    items = [pair(1, agreement=0.29), pair(2, agreement=0.05), label(3, "u1", "positive")]
    kept, rejected = flag_similarity_outliers(items, -2.5, reference)
    assert ids(kept) == ["c1", "l3"]  # label items are never judged by agreement
    assert rejected[0].reason == SIMILARITY_OUTLIER and rejected[0].detail["robust_z"] < -2.5


def test_outliers_against_the_other_candidates_and_too_few_to_tell():
    items = [pair(i, agreement=a) for i, a in enumerate([0.3, 0.31, 0.29, 0.32, 0.3, 0.28, -0.2])]
    kept, rejected = flag_similarity_outliers(items, -2.5)
    assert ids(rejected) == ["c6"] and len(kept) == 6
    assert flag_similarity_outliers(items[:3] + items[-1:], -2.5)[1] == []  # 4 scores: no spread estimate


def test_user_quota_water_filling():
    assert user_quota([3, 3, 3, 3], 0.3) is None  # 25% each already
    k = user_quota([100, 10, 10, 10], 0.3)
    assert k == 12 and k <= 0.3 * (k + 30)  # the flooder keeps 12 of 42 = 28.6%
    assert user_quota([5], 0.3) == 1  # a lone contributor still counts once


def test_cap_user_share_keeps_each_users_earliest_items():
    items = [pair(i, user="flood", image=f"{i:064x}") for i in range(20)]
    items += [pair(100 + i, user=f"u{i}", image=f"{100 + i:064x}") for i in range(6)]
    kept, rejected = cap_user_share(items, 0.3)
    flood_kept = [c for c in kept if c.user == "flood"]
    assert ids(flood_kept) == [f"c{i}" for i in range(len(flood_kept))]
    assert len(flood_kept) <= 0.3 * len(kept)
    assert {r.reason for r in rejected} == {USER_SHARE} and not rejected[0].final


def test_clean_chains_rules_and_reports_counts():
    items = [label(1, "u1", "sarcastic"), label(2, "u2", "positive"),
             pair(3, user="u3", text="a red car", agreement=3.0), pair(4, user="u4", text="A red car!", agreement=3.0)]
    items += [pair(10 + i, user=f"v{i}", image=f"{i:064x}", text=f"caption {i}", agreement=3.0 + 0.1 * (i % 3))
              for i in range(8)]
    items.append(pair(99, user="v9", image="9" * 64, text="noise", agreement=-0.5))
    result = clean(items, CleaningConfig(anonymous_rule="open"))  # the other rules alone
    assert result.counts() == {NO_QUORUM: 2, SIMILARITY_OUTLIER: 1}
    assert result.merged == {"c4": "c3"}  # u4 agrees with u3 word for word: one example, not a rejection
    assert len(result.accepted) == len(items) - 4


def test_chance_agreement_catches_a_batch_that_is_all_noise():
    # Every caption random: no outlier against the others, but none beats random captions either.
    items = [pair(i, user=f"u{i}", image=f"{i:064x}", agreement=a) for i, a in enumerate([0.1, -0.3, 0.5, 2.2, -1.0, 0.0])]
    assert flag_similarity_outliers(items, -2.5)[1] == []
    kept, rejected = flag_chance_agreement(items, 1.0)
    assert ids(kept) == ["c3"] and {r.reason for r in rejected} == {CHANCE_AGREEMENT}
    result = clean(items, CleaningConfig(min_agreement=1.0, anonymous_rule="open"))
    assert [c.item_id for c in result.accepted] == ["c3"]


def _rater_batch(user, agreements, start):
    return [pair(start + i, user=user, image=f"{start + i:064x}", text=f"{user} caption {i}", agreement=a)
            for i, a in enumerate(agreements)]


def test_a_reliable_raters_near_misses_are_kept_and_a_random_raters_lucky_hits_are_not():
    # honest: 20 pairs, 4 under the 1-SD bar (three of them above a random caption's mean, one far below)
    honest = _rater_batch("honest", [2.0] * 16 + [0.6, 0.3, 0.05, -1.5], 0)
    # random captions: 20 pairs, 17 under the bar and 3 over it by luck (what p0 = 0.84 predicts)
    noise = _rater_batch("noise", [-1.0, -0.5, 0.0, 0.5, 0.9] * 3 + [-0.2, 0.4, 1.3, 1.6, 2.1], 100)
    # a throwaway session with 3 pairs: too few to judge the rater, each pair is judged alone
    few = _rater_batch("few", [0.5, 0.8, 1.4], 200)
    rescued, raters = {}, {}
    kept, rejected = flag_chance_agreement(honest + noise + few, 1.0, rater_min_items=10, rescued=rescued, raters=raters)
    reasons = {r.candidate.item_id: r.reason for r in rejected}
    assert sorted(rescued) == ["c16", "c17", "c18"]  # 0.6, 0.3 and 0.05 kept: the rater beats chance by far
    assert reasons["c19"] == CHANCE_AGREEMENT  # -1.5: worse than an average random caption, still rejected
    assert {reasons[c.item_id] for c in noise} == {CHANCE_RATER}  # all 20, the 3 lucky ones included
    assert reasons["c200"] == reasons["c201"] == CHANCE_AGREEMENT and "c202" in ids(kept)
    assert raters["honest"]["verdict"] == "reliable" and raters["noise"]["verdict"] == "chance"
    assert raters["noise"]["p_value"] > 0.05 > raters["honest"]["p_value"] and "few" not in raters
    assert rescued["c16"]["rater"] == "honest" and raters[rescued["c16"]["rater"]]["fail_share"] == 0.2


def test_a_rater_between_reliable_and_random_is_judged_pair_by_pair():
    # 10 of 20 under the bar: clearly better than random captions (p0 = 0.84), but too many misses to vouch for them
    items = _rater_batch("mixed", [2.0] * 10 + [0.5] * 10, 0)
    raters = {}
    kept, rejected = flag_chance_agreement(items, 1.0, rater_min_items=10, raters=raters)
    assert raters["mixed"]["verdict"] == "pair by pair"
    assert len(kept) == 10 and {r.reason for r in rejected} == {CHANCE_AGREEMENT}
    # off (rater_min_items 0): the same as the pair-by-pair rule
    assert ids(flag_chance_agreement(items, 1.0)[0]) == ids(kept)


def test_the_rater_rule_runs_in_clean_with_its_knobs_and_skips_trusted_raters():
    honest = _rater_batch("honest", [2.0] * 16 + [0.6, 0.3, 0.05, -1.5], 0)
    result = clean(honest, CleaningConfig(anonymous_rule="open", outlier_z=-10, max_user_share=1.0))
    assert sorted(result.rescued) == ["c16", "c17", "c18"] and result.raters["honest"]["verdict"] == "reliable"
    assert len(result.accepted) == 19
    result = clean(honest, CleaningConfig(anonymous_rule="open", outlier_z=-10, max_user_share=1.0, rater_min_items=0))
    assert result.rescued == {} and len(result.accepted) == 16
    result = clean(honest, CleaningConfig(anonymous_rule="open", outlier_z=-10, max_user_share=1.0, rater_rescue_floor=0.5))
    assert sorted(result.rescued) == ["c16"]
    trusted = [Candidate(c.item_id, c.user, "pair", c.image_key, c.text, agreement=c.agreement, trusted=True)
               for c in _rater_batch("t", [-1.0] * 20, 0)]
    assert len(clean(trusted, CleaningConfig(anonymous_rule="open", max_user_share=1.0)).accepted) == 20  # trusted: not tested
    with pytest.raises(ValueError, match="rater_chance_alpha"):
        CleaningConfig(rater_chance_alpha=0.0)


def test_clean_refuses_repeated_ids():
    with pytest.raises(ValueError, match="unique"):
        clean([pair(1), pair(1)], CleaningConfig())
