"""The page's handlers called directly: plain values in, ``{output name: value}`` out, no launch, no browser.

The services are the real ones (the session's tiny model, a SQLite file and an upload store in a
temporary home); every check on stored feedback reads the rows back with SQLAlchemy.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import typing
import zipfile
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import app
from app import UserInputError
from feedback_db import repository as repo
from feedback_db.models import Correction, Prediction, Rating, Upload
from tests.app.conftest import LABELS, OPERATOR, PHOTOS, TEST_VERSION, make_config, module_home
from tests.bad_uploads import make_bad_upload_corpus

CAT = PHOTOS / "chelsea.jpg"
RETRAIN_VIEW = {"status", "runs", "versions", "report_version", "rollback_version", "seen"}


@pytest.fixture(scope="module")
def services(predictor, app_home, tmp_path_factory):
    from feedback_db.blobstore import BlobStore
    from feedback_db.engine import init_db, make_engine

    home = module_home(app_home, tmp_path_factory)
    engine = make_engine(f"sqlite:///{home / 'app.db'}")
    init_db(engine)
    store = predictor.store
    with Session(engine) as s, s.begin():  # the registry serves what the predictor runs: the watcher stays put
        repo.register_version(s, version=TEST_VERSION, path=str(store.path(TEST_VERSION)), sha256="0" * 64)
        repo.promote(s, TEST_VERSION)
    yield app.AppServices(config=make_config(home), predictor=predictor, engine=engine,
                          blobstore=BlobStore(home / "uploads"), watcher=app.ModelWatcher(predictor, engine),
                          exports_dir=home / "exports")
    engine.dispose()


@pytest.fixture
def session() -> dict:
    return app.new_session()


def logged_in(services, user: str = OPERATOR[0], password: str = OPERATOR[1]) -> gr.Request:
    """A request carrying the login cookie the server issued for ``user`` (as /auth/login would set it)."""
    result = services.accounts.login(user, password)
    assert result.ok, result.message
    return gr.Request(cookies={app.SESSION_COOKIE: result.token})


@pytest.fixture
def operator(services) -> gr.Request:
    return logged_in(services)


ANONYMOUS = gr.Request(cookies={})


def rows(services, model, *where) -> list:
    with Session(services.engine, expire_on_commit=False) as s:
        return s.scalars(select(model).where(*where).order_by(model.id)).all()


def count(services, model) -> int:
    with Session(services.engine) as s:
        return s.scalar(select(func.count()).select_from(model))


# ---- caption -------------------------------------------------------------------------------------

def test_caption_stores_the_prediction_and_resets_the_form(services, session):
    out = app.caption_image(services, str(CAT), "", session)
    result = out["result"]
    assert out["caption"] and out["corrected"] == out["caption"] == result["caption"]
    assert len(out["alternatives"]) == 3 and all(0 <= p <= 1 for p in out["alternatives"].values())
    assert out["details"]["prediction_id"] == result["prediction_id"]
    assert "Confidence" in out["confidence"] and TEST_VERSION in out["confidence"]
    assert max(out["preview"].size) <= app.PREVIEW_SIDE
    assert out["upload"] is None  # the file box empties for the next upload
    assert (out["coherence"], out["relevance"], out["detail"], out["comment"], out["status"]) == (0, 0, 0, "", "")

    [row] = rows(services, Prediction, Prediction.id == result["prediction_id"])
    assert row.kind == "caption" and row.model_version == TEST_VERSION and row.outputs["caption"] == out["caption"]
    assert row.session_id == session["session_id"] and row.user is None
    assert services.blobstore.path(result["relpath"]).read_bytes() == CAT.read_bytes()


def test_a_prediction_being_stored_holds_no_model_slot(services, session, monkeypatch):
    """Decoding and the towers run in ``AppServices.model_slots``; the blob write and the database commit
    after them do not, so a slow disk never idles a slot another request could compute in."""
    import threading

    slots = services.model_slots
    monkeypatch.setattr(services, "model_slots", threading.BoundedSemaphore(1))
    storing, release = threading.Event(), threading.Event()
    real_put = services.blobstore.put

    def slow_put(data, ext):
        storing.set()
        assert release.wait(30)
        return real_put(data, ext)

    monkeypatch.setattr(services.blobstore, "put", slow_put)
    done = {}
    first = threading.Thread(target=lambda: done.update(out=services.caption(CAT.read_bytes(), request_id=None,
                                                                             session=session)))
    first.start()
    try:
        assert storing.wait(60)
        assert services.model_slots.acquire(timeout=5), "the stored prediction still held the only model slot"
        services.model_slots.release()
    finally:
        release.set()
        first.join(60)
    assert done["out"].stored.prediction_id and slots is not services.model_slots


def test_an_old_picture_uploaded_again_while_retention_runs_keeps_its_file(services, session, monkeypatch):
    """The retention job deletes an old unrated picture's file between a new upload's blob write (a no-op:
    the file is there) and its database commit: the prediction's commit writes the bytes back."""
    import io
    from datetime import datetime, timedelta, timezone

    import numpy as np
    from PIL import Image

    from retrain.housekeeping import purge_unrated_uploads

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(11).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    first = services.caption(data, request_id=None, session=session).stored
    long_ago = datetime.now(timezone.utc) - timedelta(days=40)
    with Session(services.engine) as s, s.begin():  # uploaded and captioned 40 days ago, never rated
        prediction = s.get(Prediction, first.prediction_id)
        prediction.created_at = s.get(Upload, prediction.image_sha256).created_at = long_ago
    purged = []
    real_put = services.blobstore.put

    def put_then_retention_runs(blob, ext):
        out = real_put(blob, ext)
        purged.extend(purge_unrated_uploads(services.engine, services.blobstore, 30))
        return out

    monkeypatch.setattr(services.blobstore, "put", put_then_retention_runs)
    again = services.caption(data, request_id=None, session=session).stored
    assert purged == [hashlib.sha256(data).hexdigest()]  # the job did delete the file in that window
    assert again.relpath == first.relpath and services.blobstore.path(again.relpath).read_bytes() == data
    monkeypatch.setattr(services.blobstore, "put", real_put)
    assert purge_unrated_uploads(services.engine, services.blobstore, 30) == []  # its new prediction keeps it now
    with Session(services.engine) as s, s.begin():  # the module's other tests count today's predictions
        s.get(Prediction, first.prediction_id).created_at = datetime.now(timezone.utc)


