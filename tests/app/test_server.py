"""The running app through ``gradio_client``: predictions, feedback, idempotency, bad uploads, load.

Everything a test checks in the database is read back with SQLAlchemy from the app's own
SQLite file; the app itself runs in-process (see conftest.py).
"""
from __future__ import annotations

import ipaddress
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import Correction, Prediction, Rating, Upload
from tests.app.conftest import LABELS, OPERATOR, PHOTOS, TEST_VERSION, build_tiny_model, module_home, start_app
from tests.bad_uploads import make_bad_upload_corpus

pytestmark = pytest.mark.server

CAT = PHOTOS / "chelsea.jpg"


def count(engine, model, *where) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def get_prediction(engine, prediction_id: int) -> Prediction:
    with Session(engine, expire_on_commit=False) as s:
        return s.get(Prediction, prediction_id)


def caption(client, path=CAT, request_id: str = "") -> dict:
    """Run /caption; returns the details JSON (the last useful output)."""
    outputs = client.predict(handle_file(str(path)), request_id, api_name="/caption")
    return outputs[4]


def analyze(client, path, use_image=True, use_text=True, request_id: str = "") -> dict:
    return client.predict(handle_file(str(path)), use_image, use_text, request_id, api_name="/analyze_meme")[5]


def reanalyze(client, text, use_image=True, use_text=True, request_id: str = "") -> dict:
    return client.predict(text, use_image, use_text, request_id, api_name="/reanalyze_meme")[5]


# ---- captioning ----------------------------------------------------------------------------------

def test_caption_stores_prediction_upload_and_blob(running_app):
    client = running_app.client()
    details = caption(client)
    assert details["caption"] and len(details["alternatives"]) == 3
    assert 0 < details["confidence"] <= 1 and details["model_version"] == TEST_VERSION

    row = get_prediction(running_app.engine, details["prediction_id"])
    assert row.kind == "caption" and row.model_version == TEST_VERSION
    assert row.outputs["caption"] == details["caption"] and len(row.outputs["alternatives"]) == 3
    assert row.latency_ms > 0 and {"decode", "encode_image", "rank"} <= set(row.stage_ms)
    assert row.embedding_ref.startswith("efficientnet-lite0@")
    assert row.user is None and len(row.session_id) == 32
    with pytest.raises(ValueError):  # an anonymous id, never an address
        ipaddress.ip_address(row.session_id)

    with Session(running_app.engine) as s:
        upload = s.get(Upload, row.image_sha256)
        assert upload.format == "jpg" and upload.n_bytes == CAT.stat().st_size
        stored = running_app.blobstore.path(upload.relpath)
    assert stored.read_bytes() == CAT.read_bytes()
    assert stored.is_relative_to(running_app.home / "uploads")


def test_caption_rating_and_correction_land_with_foreign_keys(running_app):
    client = running_app.client()
    details = caption(client)
    status = client.predict(4, 5, 2, "a tabby cat sitting on a rug", "nice try", "", api_name="/rate_caption")
    assert "Saved" in status

    with Session(running_app.engine) as s:
        ratings = s.scalars(select(Rating).where(Rating.prediction_id == details["prediction_id"])).all()
        corrections = s.scalars(select(Correction).where(Correction.prediction_id == details["prediction_id"])).all()
        assert [(r.coherence, r.relevance, r.detail, r.comment) for r in ratings] == [(4, 5, 2, "nice try")]
        assert [(c.field, c.value, c.status) for c in corrections] == [("caption", "a tabby cat sitting on a rug", "new")]
        prediction = s.get(Prediction, details["prediction_id"])
        assert ratings[0].session_id == corrections[0].session_id == prediction.session_id


def test_unchanged_caption_is_not_a_correction_and_empty_feedback_is_refused(running_app):
    client = running_app.client()
    details = caption(client)
    with pytest.raises(AppError, match="Nothing to save"):
        client.predict(0, 0, 0, details["caption"], "", "", api_name="/rate_caption")
    client.predict(3, 0, 0, details["caption"], "", "", api_name="/rate_caption")
    assert count(running_app.engine, Correction, Correction.prediction_id == details["prediction_id"]) == 0
    assert count(running_app.engine, Rating, Rating.prediction_id == details["prediction_id"]) == 1


def test_feedback_before_any_prediction_is_a_clear_error(running_app):
    with pytest.raises(AppError, match="Upload an image first"):
        running_app.client().predict(3, 3, 3, "x", "", "", api_name="/rate_caption")


