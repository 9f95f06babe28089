"""The Compare tab over a running server: through the API (gradio_client with a login cookie) and in headless
Chromium (log in, open Compare, pick "A is better"). Votes are read back from the database."""
from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import BlindVote
from tests.app.conftest import OPERATOR, PHOTOS, TEST_VERSION, module_home, start_app


@pytest.fixture(scope="module")
def compare_app(predictor, app_home, tmp_path_factory):
    running = start_app(module_home(app_home, tmp_path_factory), predictor)
    sha, relpath = running.blobstore.put((PHOTOS / "chelsea.jpg").read_bytes(), "jpg")
    with Session(running.engine) as s, s.begin():
        repo.register_version(s, version=TEST_VERSION, path=str(predictor.store.path(TEST_VERSION)), sha256="0" * 64)
        s.flush()
        repo.promote(s, TEST_VERSION)
        run = repo.start_retrain_run(s, trigger="cli", owner="test")
        repo.register_version(s, version="held-v9", path="/nowhere", sha256="9" * 64, parent_version=TEST_VERSION)
        s.flush()
        repo.add_blind_pairs(s, run_id=run.id, candidate_version="held-v9", current_version=TEST_VERSION, pairs=[
            {"item_id": f"correction:{i}", "image_sha256": sha, "image_relpath": relpath,
             "output_a": f"a cat on a sofa {i}", "output_b": f"a dog in the snow {i}", "candidate_side": "a"}
            for i in range(3)])
    yield running
    running.demo.close()
    running.engine.dispose()


def votes(engine) -> list[tuple[str, str]]:
    with Session(engine) as s:
        return [(v.rater, v.choice) for v in s.scalars(select(BlindVote).order_by(BlindVote.id))]


def test_compare_through_the_api_with_a_login_cookie(compare_app):
    client = compare_app.operator_client()
    pair_id, image, a, b, status = client.predict(api_name="/compare_next")
    assert pair_id is not None and a.startswith("a cat") and b.startswith("a dog") and image
    nxt = client.predict(pair_id, "b", api_name="/compare_vote")
    assert nxt[-1].startswith("✔ Saved") and nxt[0] != pair_id
    assert votes(compare_app.engine)[-1] == (f"account:{OPERATOR[0]}", "b")
    with pytest.raises(Exception, match="Log in"):  # anonymous sessions do not vote by default
        compare_app.client().predict(api_name="/compare_next")


@pytest.mark.browser
def test_compare_in_the_browser(compare_app):
    from tests.app.test_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, field, wait_for_text
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(compare_app.url)
        page.get_by_role("tab", name="Operator").click()
        field(page, "operator-login").fill(OPERATOR[0])
        page.locator("#operator-login input[type=password]").fill(OPERATOR[1])
        page.get_by_role("button", name="Log in").click()
        wait_for_text(page, "#operator-version", "Model version served")
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-next").click()
        page.wait_for_function("document.querySelector('#compare-a textarea, #compare-a input').value.length > 0")
        before = len(votes(compare_app.engine))
        page.locator("#compare-a-better").click()
        wait_for_text(page, "#compare-status", "Saved")
        browser.close()
    assert len(votes(compare_app.engine)) == before + 1 and votes(compare_app.engine)[-1][1] == "a"
