from __future__ import annotations

import math

import pytest

from retrain.gates import GateSpec, decide

CURRENT = {"heldout.R@1": 0.40, "test.R@1": 0.50, "memes.macro_f1": 0.70, "memes.macro_auroc": None}


def test_promotes_when_target_improves_and_guards_hold():
    cand = {"heldout.R@1": 0.55, "test.R@1": 0.495, "memes.macro_f1": 0.70, "memes.macro_auroc": None}
    d = decide(CURRENT, cand, GateSpec(targets=("heldout.R@1",), tolerance=0.01))
    assert d.promote and "heldout.R@1 +0.1500" in d.reason
    assert {c.metric: c.note for c in d.checks}["memes.macro_auroc"] == "undefined for both"


def test_refuses_a_guard_regression_beyond_tolerance():
    cand = {"heldout.R@1": 0.60, "test.R@1": 0.47, "memes.macro_f1": 0.70}
    d = decide(CURRENT, cand, GateSpec(targets=("heldout.R@1",), tolerance=0.01))
    assert not d.promote and [c.metric for c in d.failures] == ["test.R@1"]
    assert "test.R@1" in d.reason


def test_refuses_when_no_target_improves_beyond_the_noise_band():
    d = decide(CURRENT, dict(CURRENT), GateSpec(targets=("heldout.R@1",)))
    assert not d.promote and "no target improved" in d.reason
    d = decide(CURRENT, {**CURRENT, "heldout.R@1": 0.42}, GateSpec(targets=("heldout.R@1",), tolerances={"heldout.R@1": 0.05}))
    assert not d.promote  # +0.02 on a set where one item is worth 0.05
    d = decide(CURRENT, {**CURRENT, "heldout.R@1": 0.41}, GateSpec(targets=("heldout.R@1",), min_improvement=0.02))
    assert not d.promote


def test_a_target_may_not_regress_beyond_tolerance_either():
    cand = {**CURRENT, "heldout.R@1": 0.30, "labels.macro_f1": 0.9}
    cur = {**CURRENT, "labels.macro_f1": 0.5}
    d = decide(cur, cand, GateSpec(targets=("heldout.R@1", "labels.macro_f1")))
    assert not d.promote and d.failures[0].metric == "heldout.R@1"


def test_missing_metrics_and_per_metric_tolerance():
    cand = {k: v for k, v in CURRENT.items() if k != "memes.macro_f1"} | {"heldout.R@1": 0.5}
    assert not decide(CURRENT, cand, GateSpec(targets=("heldout.R@1",))).promote  # lost a metric
    d = decide(CURRENT, {**CURRENT, "heldout.R@1": 0.5, "test.R@1": 0.45, "new.R@1": 0.1},
               GateSpec(targets=("heldout.R@1",), tolerances={"test.R@1": 0.06}))
    assert d.promote and {c.metric: c.note for c in d.checks}["new.R@1"].startswith("new metric")


def test_no_held_out_target_refuses_and_nan_counts_as_missing():
    d = decide({"test.R@1": 0.5}, {"test.R@1": 0.6}, GateSpec(targets=("heldout.R@1",)))
    assert not d.promote and "no held-out data" in d.reason
    d = decide({"heldout.R@1": math.nan}, {"heldout.R@1": 0.3}, GateSpec(targets=("heldout.R@1",)))
    assert not d.promote


def test_spec_validates():
    with pytest.raises(ValueError, match="tolerance"):
        GateSpec(targets=("x",), tolerance=-0.1)