# ---- idempotency ---------------------------------------------------------------------------------

def test_retried_submission_is_stored_once(running_app):
    client = running_app.client()
    details = caption(client)
    pid = details["prediction_id"]
    form = (2, 3, 4, "a grey cat", "retry me")
    for _ in range(3):  # double click / client retry of the same form
        client.predict(*form, "", api_name="/rate_caption")
    assert count(running_app.engine, Rating, Rating.prediction_id == pid) == 1
    assert count(running_app.engine, Correction, Correction.prediction_id == pid) == 1

    key = uuid.uuid4().hex  # a client that sends its own idempotency key
    for _ in range(2):
        client.predict(5, 5, 5, "", "explicit key", key, api_name="/rate_caption")
    with Session(running_app.engine) as s:
        assert s.scalars(select(Rating.request_id).where(Rating.prediction_id == pid)).all()[-1] == f"{key}:rating"
    assert count(running_app.engine, Rating, Rating.prediction_id == pid) == 2

    client.predict(1, 3, 4, "a grey cat", "retry me", "", api_name="/rate_caption")  # a changed form is new
    assert count(running_app.engine, Rating, Rating.prediction_id == pid) == 3


def test_retried_prediction_with_the_same_request_id_is_stored_once(running_app):
    client = running_app.client()
    key = uuid.uuid4().hex
    first, second = caption(client, request_id=key), caption(client, request_id=key)
    assert first["prediction_id"] == second["prediction_id"]
    assert count(running_app.engine, Prediction, Prediction.request_id == key) == 1
    with pytest.raises(AppError, match="already used"):  # the same key for another image is a client bug
        caption(client, PHOTOS / "coffee.jpg", request_id=key)


# ---- memes ---------------------------------------------------------------------------------------

def test_meme_analysis_with_each_ablation(running_app, meme_path):
    client = running_app.client()
    fused = analyze(client, meme_path)
    assert "TESTS" in fused["ocr_text"].upper()
    assert fused["ablation"] is None and fused["label"] in LABELS
    for probs in (fused["fused"], fused["image_only"], fused["text_only"]):
        assert set(probs) == set(LABELS) and abs(sum(probs.values()) - 1) < 1e-4
    assert fused["label"] == max(fused["fused"], key=fused["fused"].get)

    no_text = reanalyze(client, fused["text"], use_text=False)
    assert no_text["ablation"] == "text"
    assert no_text["label"] == max(no_text["image_only"], key=no_text["image_only"].get)
    no_image = reanalyze(client, fused["text"], use_image=False)
    assert no_image["ablation"] == "image"
    assert no_image["label"] == max(no_image["text_only"], key=no_image["text_only"].get)
    upload_no_text = analyze(client, meme_path, use_text=False)  # the toggles apply on upload too
    assert upload_no_text["ablation"] == "text" and upload_no_text["ocr_text"] == fused["ocr_text"]

    rows = [get_prediction(running_app.engine, d["prediction_id"]) for d in (fused, no_text, no_image, upload_no_text)]
    assert [r.ablation for r in rows] == [None, "text", "image", "text"]
    assert all(r.kind == "meme" and r.input_text == fused["text"] for r in rows)
    assert rows[0].outputs["label"] == fused["label"] and "ocr" in rows[0].stage_ms
    assert len({r.image_sha256 for r in rows}) == 1


def test_meme_edited_text_reanalyses_and_keeps_the_ocr_reading(running_app, meme_path):
    client = running_app.client()
    first = analyze(client, meme_path)
    edited = reanalyze(client, "what a wonderful day")
    assert edited["text"] == "what a wonderful day" and edited["text_only"] != first["text_only"]
    row = get_prediction(running_app.engine, edited["prediction_id"])
    assert row.input_text == "what a wonderful day" and row.outputs["ocr_text"] == first["ocr_text"]
    assert "ocr" not in row.stage_ms  # re-analysis never runs OCR again


