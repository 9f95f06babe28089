"""The REST API (/api/v1) of a running app: real server, real model, real SQLite database, real HTTP.

Checks that a caption or meme analysis, then its rating and correction, land in the database with the
caller's identity (anonymous, login cookie, bearer token); that bad uploads and bad bodies get a 4xx
JSON error and store nothing; that the per-client limits apply; that the OpenAPI document lists the
endpoints. The micro-batcher's own tests are in tests/mmapp/test_batching.py; here the batched image
tower is compared with the unbatched one on the same pictures.
"""
from __future__ import annotations

import io
import threading

import httpx
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db.models import Correction, Prediction, Rating
from tests.app.conftest import LABELS, OPERATOR, PHOTOS, SESSION_COOKIE, module_home, start_app
from tests.bad_uploads import make_bad_upload_corpus

API = "/api/v1"
CAT = PHOTOS / "chelsea.jpg"


@pytest.fixture(scope="module")
def api(running_app):
    with httpx.Client(base_url=running_app.url.rstrip("/") + API, timeout=60) as client:
        yield client


def count(running_app, model) -> int:
    with Session(running_app.engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def caption(api, path=CAT, **kwargs) -> httpx.Response:
    with open(path, "rb") as fh:
        return api.post("/caption", files={"image": (path.name, fh, "image/jpeg")}, **kwargs)


def test_openapi_lists_the_endpoints(api):
    doc = api.get("/openapi.json").json()
    assert doc["info"]["title"] == "mmapp REST API"
    for path, method in (("/caption", "post"), ("/memes/analyze", "post"), ("/ratings", "post"),
                         ("/corrections", "post"), ("/health", "get"), ("/version", "get")):
        assert method in doc["paths"][path], path
    assert "image" in str(doc["components"]["schemas"])  # the multipart upload field is documented


def test_health_and_version(api, predictor):
    assert api.get("/health").json() == {"status": "ok", "model_version": predictor.version}
    version = api.get("/version").json()
    assert version["api"] == "v1" and tuple(version["labels"]) == LABELS and set(version["encoders"]) == {"image", "text"}


def test_caption_rating_and_correction_land_in_the_database_anonymously(api, running_app):
    r = caption(api)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["caption"] and 0 <= out["confidence"] <= 1 and out["item_key"].startswith("api-")
    with Session(running_app.engine) as s:
        pred = s.get(Prediction, out["item_id"])
        assert pred.kind == "caption" and pred.outputs["caption"] == out["caption"] and pred.user is None
        assert pred.session_id == out["item_key"]
    body = {"item_id": out["item_id"], "item_key": out["item_key"], "coherence": 4, "detail": 2, "comment": "ok"}
    first = api.post("/ratings", json=body)
    assert first.status_code == 200, first.text
    again = api.post("/ratings", json=body)  # a retry of the same body is stored once
    assert again.json()["rating_id"] == first.json()["rating_id"]
    fixed = api.post("/corrections", json={"item_id": out["item_id"], "item_key": out["item_key"],
                                           "field": "caption", "value": "a  cat on a sofa"})
    assert fixed.status_code == 200, fixed.text
    with Session(running_app.engine) as s:
        rating = s.get(Rating, first.json()["rating_id"])
        assert (rating.prediction_id, rating.coherence, rating.relevance, rating.detail, rating.user) == \
            (out["item_id"], 4, None, 2, None)
        correction = s.get(Correction, fixed.json()["correction_id"])
        assert (correction.field, correction.value, correction.prediction_id) == ("caption", "a cat on a sofa", out["item_id"])


def test_a_logged_in_rater_is_named_on_the_rows_by_cookie_or_bearer_token(api, running_app):
    login = running_app.login()
    assert login.status_code == 200, login.text
    token = login.cookies[SESSION_COOKIE]
    by_cookie = caption(api, cookies={SESSION_COOKIE: token})
    assert by_cookie.status_code == 200, by_cookie.text
    item = by_cookie.json()
    rated = api.post("/ratings", json={"item_id": item["item_id"], "item_key": item["item_key"], "relevance": 5},
                     headers={"Authorization": f"Bearer {token}"})
    assert rated.status_code == 200 and rated.json()["user"] == OPERATOR[0]
    with Session(running_app.engine) as s:
        assert s.get(Prediction, item["item_id"]).user == OPERATOR[0]
        assert s.get(Rating, rated.json()["rating_id"]).user == OPERATOR[0]
    bad = api.post("/ratings", json={"item_id": item["item_id"], "item_key": item["item_key"], "relevance": 5},
                   headers={"Authorization": "Bearer not-a-session"})
    assert bad.status_code == 401 and "error" in bad.json()


def test_meme_analysis_then_label_and_text_corrections(api, running_app, meme_path):
    with open(meme_path, "rb") as fh:
        r = api.post("/memes/analyze", files={"image": ("meme.png", fh, "image/png")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ocr_text"] and set(out["fused"]) == set(LABELS) and out["label"] in LABELS
    assert abs(sum(out["fused"].values()) - 1) < 1e-4
    with open(meme_path, "rb") as fh:  # the text sent replaces OCR; image removed = text only
        typed = api.post("/memes/analyze", files={"image": ("meme.png", fh, "image/png")},
                         data={"text": "when the tests pass", "use_image": "false"}).json()
    assert typed["ocr_text"] is None and typed["ablation"] == "image" and typed["label"] in LABELS
    key = {"item_id": out["item_id"], "item_key": out["item_key"]}
    assert api.post("/corrections", json={**key, "field": "label", "value": LABELS[1]}).status_code == 200
    assert api.post("/corrections", json={**key, "field": "ocr_text", "value": "when tests pass"}).status_code == 200
    wrong = api.post("/corrections", json={**key, "field": "label", "value": "not a label"})
    assert wrong.status_code == 400 and "unknown label" in wrong.json()["error"]
    caption_field = api.post("/corrections", json={**key, "field": "caption", "value": "x"})
    assert caption_field.status_code == 400 and "ocr_text or label" in caption_field.json()["error"]
    with Session(running_app.engine) as s:
        fields = s.scalars(select(Correction.field).where(Correction.prediction_id == out["item_id"])).all()
    assert sorted(fields) == ["label", "ocr_text"]


def test_bad_uploads_get_a_4xx_json_error_and_store_nothing(api, running_app, tmp_path):
    before = count(running_app, Prediction)
    corpus = [u for u in make_bad_upload_corpus(tmp_path) if u.expect == "error"]
    assert corpus
    for upload in corpus:
        with open(upload.path, "rb") as fh:
            r = api.post("/caption", files={"image": (upload.name, fh, "application/octet-stream")})
        assert 400 <= r.status_code < 500, (upload.name, r.status_code, r.text)
        assert r.json()["error"], upload.name
    text = api.post("/caption", files={"image": ("notes.txt", b"just some text", "text/plain")})
    assert text.status_code == 400 and "error" in text.json()
    huge = api.post("/caption", files={"image": ("huge.jpg", b"\xff\xd8" + b"0" * (21 * 2**20), "image/jpeg")})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]  # refused from Content-Length alone
    just_over = api.post("/caption", files={"image": ("big.jpg", b"\xff\xd8" + b"0" * (20 * 2**20), "image/jpeg")})
    assert just_over.status_code == 413 and "larger than the limit" in just_over.json()["error"]  # counted on read
    missing = api.post("/caption", data={"request_id": "x"})
    assert missing.status_code == 422 and "image" in missing.json()["error"]
    assert count(running_app, Prediction) == before


def test_bad_feedback_bodies_are_clear_errors(api):
    item = caption(api).json()
    key = {"item_id": item["item_id"], "item_key": item["item_key"]}
    cases = [({**key, "coherence": 7}, 422, "coherence"),
             ({**key}, 400, "Nothing to save"),
             ({"item_id": item["item_id"], "item_key": "api-guess", "coherence": 3}, 404, "no item"),
             ({"item_id": 10**9, "item_key": item["item_key"], "coherence": 3}, 404, "no item"),
             ({**key, "comment": "x" * 5000}, 400, "limit")]
    for body, status, words in cases:
        r = api.post("/ratings", json=body)
        assert r.status_code == status and words in r.json()["error"], (body, r.status_code, r.text)
    not_json = api.post("/ratings", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and "error" in not_json.json()


def test_per_client_upload_limits_apply_to_the_api(predictor, app_home, tmp_path_factory):
    running = start_app(module_home(app_home, tmp_path_factory), predictor, upload_burst=1, uploads_per_minute=0.01)
    try:
        with httpx.Client(base_url=running.url.rstrip("/") + API, timeout=60) as api:
            assert caption(api).status_code == 200
            limited = caption(api)
            assert limited.status_code == 429 and "too many uploads" in limited.json()["error"]
            assert limited.headers["retry-after"]
    finally:
        running.demo.close()
        running.engine.dispose()


def test_batched_image_tower_gives_each_caller_its_own_features(predictor):
    """Eight threads at once through the micro-batcher == each picture through the tower alone."""
    from mmapp.batching import MicroBatcher

    photos = sorted(PHOTOS.glob("*.jpg"))[:8]
    images = [Image.open(io.BytesIO(p.read_bytes())).convert("RGB") for p in photos]
    alone = [predictor.embedder.image_encoder.encode([im]) for im in images]
    batcher = MicroBatcher(predictor._encode_batch, max_size=8, max_wait_ms=200, name="test")
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(images))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = batcher.submit([images[i]], timeout_s=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert batcher.stats.largest > 1, batcher.stats  # they did share a batch
    for i, ref in enumerate(alone):
        assert torch.allclose(results[i].features, ref.features, atol=1e-4), photos[i].name
        assert torch.allclose(results[i].class_probs, ref.class_probs, atol=1e-5), photos[i].name


def test_captions_are_the_same_with_the_micro_batcher_on(predictor):
    """The predictor with batching on serves what it serves without (same caption, same scores)."""
    from mmapp.imageio import load_image

    pictures = [load_image(p, name=p.name) for p in sorted(PHOTOS.glob("*.jpg"))[:3]]
    plain = [predictor.caption(d) for d in pictures]
    predictor.enable_batching(max_size=8, max_wait_ms=2)
    try:
        batched = [predictor.caption(d) for d in pictures]
    finally:
        predictor.image_batcher.close()
        predictor.image_batcher = None
    for a, b in zip(plain, batched):
        assert (a.caption, a.source) == (b.caption, b.source)
        assert abs(a.confidence - b.confidence) < 1e-4