def test_caption_rating_and_correction_are_stored_once(services, session):
    result = app.caption_image(services, str(CAT), "", session)["result"]
    form = (4, 5, 2, "  a tabby   cat on a rug ", "nice try", "")
    for _ in range(2):  # a double click of the same form
        out = app.submit_caption_feedback(services, *form, result, session)
        assert set(out) == {"status"} and "Saved" in out["status"]

    pid = result["prediction_id"]
    ratings, corrections = rows(services, Rating, Rating.prediction_id == pid), rows(services, Correction,
                                                                                      Correction.prediction_id == pid)
    assert [(r.coherence, r.relevance, r.detail, r.comment) for r in ratings] == [(4, 5, 2, "nice try")]
    assert [(c.field, c.value, c.status) for c in corrections] == [("caption", "a tabby cat on a rug", "new")]
    assert ratings[0].session_id == corrections[0].session_id == session["session_id"]


def test_an_unchanged_caption_is_a_rating_without_a_correction(services, session):
    result = app.caption_image(services, str(CAT), "", session)["result"]
    app.submit_caption_feedback(services, 0, 3, 0, result["caption"], "", "", result, session)
    pid = result["prediction_id"]
    assert [(r.coherence, r.relevance, r.detail) for r in rows(services, Rating, Rating.prediction_id == pid)] == [
        (None, 3, None)]
    assert rows(services, Correction, Correction.prediction_id == pid) == []


def test_clear_caption_empties_every_output(services):
    out = app.clear_caption()
    assert out["result"] is None and out["preview"] is None and out["caption"] == "" and out["coherence"] == 0


# ---- meme ------------------------------------------------------------------------------------------

def test_meme_analysis_and_label_feedback_are_stored(services, session, meme_path):
    out = app.analyze_meme(services, str(meme_path), True, True, "", session)
    result = out["result"]
    assert result["label"] in LABELS and out["text"] == result["text"] == out["corrected_text"]
    for probs in (out["fused"], out["image_only"], out["text_only"]):
        assert set(probs) == set(LABELS) and abs(sum(probs.values()) - 1) < 1e-4
    assert out["corrected_label"]["choices"] == list(LABELS) and out["corrected_label"]["value"] is None
    assert "Prediction" in out["verdict"] and out["upload"] is None

    saved = app.submit_meme_feedback(services, 5, 0, 0, "", "sarcastic", "too dark", "", result, session)
    assert "label correction" in saved["status"]
    pid = result["prediction_id"]
    assert [(c.field, c.value) for c in rows(services, Correction, Correction.prediction_id == pid)] == [
        ("label", "sarcastic")]
    [row] = rows(services, Prediction, Prediction.id == pid)
    assert row.kind == "meme" and row.outputs["label"] == result["label"] and row.ablation is None


