"""Rater accounts on both backends: password hashes, login with per-account backoff, the attempt log,
and server-issued sessions (idle expiry, absolute expiry, logout, revocation)."""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.accounts import AuthPolicy, Accounts, hash_password, token_sha256, verify_password
from feedback_db.models import AuthSession

from .factories import add_prediction, add_upload

PASSWORD = "correct horse battery"
FAST = AuthPolicy(scrypt_log2_n=10, session_idle_minutes=30, session_max_hours=12, lockout_after=3,
                  lockout_base_s=30, lockout_max_s=120)


class Clock:
    def __init__(self):
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def accounts(engine, clock) -> Accounts:
    return Accounts(engine, FAST, clock=clock)


def attempts(engine, name: str) -> list[str]:
    with Session(engine) as s:
        return [a.outcome for a in reversed(repo.login_attempts(s, name=name))]


# ---- hashes ---------------------------------------------------------------------------------------

def test_password_hash_is_versioned_salted_and_checked_in_constant_time():
    first, second = hash_password(PASSWORD, log2_n=10), hash_password(PASSWORD, log2_n=10)
    scheme, log2_n, r, p, salt, digest = first.split("$")
    assert (scheme, log2_n, r, p) == ("scrypt", "10", "8", "1")
    assert first != second and salt != second.split("$")[4]  # a fresh salt per hash
    assert PASSWORD not in first
    assert verify_password(PASSWORD, first) and verify_password(PASSWORD, second)
    assert not verify_password("correct horse battery!", first) and not verify_password("", first)
    with pytest.raises(ValueError, match="unknown password hash scheme 'md5'"):
        verify_password(PASSWORD, "md5$abc")
    started = time.perf_counter()
    verify_password(PASSWORD, hash_password(PASSWORD))  # the default cost: 2**14
    assert time.perf_counter() - started > 0.01  # a real KDF, not a plain digest


def test_lock_time_doubles_and_is_capped():
    assert [FAST.lock_for_s(n) for n in range(1, 7)] == [0, 0, 30, 60, 120, 120]
    with pytest.raises(ValueError, match="scrypt_log2_n"):
        AuthPolicy(scrypt_log2_n=4)


# ---- accounts and login -----------------------------------------------------------------------------

def test_create_login_and_roles(accounts, engine):
    who, password = accounts.create("alice", "trusted", created_by="op")
    assert (who.name, who.role) == ("alice", "trusted") and len(password) >= 16  # generated, shown once
    accounts.create("bob", "rater", "a long enough password")
    with pytest.raises(ValueError, match="already exists"):
        accounts.create("alice", "rater", "another long password")
    with pytest.raises(ValueError, match="at least 10 characters"):
        accounts.create("carol", "rater", "short")
    with pytest.raises(ValueError, match="role must be one of"):
        accounts.create("carol", "admin", "a long enough password")
    with pytest.raises(ValueError, match="rater name"):
        accounts.create("no spaces please", "rater", "a long enough password")

    result = accounts.login("alice", password)
    assert result.ok and result.identity.role == "trusted" and result.token and result.max_age_s == 12 * 3600
    assert accounts.identity(result.token).name == "alice"
    with Session(engine) as s:
        stored = s.scalars(select(AuthSession)).one()
        row = repo.get_rater(s, "alice")
        assert stored.token_sha256 == hashlib.sha256(result.token.encode()).hexdigest()  # only the hash is kept
        assert row.password_hash.startswith("scrypt$") and password not in row.password_hash
        assert repo.rater_roles(s) == {"alice": "trusted", "bob": "rater"}
    assert not accounts.login("alice", "wrong password").ok
    assert not accounts.login("nobody", password).ok
    assert attempts(engine, "alice") == ["ok", "wrong_password"] and attempts(engine, "nobody") == ["unknown_user"]
    columns = {c["name"] for c in inspect(engine).get_columns("login_attempts")}
    assert columns == {"id", "name", "rater_id", "outcome", "created_at"}  # no IP, no password


def test_backoff_locks_the_account_then_lets_the_right_password_in(accounts, engine, clock):
    accounts.create("op", "operator", PASSWORD)
    for _ in range(3):
        assert accounts.login("op", "guess").message == "Wrong user or password."
    locked = accounts.login("op", PASSWORD)  # even the right password waits: nothing is checked while locked
    assert not locked.ok and 29 <= locked.retry_after_s <= 30 and "try again in 30 s" in locked.message
    clock.advance(seconds=31)
    assert not accounts.login("op", "guess again").ok  # 4th failure: locked twice as long
    clock.advance(seconds=59)
    assert accounts.login("op", PASSWORD).retry_after_s > 0
    clock.advance(seconds=2)
    assert accounts.login("op", PASSWORD).ok  # success resets the count
    with Session(engine) as s:
        row = repo.get_rater(s, "op")
        assert (row.failed_logins, row.locked_until) == (0, None)
    assert attempts(engine, "op") == ["wrong_password"] * 3 + ["locked", "wrong_password", "locked", "ok"]


