from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.models import ModelVersion


def _register(s: Session, *names: str) -> None:
    for i, name in enumerate(names):
        repo.register_version(s, version=name, path=f"/models/{name}", sha256=f"{i:x}" * 64, metrics={"r@1": 0.1 * i})


def _currents(engine) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(ModelVersion.version).where(ModelVersion.is_current.is_(True))))


def _status(engine) -> dict[str, str]:
    with Session(engine) as s:
        return {v.version: v.status for v in repo.list_versions(s)}


def test_register_is_idempotent_but_refuses_new_weights_under_an_old_name(engine):
    with Session(engine) as s, s.begin():
        first = repo.register_version(s, version="v1", path="/m/v1", sha256="a" * 64)
        assert repo.register_version(s, version="v1", path="/m/v1", sha256="a" * 64).id == first.id
        with pytest.raises(ValueError, match="sha256="):
            repo.register_version(s, version="v1", path="/m/v1", sha256="b" * 64)
        with pytest.raises(ValueError, match="unknown parent_version 'v0'"):
            repo.register_version(s, version="v2", path="/m/v2", sha256="c" * 64, parent_version="v0")
        assert repo.current_version(s) is None and first.status == "candidate"


def test_promote_keeps_exactly_one_current(engine):
    with Session(engine) as s, s.begin():
        _register(s, "v1", "v2", "v3")
    for name in ("v1", "v2", "v3", "v3"):
        with Session(engine) as s, s.begin():
            assert repo.promote(s, name).version == name
        assert _currents(engine) == [name]
    assert _status(engine) == {"v1": "retired", "v2": "retired", "v3": "promoted"}
    with Session(engine) as s:
        assert [v.version for v in repo.list_versions(s)] == ["v3", "v2", "v1"]
        assert repo.current_version(s).promoted_at is not None


def test_rollback_returns_to_the_previous_promoted_version(engine):
    with Session(engine) as s, s.begin():
        _register(s, "v1", "v2", "cand")
        repo.promote(s, "v1")
        repo.promote(s, "v2")
    with Session(engine) as s, s.begin():
        assert repo.rollback_to(s).version == "v1"
    assert _currents(engine) == ["v1"]
    with Session(engine) as s, s.begin():
        assert repo.rollback_to(s, "v2").version == "v2"
    assert _currents(engine) == ["v2"]
    with Session(engine) as s, s.begin():
        with pytest.raises(ValueError, match="'cand' was never promoted"):
            repo.rollback_to(s, "cand")
        with pytest.raises(ValueError, match=r"unknown model version 'v7'; registered: \['v1', 'v2', 'cand'\]"):
            repo.rollback_to(s, "v7")
    assert _currents(engine) == ["v2"]


def test_promotion_is_part_of_the_callers_transaction(engine):
    with Session(engine) as s, s.begin():
        _register(s, "v1", "v2")
        repo.promote(s, "v1")
    with Session(engine) as s:
        with s.begin():
            repo.promote(s, "v2")
            s.rollback()
    assert _currents(engine) == ["v1"]


def test_rejected_versions_are_never_made_current(engine):
    with Session(engine) as s, s.begin():
        _register(s, "v1", "v2")
        repo.promote(s, "v1")
        with pytest.raises(ValueError, match="'v1' is current"):
            repo.reject_version(s, "v1")
        repo.reject_version(s, "v2")
        with pytest.raises(ValueError, match="'v2' was rejected"):
            repo.promote(s, "v2")
    assert _currents(engine) == ["v1"]