def test_meme_reanalysis_with_edited_text_keeps_the_ocr_reading(services, session, meme_path):
    first = app.analyze_meme(services, str(meme_path), True, True, "", session)["result"]
    out = app.reanalyze_meme(services, "what a wonderful day", True, False, "", first, session)
    assert set(out).isdisjoint({"preview", "upload"})  # re-analysis leaves the image alone
    result = out["result"]
    assert result["prediction_id"] != first["prediction_id"] and result["ocr_text"] == first["ocr_text"]
    [row] = rows(services, Prediction, Prediction.id == result["prediction_id"])
    assert row.input_text == "what a wonderful day" and row.ablation == "text" and "ocr" not in row.stage_ms


# ---- user errors -------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_user_error_and_stores_nothing(services, session, meme_path, tmp_path):
    bad = {item.name: item.path for item in make_bad_upload_corpus(tmp_path)}
    before = (count(services, Prediction), count(services, Upload), count(services, Rating))
    with pytest.raises(UserInputError, match="Choose an image"):
        app.caption_image(services, None, "", session)
    for name, fragment in (("not_an_image.png", "text"), ("truncated.jpg", "truncated"), ("bomb.png", "bomb")):
        with pytest.raises(UserInputError, match=fragment):
            app.caption_image(services, str(bad[name]), "", session)
    with pytest.raises(UserInputError, match="request id must be"):
        app.caption_image(services, str(CAT), "not a valid id!", session)
    with pytest.raises(UserInputError, match="Upload an image first"):
        app.submit_caption_feedback(services, 3, 3, 3, "x", "", "", None, session)
    with pytest.raises(UserInputError, match="Upload a meme first"):
        app.reanalyze_meme(services, "some text", True, True, "", None, session)
    with pytest.raises(UserInputError, match="at least one"):
        app.analyze_meme(services, str(meme_path), False, False, "", session)
    assert (count(services, Prediction), count(services, Upload), count(services, Rating)) == before

    result = app.caption_image(services, str(CAT), "", session)["result"]
    corrections = count(services, Correction)
    with pytest.raises(UserInputError, match="Nothing to save"):
        app.submit_caption_feedback(services, 0, 0, 0, result["caption"], "", "", result, session)
    with pytest.raises(UserInputError, match="ratings go from 1 to 5"):
        app.submit_caption_feedback(services, 7, 0, 0, "", "", "", result, session)
    with pytest.raises(UserInputError, match="the limit is 2,000"):
        app.submit_caption_feedback(services, 3, 0, 0, "", "x" * 2001, "", result, session)
    meme = app.analyze_meme(services, str(meme_path), True, True, "", session)["result"]
    with pytest.raises(UserInputError, match="unknown label 'not a label'"):
        app.submit_meme_feedback(services, 3, 0, 0, "", "not a label", "", "", meme, session)
    with pytest.raises(UserInputError, match="nothing left to analyse"):
        app.reanalyze_meme(services, "   ", False, True, "", meme, session)
    assert (count(services, Rating), count(services, Correction)) == (before[2], corrections)


# ---- operator --------------------------------------------------------------------------------------

