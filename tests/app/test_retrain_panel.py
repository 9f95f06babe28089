"""The operator's retrain panel through ``gradio_client``: login, status, one run per double click,
rollback, reports. The app's own feature source is used; a run is held at its start when a test
needs it "running", and with no feedback in this module's database it ends fast ("nothing to learn").
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from gradio_client.exceptions import AppError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import RetrainRun
from tests.app.conftest import OPERATOR, TEST_VERSION, build_tiny_model, make_config, module_home, start_app

pytestmark = pytest.mark.server


class HeldFeatures:
    """The app's feature source (``TowerFeatureSource``); while ``release`` is clear, a run that asks
    for it waits, so a test sees the run 'running' for as long as it needs."""

    def __init__(self, predictor, config):
        self.predictor, self.config = predictor, config
        self.release = threading.Event()
        self.release.set()

    def __call__(self):
        from retrain.features import TowerFeatureSource

        self.release.wait(timeout=60)  # called in the run's background thread, after the lease is taken
        return TowerFeatureSource(self.predictor.towers, self.config)


@pytest.fixture(scope="module")
def held_features(predictor, app_home, tmp_path_factory):
    home = module_home(app_home, tmp_path_factory)
    return HeldFeatures(predictor, make_config(home)), home


@pytest.fixture(scope="module")
def retrain_app(predictor, held_features):
    features, home = held_features
    running = start_app(home, predictor, build_options={"retrain_features": features})
    from retrain.promotion import adopt_store_current

    assert predictor.store.current() == TEST_VERSION
    adopt_store_current(running.engine, predictor.store)  # as main() does
    yield running
    features.release.set()
    running.demo.close()
    running.engine.dispose()


def operator_client(running):
    client = running.operator_client()  # POST /auth/login, then the login cookie on every request
    client.predict(OPERATOR[0], "200", api_name="/operator_login")
    return client


def run_count(engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(RetrainRun))


def wait_for_status(client, text: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.predict(api_name="/retrain_status")[0]
        if text in status or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_retrain_endpoints_refuse_without_operator_login(retrain_app):
    client = retrain_app.client()
    before = run_count(retrain_app.engine)
    for args, api_name in (((), "/retrain_now"), ((), "/retrain_status"), ((TEST_VERSION,), "/retrain_rollback"),
                           ((TEST_VERSION,), "/retrain_report")):
        with pytest.raises(AppError, match="Log in as operator"):
            client.predict(*args, api_name=api_name)
    client.predict(api_name="/retrain_poll")  # the timer's tick: no error, and nothing to show
    assert run_count(retrain_app.engine) == before


def test_status_shows_current_version_and_next_scheduled_run(retrain_app):
    status, runs, versions, *_ = operator_client(retrain_app).predict(api_name="/retrain_status")
    assert f"**Current version:** `{TEST_VERSION}`" in status
    assert "Next scheduled run:** 20" in status and retrain_app.config.retrain.cron in status
    assert [row[0] for row in versions["data"]] == [TEST_VERSION]
    assert versions["headers"][:3] == ["version", "status", "current"]


def test_retrain_now_twice_gives_one_run_and_the_status_shows_its_result(retrain_app, held_features):
    features, _ = held_features
    client, other = operator_client(retrain_app), operator_client(retrain_app)
    before = run_count(retrain_app.engine)
    features.release.clear()  # the run starts, then waits for its feature source
    try:
        first = client.predict(api_name="/retrain_now")
        second = other.predict(api_name="/retrain_now")
        assert "started" in first[0] and "already running" in second[0], (first[0], second[0])
        assert run_count(retrain_app.engine) == before + 1
        run_id = int(first[0].split("run ")[1].split()[0])
        assert f"Run {run_id} is running" in first[1] and f"(run {run_id})" in second[0]
    finally:
        features.release.set()
    status = wait_for_status(client, f"**Last run {run_id}**")
    assert f"**Last run {run_id}** (operator" in status
    assert "succeeded" in status and "nothing to learn" in status, status  # this module stores no feedback
    runs = client.predict(api_name="/retrain_status")[1]
    assert runs["data"][0][:3] == [run_id, "operator", "succeeded"]


def test_rollback_to_an_unknown_version_is_a_clear_error(retrain_app):
    client = operator_client(retrain_app)
    with pytest.raises(AppError, match="Cannot roll back to 'no-such-version'.*unknown model version"):
        client.predict("no-such-version", api_name="/retrain_rollback")
    with pytest.raises(AppError, match="Choose the version"):
        client.predict("", api_name="/retrain_rollback")
    assert f"`{TEST_VERSION}`" in client.predict(api_name="/retrain_status")[0]


def test_rollback_to_an_earlier_version_is_confirmed(retrain_app, predictor):
    store = predictor.store
    newer = build_tiny_model(predictor, store, "test-tiny-v2", seed=1)
    with Session(retrain_app.engine) as s, s.begin():
        repo.register_version(s, version=newer, path=str(store.path(newer)), sha256=f"{len(newer):064x}")
        repo.promote(s, newer)
    client = operator_client(retrain_app)
    notice, status, *_ = client.predict(TEST_VERSION, api_name="/retrain_rollback")
    assert "Rolled back" in notice and f"now `{TEST_VERSION}` (was `{newer}`)" in notice
    assert f"**Current version:** `{TEST_VERSION}`" in status
    with Session(retrain_app.engine) as s:
        assert repo.current_version(s).version == TEST_VERSION


def test_report_of_a_version_is_downloadable(retrain_app):
    from retrain.report import build_report

    client = operator_client(retrain_app)
    with pytest.raises(AppError, match=f"no report for version '{TEST_VERSION}'; reports exist for: none yet"):
        client.predict(TEST_VERSION, api_name="/retrain_report")
    build_report(retrain_app.config, retrain_app.engine, version=TEST_VERSION)
    versions = client.predict(api_name="/retrain_status")[2]
    assert {row[0]: row[-1] for row in versions["data"]}[TEST_VERSION] == "✓"

    report, link = client.predict(TEST_VERSION, api_name="/retrain_report")
    report = report.get("value", report)  # the file arrives inside a visibility update
    downloaded = httpx.get(report["url"], timeout=30)
    assert downloaded.status_code == 200 and "<html" in downloaded.text and TEST_VERSION in downloaded.text
    href = link.split("](")[1].rstrip(")")
    opened = httpx.get(retrain_app.url + href, timeout=30)  # the link opens the report itself, in the browser
    assert opened.status_code == 200 and opened.headers["content-type"].startswith("text/html")
    with pytest.raises(AppError, match="no report for version '../../app.db'"):  # names are looked up, not joined
        client.predict("../../app.db", api_name="/retrain_report")


def test_status_markdown_shows_progress_and_the_gate_reason():
    from app import retrain_status_markdown

    schedule = {"cron": "0 3 * * *", "next_run_time": "2030-01-02T03:00:00+00:00", "leader": "host:1"}
    run = {"id": 7, "trigger": "schedule", "progress": 0.3, "stage": "train", "message": "train…",
           "started_at": "2030-01-01T03:00:00", "finished_at": None, "status": "running", "gate_reason": None}
    running = retrain_status_markdown({"current_version": "v1", "schedule": schedule, "running": run,
                                       "recent_runs": [run]}, "v1")
    assert "Run 7 is running" in running and "30%" in running and "stage **train**" in running
    assert "2030-01-02 03:00 UTC" in running and "`0 3 * * *`" in running
    refused = {**run, "status": "refused", "progress": 1.0, "finished_at": "2030-01-01T03:10:00",
               "message": "candidate refused", "gate_reason": "retrieval R@1 fell by 0.05 > tolerance 0.02"}
    last = retrain_status_markdown({"current_version": "v1", "schedule": schedule, "running": None,
                                    "recent_runs": [refused]}, "v1")
    assert "**Last run 7** (schedule, finished 2030-01-01 03:10 UTC)" in last and "**refused**" in last
    assert "Gate: retrieval R@1 fell by 0.05" in last
