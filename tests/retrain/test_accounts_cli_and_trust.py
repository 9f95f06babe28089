"""The accounts command line, the trust flag selection reads from the accounts table, and the
report's per-rater table."""
from __future__ import annotations

import io
import re

import pytest
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.accounts import Accounts, AuthPolicy
from feedback_db.engine import init_db, make_engine
from retrain.__main__ import main
from retrain.report import rater_summary
from retrain.selection import load_feedback
from tests.feedback_db.factories import add_prediction, add_upload


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'feedback.db'}")
    init_db(engine)
    yield engine
    engine.dispose()


def run_cli(tmp_path, capsys, *args, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["--home", str(tmp_path / "home"), *args]) == 0
    return capsys.readouterr().out


def test_accounts_cli(tmp_path, capsys, monkeypatch):
    out = run_cli(tmp_path, capsys, "accounts", "create", "alice", "--role", "trusted")
    password = re.search(r"password: (\S+)", out).group(1)
    run_cli(tmp_path, capsys, "accounts", "create", "bob", "--role", "rater", "--password-stdin",
            stdin="bobs long password\n", monkeypatch=monkeypatch)
    from mmapp.config import load_config

    engine = make_engine(load_config("offline", env={}, storage={"home": str(tmp_path / "home")})
                         .storage.resolved_database_url)
    accounts = Accounts(engine, AuthPolicy(lockout_after=2))
    assert accounts.login("alice", password).identity.role == "trusted"
    assert accounts.login("bob", "bobs long password").identity.role == "rater"
    for _ in range(2):
        accounts.login("bob", "wrong")
    assert "locked until" in run_cli(tmp_path, capsys, "accounts", "list")
    run_cli(tmp_path, capsys, "accounts", "unlock", "bob")
    run_cli(tmp_path, capsys, "accounts", "set", "bob", "trusted")
    assert accounts.login("bob", "bobs long password").identity.role == "trusted"
    run_cli(tmp_path, capsys, "accounts", "disable", "bob")
    assert not accounts.login("bob", "bobs long password").ok
    new = re.search(r"new password: (\S+);", run_cli(tmp_path, capsys, "accounts", "password", "alice")).group(1)
    assert not accounts.login("alice", password).ok and accounts.login("alice", new).ok
    assert main(["--home", str(tmp_path / "home"), "accounts", "create", "alice"]) == 1  # taken: an error, exit 1
    engine.dispose()


def test_selection_marks_trusted_raters_by_their_current_role(engine):
    accounts = Accounts(engine, AuthPolicy(scrypt_log2_n=10))
    accounts.create("alice", "trusted", "a long enough password")
    accounts.create("bob", "rater", "a long enough password")
    with Session(engine) as s, s.begin():
        for i, user in enumerate(("alice", "bob", None)):
            p = add_prediction(s, add_upload(s, tag=f"img{i}"), kind="caption", user=user)
            repo.record_correction(s, request_id=f"c{i}", prediction_id=p.id, field="caption", value=f"caption {i}",
                                   session_id=f"sess-{i}", user=user)

    def trust() -> dict[str, bool]:
        with Session(engine) as s:
            selection = load_feedback(s)
        return {i.user: i.trusted for i in selection.train + selection.heldout}

    assert trust() == {"alice": True, "bob": False, "session:sess-2": False}
    accounts.update("alice", disabled=True)  # a disabled (or demoted) account's unused items lose their trust
    assert trust()["alice"] is False


def test_rater_summary_counts_and_agreement_with_consensus():
    ratings = [{"item": "x", "rater": rater, "coherence": score, "relevance": None, "detail": None}
               for rater, score in (("alice", 4), ("bob", 4), ("carol", 5), ("session:1", 1))]
    votes = [{"image": "m", "rater": r, "label": lab} for r, lab in
             (("alice", "positive"), ("bob", "positive"), ("carol", "positive"), ("session:1", "dark humor"))]
    counts = [{"user": u, "role": role, "disabled": False, "ratings": 1, "corrections": 1, "used": 0, "rejected": 0}
              for u, role in (("alice", "trusted"), ("bob", "rater"), ("(anonymous)", "anonymous"))]
    rows = {r["user"]: r for r in rater_summary(ratings, votes, counts)}
    assert rows["alice"]["score_agreement"] == 1.0 and rows["alice"]["label_agreement"] == 1.0
    assert rows["(anonymous)"]["score_agreement"] == 0.0 and rows["(anonymous)"]["label_agreement"] == 0.0
    assert rows["bob"]["scores_compared"] == 1 and rows["bob"]["role"] == "rater"