def test_meme_feedback_lands_with_foreign_keys(running_app, meme_path):
    client = running_app.client()
    details = analyze(client, meme_path)
    status = client.predict(5, 4, 3, "WHEN ALL THE TESTS PASS ON THE FIRST TRY", "positive", "fun", "",
                            api_name="/rate_meme")
    assert "Saved" in status
    with Session(running_app.engine) as s:
        corrections = s.scalars(select(Correction).where(Correction.prediction_id == details["prediction_id"])
                                .order_by(Correction.field)).all()
        assert [(c.field, c.value) for c in corrections] == [
            ("label", "positive"), ("ocr_text", "WHEN ALL THE TESTS PASS ON THE FIRST TRY")]
        rating = s.scalars(select(Rating).where(Rating.prediction_id == details["prediction_id"])).one()
        assert (rating.coherence, rating.relevance, rating.detail, rating.comment) == (5, 4, 3, "fun")


def test_meme_user_errors_are_clear(running_app, meme_path):
    client = running_app.client()
    with pytest.raises(AppError, match="Upload a meme first"):
        reanalyze(client, "some text")
    analyze(client, meme_path)
    before = count(running_app.engine, Prediction)
    with pytest.raises(AppError, match="at least one"):
        reanalyze(client, "some text", use_image=False, use_text=False)
    with pytest.raises(AppError, match="the limit is 2,000"):
        reanalyze(client, "x" * 2001)
    with pytest.raises(AppError, match="nothing left to analyse"):
        reanalyze(client, "   ", use_image=False)
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(3, 3, 3, "", "not a label", "", "", api_name="/rate_meme")
    assert count(running_app.engine, Prediction) == before


# ---- hostile input ---------------------------------------------------------------------------------

def test_every_bad_upload_gets_a_result_or_a_clear_error(running_app, tmp_path):
    client = running_app.client()
    corpus = make_bad_upload_corpus(tmp_path / "bad")
    for item in corpus:
        predictions, uploads = count(running_app.engine, Prediction), count(running_app.engine, Upload)
        if item.expect == "ok":
            details = caption(client, item.path)
            assert details["caption"], item.name
            assert count(running_app.engine, Prediction) == predictions + 1, item.name
        else:
            with pytest.raises((AppError, ValueError)) as err:  # ValueError: the client refuses over-size files
                caption(client, item.path)
            message = str(err.value)
            assert len(message) > 15 and "Traceback" not in message, (item.name, message)
            assert count(running_app.engine, Prediction) == predictions, item.name  # no half row
            assert count(running_app.engine, Upload) == uploads, item.name
    assert caption(client)["caption"]  # and the server keeps serving


def test_bad_upload_messages_name_the_problem(running_app, tmp_path):
    by_name = {item.name: item.path for item in make_bad_upload_corpus(tmp_path / "bad")}
    client = running_app.client()
    expected = {"empty.png": "empty", "bomb.png": "decompression bomb", "truncated.jpg": "truncated",
                "not_an_image.png": "text", "icon.ico": "ICO"}
    for name, fragment in expected.items():
        with pytest.raises(AppError, match=fragment):
            caption(client, by_name[name])
    with pytest.raises(ValueError, match="maximum file size"):  # gradio_client checks max_file_size itself
        caption(client, by_name["huge_bytes.png"])
    with by_name["huge_bytes.png"].open("rb") as fh:  # and so does the server, for clients that do not
        response = httpx.post(f"{running_app.url}gradio_api/upload", files={"files": ("huge.png", fh)}, timeout=60)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    with pytest.raises(AppError):
        analyze(client, by_name["bomb.png"])


# ---- load ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crowd_app(predictor, app_home, tmp_path_factory):
    """An app whose per-client event limit does not apply: the twenty "people" below all come from 127.0.0.1,
    one client to the limiter, and the module's other tests have already drawn on that client's bucket (how
    much depends on how fast they ran). The limits have their own tests (test_security, test_rest_api)."""
    running = start_app(module_home(app_home, tmp_path_factory), predictor, event_burst=100_000,
                        events_per_minute=100_000.0)
    yield running
    running.demo.close()
    running.engine.dispose()


def test_twenty_concurrent_clients_submit_ten_ratings_each(crowd_app):
    running_app = crowd_app
    before = count(running_app.engine, Rating)

    def one_client(n: int) -> int:
        client = running_app.client()
        details = caption(client)
        for i in range(10):
            client.predict(1 + i % 5, 1 + n % 5, 3, "", f"client {n} rating {i}", uuid.uuid4().hex,
                           api_name="/rate_caption")
        return details["prediction_id"]

    with ThreadPoolExecutor(20) as pool:
        prediction_ids = list(pool.map(one_client, range(20)))
    assert count(running_app.engine, Rating) - before == 200
    with Session(running_app.engine) as s:
        per_prediction = dict(s.execute(select(Rating.prediction_id, func.count()).where(
            Rating.prediction_id.in_(prediction_ids)).group_by(Rating.prediction_id)).all())
    assert per_prediction == {pid: 10 for pid in prediction_ids}


