"""Accounts and login sessions against the running app, through plain HTTP and ``gradio_client``:
a copied session hash carries no operator rights, logged-out and idle sessions are refused, guesses
lock one account without slowing anyone else, and a rater's feedback is stored under their account."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.accounts import token_sha256
from feedback_db.models import AuthSession, Correction, LoginAttempt, utcnow
from tests.app.conftest import OPERATOR, PHOTOS, SESSION_COOKIE, module_home, start_app

pytestmark = pytest.mark.server
CAT = PHOTOS / "chelsea.jpg"


@pytest.fixture(scope="module")
def auth_app(predictor, app_home, tmp_path_factory):
    running = start_app(module_home(app_home, tmp_path_factory), predictor)
    yield running
    running.demo.close()
    running.engine.dispose()


def login_token(running, user=OPERATOR[0], password=OPERATOR[1]) -> str:
    response = running.login(user, password)
    assert response.status_code == 200, response.text
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    return response.cookies[SESSION_COOKIE]


def create_rater(operator, name: str, role: str) -> str:
    notice = operator.predict(name, role, api_name="/operator_create_rater")[0]
    return re.search(r"shown this once: `([^`]+)`", notice).group(1)


def test_a_copied_session_hash_cannot_use_operator_actions(auth_app):
    operator = auth_app.client(login_token(auth_app))
    operator.predict(OPERATOR[0], "200", api_name="/operator_login")
    assert "Model version served" in operator.predict(api_name="/operator_refresh")[0]

    thief = auth_app.client()  # a fresh client that learnt the operator's session hash (from a proxy log, a URL)
    thief.session_hash = operator.session_hash
    for args, api_name in (((), "/operator_refresh"), (("csv",), "/operator_export"), ((), "/retrain_now"),
                           ((), "/retrain_status"), (("mallory", "operator"), "/operator_create_rater")):
        with pytest.raises(AppError, match="Log in as operator first"):
            thief.predict(*args, api_name=api_name)
    # the same over plain HTTP: the queue keyed by that session hash, no cookie
    join = httpx.post(f"{auth_app.url}gradio_api/queue/join",
                      json={"data": [], "fn_index": _fn_index(auth_app, "operator_refresh"),
                            "session_hash": operator.session_hash, "event_data": None, "trigger_id": None})
    assert join.status_code == 200
    with httpx.stream("GET", f"{auth_app.url}gradio_api/queue/data",
                      params={"session_hash": operator.session_hash}, timeout=30) as stream:
        body = "".join(line for line in stream.iter_lines() if "process_completed" in line or "error" in line)
        # (the stream ends after the one event)
    assert "Log in as operator first" in body and "Model version served" not in body
    assert "Model version served" in operator.predict(api_name="/operator_refresh")[0]  # the operator goes on


def _fn_index(running, api_name: str) -> int:
    config = running.demo.config
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def test_logged_out_and_idle_sessions_are_refused(auth_app):
    token = login_token(auth_app)
    client = auth_app.client(token)
    client.predict(api_name="/operator_refresh")
    client.predict(api_name="/operator_logout")  # the API's logout ends the server-side session
    with pytest.raises(AppError, match="Log in as operator first"):
        client.predict(api_name="/operator_refresh")
    assert httpx.get(f"{auth_app.url}auth/whoami", cookies={SESSION_COOKIE: token}).status_code == 401

    token = login_token(auth_app)
    response = httpx.post(f"{auth_app.url}auth/logout", cookies={SESSION_COOKIE: token})
    assert response.json() == {"logged_out": True} and 'mmapp_session=""' in response.headers["set-cookie"]
    with pytest.raises(AppError, match="Log in as operator first"):
        auth_app.client(token).predict(api_name="/operator_refresh")

    token = login_token(auth_app)
    client = auth_app.client(token)
    client.predict(api_name="/operator_refresh")
    idle = auth_app.config.auth.session_idle_minutes
    with Session(auth_app.engine) as s, s.begin():  # the session was last used longer ago than the idle limit
        s.execute(update(AuthSession).where(AuthSession.token_sha256 == token_sha256(token))
                  .values(last_seen_at=utcnow() - timedelta(minutes=idle + 1)))
    with pytest.raises(AppError, match="Log in as operator first"):
        client.predict(api_name="/operator_refresh")
    token = login_token(auth_app)
    with Session(auth_app.engine) as s, s.begin():  # and one past its absolute expiry
        s.execute(update(AuthSession).where(AuthSession.token_sha256 == token_sha256(token))
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    with pytest.raises(AppError, match="Log in as operator first"):
        auth_app.client(token).predict(api_name="/operator_refresh")


def test_guessing_locks_one_account_logs_it_and_delays_no_one_else(auth_app):
    operator = auth_app.client(login_token(auth_app))
    create_rater(operator, "victim", "trusted")
    password = create_rater(operator, "erin", "trusted")
    with ThreadPoolExecutor(16) as pool:
        guesses = [pool.submit(auth_app.login, "victim", f"guess-{i}") for i in range(40)]
        time.sleep(0.2)  # the guesses are in flight
        started = time.perf_counter()
        assert auth_app.login("erin", password).status_code == 200
        erin_s = time.perf_counter() - started
        statuses = [g.result().status_code for g in guesses]
    assert erin_s < 5.0, erin_s
    after = auth_app.config.auth.lockout_after  # 5: only that many guesses are hashed, the rest refused at once
    assert statuses.count(401) == after and statuses.count(429) == 40 - after
    locked = auth_app.login("victim", "guess-again")
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert "try again in" in locked.json()["error"]
    with Session(auth_app.engine) as s:
        outcomes = [a.outcome for a in repo.login_attempts(s, name="victim", limit=100)]
        assert len(outcomes) == 41 and set(outcomes) == {"wrong_password", "locked"}
        assert not hasattr(LoginAttempt, "ip") and not hasattr(LoginAttempt, "password")
    operator.predict("victim", "unlock", api_name="/operator_update_rater")
    assert auth_app.login("victim", "still wrong").status_code == 401  # unlocked: checked again


def test_a_raters_feedback_is_stored_under_their_account(auth_app):
    operator = auth_app.client(login_token(auth_app))
    password = create_rater(operator, "alice", "trusted")
    alice = auth_app.client(login_token(auth_app, "alice", password))
    who = httpx.get(f"{auth_app.url}auth/whoami", cookies=dict(alice.cookies)).json()
    assert who == {"user": "alice", "role": "trusted"}
    alice.predict(handle_file(str(CAT)), "", api_name="/caption")
    alice.predict(4, 4, 4, "a cat lying on a blanket, by alice", "", "", api_name="/rate_caption")
    with pytest.raises(AppError, match="Log in as operator first"):  # a trusted annotator is no operator
        alice.predict(api_name="/operator_refresh")
    anonymous = auth_app.client()
    anonymous.predict(handle_file(str(CAT)), "", api_name="/caption")
    anonymous.predict(4, 4, 4, "a cat, anonymously", "", "", api_name="/rate_caption")
    with Session(auth_app.engine) as s:
        users = dict(s.execute(select(Correction.value, Correction.user)).all())
    assert users["a cat lying on a blanket, by alice"] == "alice" and users["a cat, anonymously"] is None
    raters = operator.predict(api_name="/operator_refresh")[-1]
    row = next(r for r in raters["data"] if r[0] == "alice")
    assert row[1] == "trusted annotator" and row[7] == 1  # corrections
