"""The Compare tab's handlers called directly (no Gradio server): blind pairs shown without their sides,
one vote per rater per pair, anonymous voting only when configured, the operator's "Decide pending candidates"."""
from __future__ import annotations

import dataclasses

import gradio as gr
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import app
from app import UserInputError
from feedback_db import repository as repo
from feedback_db.blobstore import BlobStore
from feedback_db.models import BlindVote
from tests.app.conftest import OPERATOR, PHOTOS, TEST_VERSION, make_config, module_home


@pytest.fixture(scope="module")
def services(predictor, app_home, tmp_path_factory):
    from feedback_db.engine import init_db, make_engine

    home = module_home(app_home, tmp_path_factory)
    engine = make_engine(f"sqlite:///{home / 'app.db'}")
    init_db(engine)
    blobs = BlobStore(home / "uploads")
    sha, relpath = blobs.put((PHOTOS / "chelsea.jpg").read_bytes(), "jpg")
    with Session(engine) as s, s.begin():
        repo.register_version(s, version=TEST_VERSION, path=str(predictor.store.path(TEST_VERSION)), sha256="0" * 64)
        s.flush()
        repo.promote(s, TEST_VERSION)
        run = repo.start_retrain_run(s, trigger="cli", owner="test")
        repo.register_version(s, version="held-v2", path="/nowhere/held-v2", sha256="1" * 64,
                              parent_version=TEST_VERSION)
        s.flush()
        repo.add_blind_pairs(s, run_id=run.id, candidate_version="held-v2", current_version=TEST_VERSION, pairs=[
            {"item_id": f"correction:{i}", "image_sha256": sha, "image_relpath": relpath,
             "output_a": f"a cat on a sofa {i}", "output_b": f"a dog in the snow {i}", "candidate_side": side}
            for i, side in enumerate("ab")])
    yield app.AppServices(config=make_config(home), predictor=predictor, engine=engine, blobstore=blobs,
                          watcher=app.ModelWatcher(predictor, engine), exports_dir=home / "exports")
    engine.dispose()


def login(services, name: str, role: str = "rater") -> gr.Request:
    if name not in {a["name"] for a in services.accounts.list_accounts()}:
        services.accounts.create(name, role, password=f"{name}-pass-123456")
    result = services.accounts.login(name, f"{name}-pass-123456" if name != OPERATOR[0] else OPERATOR[1])
    assert result.ok, result.message
    return gr.Request(cookies={app.SESSION_COOKIE: result.token})


def votes(services) -> list[tuple[int, str, str]]:
    with Session(services.engine) as s:
        return [(v.pair_id, v.rater, v.choice) for v in s.scalars(select(BlindVote).order_by(BlindVote.id))]


def test_a_rater_sees_pairs_without_their_sides_and_votes_once_each(services):
    ann = login(services, "ann")
    shown = app.compare_next(services, app.new_session(), ann)
    assert set(shown) == {"pair_id", "image", "output_a", "output_b", "status"}  # no candidate_side, no versions
    assert shown["image"].endswith(".jpg") and "a cat on a sofa" in shown["output_a"]
    first = shown["pair_id"]
    after = app.compare_vote(services, first, "A is better", app.new_session(), ann)  # the button's label
    assert after["status"].startswith("✔ Saved") and after["pair_id"] != first
    again = app.compare_vote(services, first, "b", app.new_session(), ann)
    assert "already judged" in again["status"]
    done = app.compare_vote(services, after["pair_id"], "same", app.new_session(), ann)
    assert done["pair_id"] is None and "Nothing to compare" in done["status"]
    assert [(r, c) for _, r, c in votes(services) if r == "account:ann"] == [("account:ann", "a"),
                                                                            ("account:ann", "same")]
    with Session(services.engine) as s:
        assert repo.blind_tally(s, "held-v2")["votes"] == 2


def test_bad_votes_are_refused_with_a_clear_message(services):
    bob = login(services, "bob")
    before = votes(services)
    with pytest.raises(UserInputError, match="Show a pair first"):
        app.compare_vote(services, None, "a", app.new_session(), bob)
    with pytest.raises(UserInputError, match="Pick one of"):
        app.compare_vote(services, 1, "both", app.new_session(), bob)
    with pytest.raises(UserInputError, match="no comparison #999"):
        app.compare_vote(services, 999, "a", app.new_session(), bob)
    assert votes(services) == before


def test_anonymous_sessions_vote_only_when_configured(services):
    session = app.new_session()
    with pytest.raises(UserInputError, match="Log in"):
        app.compare_next(services, session, gr.Request(cookies={}))
    config = dataclasses.replace(services.config,
                                 retrain=dataclasses.replace(services.config.retrain, blind_anonymous_votes=True))
    open_services = dataclasses.replace(services, config=config)
    shown = app.compare_next(open_services, session, gr.Request(cookies={}))
    app.compare_vote(open_services, shown["pair_id"], "b", session, gr.Request(cookies={}))
    assert votes(services)[-1][1:] == (f"session:{session['session_id']}", "b")


def test_only_an_operator_decides_held_candidates(services):
    with pytest.raises(UserInputError, match="operator"):
        app.retrain_decide_held(services, login(services, "carol"))
    out = app.retrain_decide_held(services, login(services, OPERATOR[0]))
    assert "held-v2" in out["notice"] and "waiting" in out["notice"]  # 3 votes, 30 needed by default


def test_the_page_wires_the_compare_events_by_api_name(services):
    demo = app.build_app(services.config, services.predictor, services.engine, services.blobstore,
                         watcher=services.watcher)
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"compare_next", "compare_vote", "compare_vote_a", "compare_vote_b", "compare_vote_same",
            "retrain_decide_held"} <= names
    api = demo.get_api_info()["named_endpoints"]
    assert [p["parameter_name"] for p in api["/compare_vote"]["parameters"]] == ["pair_id", "choice"]
    assert "/compare_vote_a" not in api  # the page's buttons, not part of the API