# ---- operator page -------------------------------------------------------------------------------

def test_operator_page_needs_login(running_app):
    client = running_app.client()
    with pytest.raises(AppError, match="Log in"):
        client.predict(api_name="/operator_refresh")
    with pytest.raises(AppError, match="Log in"):
        client.predict("csv", api_name="/operator_export")
    with pytest.raises(AppError, match="Wrong user or password"):
        client.predict(OPERATOR[0], "wrong", api_name="/operator_login")
    assert running_app.login(OPERATOR[0], "wrong-password").status_code == 401


def test_operator_tables_and_exports(running_app, meme_path, tmp_path):
    anonymous = running_app.client()
    details = caption(anonymous)
    anonymous.predict(4, 4, 4, "an operator-visible caption", "", "", api_name="/rate_caption")
    analyze(anonymous, meme_path)
    client = running_app.operator_client()  # POST /auth/login; the cookie rides on every request
    out = client.predict(OPERATOR[0], "200", api_name="/operator_login")
    version, predictions, feedback, per_day, per_label, raters = out[-6:]
    assert OPERATOR[0] in [row[0] for row in raters["data"]]
    assert TEST_VERSION in version
    assert details["prediction_id"] in [row[0] for row in predictions["data"]]
    assert "an operator-visible caption" in [row[10] for row in feedback["data"]]
    assert sum(row[1] for row in per_day["data"]) == count(running_app.engine, Prediction)
    assert sum(row[2] for row in per_label["data"]) == count(running_app.engine, Prediction, Prediction.kind == "meme")
    refreshed = client.predict(api_name="/operator_refresh")
    assert refreshed[1]["data"][0][0] >= details["prediction_id"]

    # the operator's own predictions carry the operator name; anonymous ones do not
    caption(client)
    with Session(running_app.engine) as s:
        assert s.scalars(select(Prediction.user).order_by(Prediction.id.desc())).first() == OPERATOR[0]

    expected_files = {"csv": "feedback.csv", "parquet": "feedback.parquet", "jsonl": "feedback.jsonl",
                      "hf": "dataset_info.json"}
    for fmt, data_file in expected_files.items():
        archive = client.predict(fmt, api_name="/operator_export")
        archive = archive.get("value", archive)  # the file arrives inside a visibility update
        with zipfile.ZipFile(archive["path"]) as zf:
            names = zf.namelist()
        assert any(n.endswith(data_file) for n in names), (fmt, names)
        assert any("/images/" in n for n in names), (fmt, names)

    client.predict(api_name="/operator_logout")
    with pytest.raises(AppError, match="Log in"):
        client.predict(api_name="/operator_refresh")


def test_operator_page_is_unusable_without_configured_credentials(predictor, tmp_path):
    (tmp_path / "models").symlink_to(predictor.store.root, target_is_directory=True)
    running = start_app(tmp_path, predictor, operator_user="", operator_password="")
    try:
        client = running.client()
        for user, password in (("", ""), (OPERATOR[0], OPERATOR[1])):
            with pytest.raises(AppError, match="disabled"):
                client.predict(user, password, api_name="/operator_login")
            assert running.login(user, password).status_code == 403
        with pytest.raises(AppError, match="Log in"):
            client.predict(api_name="/operator_refresh")
    finally:
        running.demo.close()
        running.engine.dispose()


# ---- model hot swap --------------------------------------------------------------------------------

def test_model_is_hot_swapped_when_the_registry_promotes_a_version(running_app, predictor):
    import time

    store = predictor.store
    other = build_tiny_model(predictor, store, "test-tiny-v2", seed=1)
    with Session(running_app.engine) as s, s.begin():
        for version in (TEST_VERSION, other):
            repo.register_version(s, version=version, path=str(store.path(version)), sha256=store.weights_sha256(version))
        repo.promote(s, other)
    client = running_app.client()
    try:
        time.sleep(0.3)  # the watcher polls every 0.2 s in tests
        assert caption(client)["model_version"] == other
    finally:
        with Session(running_app.engine) as s, s.begin():
            repo.promote(s, TEST_VERSION)
        time.sleep(0.3)
        assert caption(client)["model_version"] == TEST_VERSION
