"""End to end in headless Chromium (Debian's, through Playwright): what a person does in the page.

Screenshots land in ``test-artifacts/`` at the repository root (gitignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db.models import Correction, Prediction, Rating
from tests.app.conftest import OPERATOR, PHOTOS, REPO, SESSION_COOKIE

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, running_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(running_app.url)
    page.wait_for_selector("#caption-text")
    yield page
    context.close()


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def wait_for_text(page, selector: str, text: str) -> None:
    page.locator(selector).filter(has_text=text).wait_for()


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first


def test_caption_upload_correct_rate_and_save(page, running_app):
    page.locator("input[type=file]").first.set_input_files(str(PHOTOS / "chelsea.jpg"))
    page.wait_for_function(
        "document.querySelector('#caption-text textarea, #caption-text input').value.length > 0")
    caption = field(page, "caption-text").input_value()
    wait_for_text(page, "#caption-confidence", "Confidence")
    shown = page.locator("#caption-confidence").inner_text()
    assert "cat" in caption.lower() and "Confidence:" in shown and "model" in shown

    field(page, "caption-corrected").fill("a tabby cat looking into the camera")
    set_slider(page, "caption-coherence", 4)
    set_slider(page, "caption-relevance", 2)
    set_slider(page, "caption-detail", 3)
    page.locator("#caption-submit").click()
    wait_for_text(page, "#caption-status", "Saved")
    page.screenshot(path=str(ARTIFACTS / "caption_saved.png"), full_page=True)

    with Session(running_app.engine) as s:
        prediction = s.scalars(select(Prediction).where(Prediction.kind == "caption")
                               .order_by(Prediction.id.desc())).first()
        assert prediction.outputs["caption"] == caption
        rating = s.scalars(select(Rating).where(Rating.prediction_id == prediction.id)).one()
        assert (rating.coherence, rating.relevance, rating.detail) == (4, 2, 3)
        correction = s.scalars(select(Correction).where(Correction.prediction_id == prediction.id)).one()
        assert (correction.field, correction.value) == ("caption", "a tabby cat looking into the camera")

    page.locator("#caption-submit").dblclick()  # the same form again: still one rating
    wait_for_text(page, "#caption-status", "Saved")
    page.wait_for_timeout(500)
    with Session(running_app.engine) as s:
        assert len(s.scalars(select(Rating).where(Rating.prediction_id == prediction.id)).all()) == 1


def test_meme_flow_with_ablation_toggles(page, running_app, meme_path):
    page.get_by_role("tab", name="Meme").click()
    page.locator("input[type=file]").last.set_input_files(str(meme_path))
    page.wait_for_function("document.querySelector('#meme-text textarea').value.length > 0")
    assert "TESTS" in field(page, "meme-text").input_value().upper()
    wait_for_text(page, "#meme-verdict", "with image and text")
    for panel in ("#label-fused", "#label-image-only", "#label-text-only"):
        assert "%" in page.locator(panel).inner_text()
    page.screenshot(path=str(ARTIFACTS / "meme_fused.png"), full_page=True)

    page.locator("#use-text input[type=checkbox]").uncheck()
    wait_for_text(page, "#meme-verdict", "without the text")
    page.screenshot(path=str(ARTIFACTS / "meme_without_text.png"), full_page=True)
    page.locator("#use-text input[type=checkbox]").check()
    page.locator("#use-image input[type=checkbox]").uncheck()
    wait_for_text(page, "#meme-verdict", "without the image")
    page.locator("#use-image input[type=checkbox]").check()
    wait_for_text(page, "#meme-verdict", "with image and text")

    text_box = field(page, "meme-text")
    text_box.fill("what a lovely sunny day")
    text_box.press("Shift+Enter")  # Enter adds a line in a multi-line box
    page.wait_for_function("document.querySelector('#meme-corrected-text textarea').value === 'what a lovely sunny day'")

    label = page.locator("#meme-corrected-label input")
    label.click()
    page.get_by_role("option", name="positive").click()
    set_slider(page, "meme-relevance", 5)
    page.locator("#meme-submit").click()
    wait_for_text(page, "#meme-status", "Saved")
    page.screenshot(path=str(ARTIFACTS / "meme_saved.png"), full_page=True)

    with Session(running_app.engine) as s:
        rows = s.scalars(select(Prediction).where(Prediction.kind == "meme").order_by(Prediction.id)).all()[-5:]
        assert {"text", "image"} <= {r.ablation for r in rows}  # each toggle re-ran without its modality
        last = rows[-1]
        assert last.input_text == "what a lovely sunny day" and last.ablation is None
        fields = {c.field: c.value for c in s.scalars(select(Correction).where(Correction.prediction_id == last.id))}
        assert fields == {"label": "positive", "ocr_text": "what a lovely sunny day"}
        assert s.scalars(select(Rating.relevance).where(Rating.prediction_id == last.id)).one() == 5


def test_operator_page_after_login(page):
    page.get_by_role("tab", name="Operator").click()
    field(page, "operator-login").fill(OPERATOR[0])
    page.locator("#operator-login input[type=password]").fill(OPERATOR[1])
    page.get_by_role("button", name="Log in").click()
    wait_for_text(page, "#operator-version", "Model version served")
    page.get_by_text("Recent predictions").first.wait_for()
    wait_for_text(page, "#retrain-status", "Next scheduled run")  # the retrain panel fills in after login
    assert page.locator("#retrain-now").is_visible()
    page.screenshot(path=str(ARTIFACTS / "operator.png"), full_page=True)


def test_login_cookie_is_httponly_and_logout_ends_it(page, running_app):
    page.get_by_role("tab", name="Operator").click()
    field(page, "operator-login").fill(OPERATOR[0])
    page.locator("#operator-login input[type=password]").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    page.get_by_text("Wrong user or password").first.wait_for()
    page.locator("#operator-login input[type=password]").fill(OPERATOR[1])
    page.locator("#operator-login input[type=password]").press("Enter")  # the error overlay covers the button
    wait_for_text(page, "#whoami", f"Logged in as {OPERATOR[0]}")
    cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert SESSION_COOKIE not in page.evaluate("document.cookie")  # the page's scripts cannot read it
    assert page.evaluate("fetch('auth/whoami').then(r => r.status)") == 200
    page.get_by_role("button", name="Log out").click()
    page.locator("#operator-login").wait_for(state="visible")
    page.wait_for_function("fetch('auth/whoami').then(r => r.status === 401)")
    assert not page.locator("#operator-version").is_visible()


def test_the_rest_api_docs_page_renders_offline(browser, running_app):
    """Swagger UI at /api/v1/docs draws the API from the app's own files: no request leaves the host."""
    from urllib.parse import urlparse

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    host = urlparse(running_app.url).hostname
    elsewhere = []

    def only_local(route):
        if urlparse(route.request.url).hostname == host:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(running_app.url.rstrip("/") + "/api/v1/docs")
    page.locator(".swagger-ui .info .title").filter(has_text="mmapp REST API").wait_for()
    page.locator(".opblock-summary-path").filter(has_text="/caption").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "api_docs.png"), full_page=True)
    context.close()
    assert not elsewhere, elsewhere
