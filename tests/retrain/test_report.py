"""The human-eval report renders: every section in the HTML, plots inline, valid JSON with the numbers."""
from __future__ import annotations

import json
from pathlib import Path
import re

import numpy as np

from retrain.api import list_reports, retrain_status
from retrain.job import run_retrain
from retrain.report import SECTIONS, agreement_summary, build_report, mean_interval, ratings_summary

from .world import add_feedback, add_rated_caption, feed_new_concepts


def test_report_of_a_promoted_version(config, engine, source):
    feed_new_concepts(engine, source, 100)
    add_feedback(engine, source, concept=1, i=4000, user="eve", text="zebra lamp nonsense words")
    for j in range(12):  # two raters on the same captions, mostly agreeing
        add_rated_caption(engine, source, concept=j, i=8000 + j, scores={"alice": 2 + j % 4, "bob": 2 + j % 4 + (j % 5 == 0)})
    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted" and out.report and "html" in out.report

    page = open(out.report["html"]).read()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) >= 4
    assert "zebra lamp nonsense words" in page  # the nonsense correction is listed with its reason

    data = json.loads(open(out.report["json"]).read())
    assert data["version"] == out.version and data["summary"]["run_status"] == "promoted"
    assert data["gate"]["promote"] is True
    assert data["ratings"]["bootstrap"]["coherence"]["n"] == 24
    assert 0.5 < data["agreement"]["coherence"]["alpha"] <= 1.0
    assert data["corrections"]["bootstrap"]["rate"] > 0
    assert set(data["retrieval"]["bootstrap_test_by_version"]) == {"bootstrap", out.version}
    assert data["ablation"]["candidate"]["fused"]["macro_f1"] >= 0
    (nonsense,) = [r for r in data["rejected"]["items"] if r["text"] == "zebra lamp nonsense words"]
    assert nonsense["reason"] in ("similarity_outlier", "chance_agreement") and nonsense["why"]["agreement"] < 1
    assert data["examples"] and all(e["field"] == "caption" for e in data["examples"])

    assert list_reports(config)[0]["version"] == out.version
    status = retrain_status(config, engine)
    assert status["current_version"] == out.version and status["running"] is None
    assert status["recent_runs"][0]["status"] == "promoted" and status["schedule"]["next_run_time"]
    json.dumps(status)  # what the operator page gets is JSON-able


def test_the_report_lists_the_chance_test_of_each_rater_with_enough_pairs(config, engine, source):
    feed_new_concepts(engine, source, 100, users=4)  # 25 honest pairs each: every rater is judged on all of them
    out = run_retrain(config, engine, features=source)
    data = json.loads(open(out.report["json"]).read())
    rows = {r["rater"]: r for r in data["rater_chance_test"]}
    assert set(rows) == {f"user{i}" for i in range(4)}
    # (the outlier test, which runs first, takes a pair or two); honest captions of a learnable world: reliable
    assert all(r["pairs"] >= 20 and r["verdict"] == "reliable" and r["p_value"] < 0.05 for r in rows.values())
    assert "Chance test per rater in this run" in open(out.report["html"]).read()


def test_report_of_the_bootstrap_version_without_runs(config, engine, home):
    from mmapp.model_store import ModelStore
    from retrain.promotion import adopt_store_current

    adopt_store_current(engine, ModelStore(home / "models"))
    paths = build_report(config, engine)
    page = paths["html"].read_text()
    assert all(f'<section id="{s}">' in page for s in SECTIONS) and "no data yet" in page
    assert json.loads(paths["json"].read_text())["summary"]["status"] == "promoted"


def test_rating_statistics_small_cases():
    lo, hi = mean_interval(np.array([3.0, 4.0, 5.0, 4.0]))
    assert lo <= 4.0 <= hi
    rows = [{"prediction_id": p, "version": "v", "kind": "caption", "rater": r, "coherence": s, "relevance": s,
             "detail": None} for p, r, s in [(1, "a", 5), (1, "b", 5), (2, "a", 1), (2, "b", 1), (3, "a", 3), (3, "b", 3)]]
    assert agreement_summary(rows)["coherence"]["alpha"] == 1.0  # perfect agreement
    assert agreement_summary(rows)["detail"]["alpha"] is None
    summary = ratings_summary(rows)["v"]["coherence"]
    assert summary["n"] == 6 and summary["distribution"] == {"1": 2, "2": 0, "3": 2, "4": 0, "5": 2}


def test_the_report_photos_are_reported_but_never_gated(config, engine, source, home):
    from retrain.evaluation import REPORT_PHOTOS, gate_metrics

    feed_new_concepts(engine, source, 120)
    out = run_retrain(config, engine, features=source)
    nested = out.stats["metrics"]
    assert REPORT_PHOTOS in nested["current"] and REPORT_PHOTOS in nested["candidate"]
    assert not any(k.startswith(REPORT_PHOTOS) for k in gate_metrics(nested["candidate"]))  # the gate never sees them
    page = Path(out.report["html"]).read_text()
    assert "Held-out real photos (report set" in page