def test_unlock_and_new_password_clear_the_lock(accounts):
    accounts.create("op", "operator", PASSWORD)
    for _ in range(3):
        accounts.login("op", "guess")
    accounts.unlock("op")
    assert accounts.login("op", PASSWORD).ok
    for _ in range(3):
        accounts.login("op", "guess")
    accounts.update("op", password="a brand new password")
    assert accounts.login("op", "a brand new password").ok


def test_sessions_expire_when_idle_or_old_and_end_at_logout(accounts, clock, engine):
    accounts.create("alice", "trusted", PASSWORD)
    token = accounts.login("alice", PASSWORD).token
    for _ in range(4):  # used every 20 minutes: stays alive past the 30-minute idle limit
        clock.advance(minutes=20)
        assert accounts.identity(token) is not None
    clock.advance(minutes=31)
    assert accounts.identity(token) is None  # idle too long
    clock.advance(minutes=1)
    assert accounts.identity(token) is None  # and it stays ended

    token = accounts.login("alice", PASSWORD).token
    for _ in range(12 * 3 - 1):  # used every 20 minutes for 11 h 40 min
        clock.advance(minutes=20)
        assert accounts.identity(token) is not None
    clock.advance(minutes=20)
    assert accounts.identity(token) is None  # 12 hours after login: over, despite the activity

    token = accounts.login("alice", PASSWORD).token
    assert accounts.logout(token) and accounts.identity(token) is None and not accounts.logout(token)
    assert accounts.identity(None) is None and accounts.identity("forged") is None and accounts.identity("x" * 500) is None


def test_disabling_demoting_or_a_new_password_ends_open_sessions(accounts, engine):
    accounts.create("alice", "trusted", PASSWORD)
    new_password = "another long password"
    for change, password in (({"role": "rater"}, PASSWORD), ({"password": new_password}, PASSWORD),
                             ({"disabled": True}, new_password)):
        token = accounts.login("alice", password).token
        assert accounts.identity(token) is not None
        accounts.update("alice", **change)
        assert accounts.identity(token) is None, change
    assert accounts.login("alice", "another long password").message == "This account is disabled."
    assert attempts(engine, "alice")[-1] == "disabled"
    with Session(engine) as s:
        assert "alice" not in repo.rater_roles(s)  # a disabled account's feedback is anonymous for cleaning


def test_ensure_operator_follows_the_environment(accounts, engine):
    accounts.ensure_operator("root", PASSWORD)
    assert accounts.login("root", PASSWORD).identity.role == "operator"
    accounts.ensure_operator("root", "the rotated password")  # MMAPP_OPERATOR_PASSWORD changed
    assert not accounts.login("root", PASSWORD).ok and accounts.login("root", "the rotated password").ok
    accounts.update("root", role="rater", disabled=True)
    accounts.ensure_operator("root", "the rotated password")
    with Session(engine) as s:
        row = repo.get_rater(s, "root")
        assert (row.role, row.disabled_at) == ("operator", None)


def test_feedback_counts_per_rater(engine, accounts, store):
    accounts.create("alice", "trusted", PASSWORD)
    with Session(engine) as s, s.begin():
        p = add_prediction(s, add_upload(s, store), user="alice")
        repo.record_correction(s, request_id="c1", prediction_id=p.id, field="label", value="positive",
                               session_id="sess-a", user="alice")
        repo.record_correction(s, request_id="c2", prediction_id=p.id, field="label", value="sarcastic",
                               session_id="sess-b")
        repo.record_rating(s, request_id="r1", prediction_id=p.id, session_id="sess-b", coherence=3)
    with Session(engine) as s:
        rows = {r["user"]: r for r in repo.feedback_counts_per_rater(s)}
    assert rows["alice"] == {"user": "alice", "role": "trusted", "disabled": False, "ratings": 0,
                                  "corrections": 1, "used": 0, "rejected": 0}
    assert rows["(anonymous)"]["corrections"] == 1 and rows["(anonymous)"]["ratings"] == 1


def test_purge_removes_ended_sessions(accounts, engine, clock):
    accounts.create("alice", "trusted", PASSWORD)
    token = accounts.login("alice", PASSWORD).token
    accounts.logout(token)
    with Session(engine) as s, s.begin():
        assert repo.purge_auth_sessions(s, before=clock.now + timedelta(seconds=1)) == 1
        assert s.get(AuthSession, token_sha256(token)) is None


def test_old_login_attempts_are_deleted_oldest_first_in_batches(engine):
    now = datetime.now(timezone.utc)
    with Session(engine) as s, s.begin():
        for days in (200, 150, 100, 10, 0):
            repo.record_login_attempt(s, name=f"n{days}", outcome="unknown_user", now=now - timedelta(days=days))
    with Session(engine) as s, s.begin():
        assert repo.delete_login_attempts(s, before=now - timedelta(days=90), limit=2) == 2  # the two oldest
    with Session(engine) as s:
        assert sorted(a.name for a in repo.login_attempts(s)) == ["n0", "n10", "n100"]
    with Session(engine) as s, s.begin():
        assert repo.delete_login_attempts(s, before=now - timedelta(days=90)) == 1
        with pytest.raises(ValueError):
            repo.delete_login_attempts(s, before=datetime(2026, 1, 1))  # naive datetimes are refused