def test_operator_actions_are_refused_without_login(services, session):
    forged = gr.Request(cookies={app.SESSION_COOKIE: "not-a-session-the-server-issued"})
    for request in (None, ANONYMOUS, forged):
        refused = [functools.partial(app.operator_refresh, services, request),
                   functools.partial(app.operator_export, services, "csv", request),
                   functools.partial(app.operator_create_rater, services, "someone", "trusted", request),
                   functools.partial(app.operator_update_rater, services, OPERATOR[0], "disable", request),
                   functools.partial(app.retrain_status, services, request),
                   functools.partial(app.retrain_now, services, request),
                   functools.partial(app.retrain_rollback, services, TEST_VERSION, request),
                   functools.partial(app.retrain_report, services, TEST_VERSION, request)]
        for action in refused:
            with pytest.raises(UserInputError, match="Log in as operator first"):
                action()
        assert app.poll_retrain_status(services, None, request) is None  # the timer's tick: silent, nothing drawn
        assert app.retrain_panel_opened(services, request) is None
    # the page's script reports the login route's status; the cookie alone decides, the status only words it
    with pytest.raises(UserInputError, match="Wrong user or password"):
        app.operator_login(services, OPERATOR[0], "401", session, ANONYMOUS)
    with pytest.raises(UserInputError, match="Wrong user or password"):  # a password sent here is never echoed
        app.operator_login(services, OPERATOR[0], OPERATOR[1], session, ANONYMOUS)
    with pytest.raises(UserInputError, match="try again in 31 s"):
        app.operator_login(services, OPERATOR[0], "429:31", session, ANONYMOUS)


def test_operator_login_is_disabled_without_configured_credentials(services, session, tmp_path):
    from feedback_db.engine import init_db, make_engine

    config = make_config(tmp_path, operator_user="", operator_password="")
    engine = make_engine(f"sqlite:///{tmp_path / 'no-accounts.db'}")  # no operator in the env, no accounts
    init_db(engine)
    disabled = app.AppServices(config=config, predictor=services.predictor, engine=engine,
                               blobstore=services.blobstore, watcher=services.watcher, exports_dir=tmp_path)
    assert not disabled.login_enabled()
    for user, status in (("", ""), (OPERATOR[0], "200")):
        with pytest.raises(UserInputError, match="disabled"):
            app.operator_login(disabled, user, status, session, ANONYMOUS)
    engine.dispose()


def test_operator_login_shows_the_tables_and_allows_the_actions(services, session, tmp_path):
    caption = app.caption_image(services, str(CAT), "", session)["result"]
    app.submit_caption_feedback(services, 4, 4, 4, "an operator-visible caption", "", "", caption, session)

    request = logged_in(services)
    out = app.operator_login(services, OPERATOR[0], "200", session, request)
    assert out["session"] == session and "operator" not in session  # nothing about the login lives in gr.State
    assert out["panel"]["visible"] is True and out["login_box"]["visible"] is False and out["password"] == ""
    assert out["account_box"]["visible"] is True and OPERATOR[0] in out["whoami"]
    assert TEST_VERSION in out["version"]
    assert caption["prediction_id"] in out["predictions"]["id"].tolist()
    assert "an operator-visible caption" in out["feedback"]["value"].tolist()
    assert out["per_day"]["predictions"].sum() == count(services, Prediction)

    refreshed = app.operator_refresh(services, request)
    assert set(refreshed) == {"version", "predictions", "feedback", "per_day", "per_label", "raters"}
    assert refreshed["predictions"]["id"].max() >= caption["prediction_id"]

    archive = Path(app.operator_export(services, "csv", request)["export_file"]["value"])
    assert archive.is_relative_to(services.exports_dir)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert any(n.endswith("feedback.csv") for n in names) and any("/images/" in n for n in names)
    with pytest.raises(UserInputError, match="unknown export format 'xls'"):
        app.operator_export(services, "xls", request)

    out = app.operator_logout(services, session, request)
    assert out["session"]["session_id"] == session["session_id"]
    assert out["panel"]["visible"] is False and out["timer"]["active"] is False
    with pytest.raises(UserInputError, match="Log in as operator first"):  # the server ended the session
        app.operator_refresh(services, request)


# ---- retrain panel ------------------------------------------------------------------------------------

def test_operator_manages_rater_accounts_and_a_raters_feedback_carries_their_name(services, session, operator):
    out = app.operator_create_rater(services, "dana", "trusted", operator)
    password = out["rater_notice"].split("`")[1]
    assert out["rater_name"] == "" and "dana" in out["raters"]["user"].tolist()
    with pytest.raises(UserInputError, match="already exists"):
        app.operator_create_rater(services, "dana", "rater", operator)
    with pytest.raises(UserInputError, match="rater name"):
        app.operator_create_rater(services, "two words", "rater", operator)

    dana = logged_in(services, "dana", password)
    out = app.operator_login(services, "dana", "200", session, dana)
    assert out["panel"]["visible"] is False and "trusted annotator" in out["whoami"]  # a rater sees no panel
    with pytest.raises(UserInputError, match="Log in as operator first"):
        app.operator_refresh(services, dana)
    caption = app.caption_image(services, str(CAT), "", session, dana)["result"]
    app.submit_caption_feedback(services, 0, 0, 0, "a cat, says dana", "", "", caption, session, dana)
    app.submit_caption_feedback(services, 0, 0, 0, "a cat, says nobody", "", "", caption, session, ANONYMOUS)
    users = {c.value: c.user for c in rows(services, Correction, Correction.prediction_id == caption["prediction_id"])}
    assert users == {"a cat, says dana": "dana", "a cat, says nobody": None}
    assert rows(services, Prediction, Prediction.id == caption["prediction_id"])[0].user == "dana"

    app.operator_update_rater(services, "dana", "make rater (untrusted)", operator)
    assert services.identity(dana) is None  # a role change ends her open sessions
    with pytest.raises(UserInputError, match="cannot disable or demote your own account"):
        app.operator_update_rater(services, OPERATOR[0], "disable", operator)
    with pytest.raises(UserInputError, match="unknown action"):
        app.operator_update_rater(services, "dana", "delete", operator)
    new = app.operator_update_rater(services, "dana", "new password", operator)["rater_notice"].split("`")[1]
    assert services.accounts.login("dana", new).identity.role == "rater"


def test_retrain_status_shape(services, operator):
    view = app.retrain_status(services, operator)
    assert set(view) == RETRAIN_VIEW
    assert f"**Current version:** `{TEST_VERSION}`" in view["status"] and "No retrain has run yet." in view["status"]
    assert isinstance(view["runs"], pd.DataFrame) and list(view["runs"].columns) == app.RUN_COLUMNS
    assert list(view["versions"].columns) == app.VERSION_COLUMNS
    assert view["versions"]["version"].tolist() == [TEST_VERSION]
    assert view["rollback_version"]["choices"] == []  # the only version is the current one
    assert view["report_version"]["choices"] == []

    assert app.poll_retrain_status(services, view["seen"], operator) is None  # unchanged: nothing redrawn
    assert set(app.poll_retrain_status(services, "stale", operator)) == RETRAIN_VIEW
    opened = app.retrain_panel_opened(services, operator)
    assert set(opened) == RETRAIN_VIEW | {"timer"} and opened["timer"]["active"] is True
    assert app.retrain_panel_closed()["timer"]["active"] is False


def test_retrain_actions_check_their_input(services, operator):
    assert app.retrain_report(services, " ", operator) == {"report_file": gr.update(value=None, visible=False),
                                                           "report_link": ""}
    with pytest.raises(UserInputError, match=f"no report for version '{TEST_VERSION}'"):
        app.retrain_report(services, TEST_VERSION, operator)
    with pytest.raises(UserInputError, match="Choose the version"):
        app.retrain_rollback(services, "", operator)
    with pytest.raises(UserInputError, match="Cannot roll back to 'no-such-version'"):
        app.retrain_rollback(services, "no-such-version", operator)
    out = app.retrain_rollback(services, TEST_VERSION, operator)
    assert "already the current version" in out["notice"] and out["rollback_version"]["value"] is None


# ---- the adapter between handlers and widgets -------------------------------------------------------

def test_event_function_maps_names_to_components_and_user_errors_to_gr_error(services, session):
    status, other = object(), object()  # stand-ins for components: the adapter only uses them as keys
    fn = app._event_fn(functools.partial(app.submit_caption_feedback, services), {"status": status, "x": other})
    assert list(inspect.signature(fn).parameters) == [  # the API's parameter names
        "coherence", "relevance", "detail", "corrected", "comment", "request_id", "result", "session_data", "request"]
    # the login cookie reaches a handler as Gradio's request object, which Gradio fills in and leaves out of the API
    assert typing.get_type_hints(fn) == {"request": gr.Request}
    with pytest.raises(gr.Error, match="Upload an image first"):
        fn(3, 3, 3, "", "", "", None, session)

    result = app.caption_image(services, str(CAT), "", session)["result"]
    out = fn(3, 0, 0, "", "", "", result, session)
    assert list(out) == [status] and "Saved" in out[status]

    poll = app._event_fn(functools.partial(app.poll_retrain_status, services), {})
    assert poll(None) == gr.skip()  # None from a handler: nothing redrawn
