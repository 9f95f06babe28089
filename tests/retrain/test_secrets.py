"""Issue 11 item 1: no secret reaches the disk or the database, and what older versions stored is scrubbed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import init_db, make_engine
from mmapp.config import load_config, redacted
from mmapp.scrub import scrub_home
from retrain.job import run_retrain

from .world import feed_new_concepts, make_config

OPERATOR_PASSWORD = "op-Pa55word-zq81"
DB_PASSWORD = "db-Pa55word-kx27"
DB_URL = f"postgresql+psycopg://mmapp:{DB_PASSWORD}@db.internal:5432/mmapp"


def with_secrets(config):
    return dataclasses.replace(config, app=dataclasses.replace(config.app, operator_user="op",
                                                                operator_password=OPERATOR_PASSWORD),
                               storage=dataclasses.replace(config.storage, database_url=DB_URL))


def files_holding(home: Path, *secrets: str) -> list[str]:
    hits = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path.relative_to(home)}: {s}" for s in secrets if s.encode() in data]
    return hits


def rows_holding(engine, *secrets: str) -> list[str]:
    hits = []
    with engine.connect() as c:
        for table in inspect(engine).get_table_names():
            for row in c.execute(text(f'SELECT * FROM "{table}"')):
                dump = json.dumps([str(v) for v in row])
                hits += [f"{table}: {s}" for s in secrets if s in dump]
    return hits


def test_a_retrain_with_secrets_set_writes_none_to_disk_or_database(home, engine, source):
    config = with_secrets(make_config(home))
    feed_new_concepts(engine, source, 60)
    out = run_retrain(config, engine, features=source)
    assert out.status in ("promoted", "refused"), out.message
    manifest = json.loads(Path(out.stats["manifest_path"]).read_text())
    assert manifest["config"]["app"]["operator_password"] == "***"
    assert manifest["config"]["storage"]["database_url"] == "postgresql+psycopg://mmapp:***@db.internal:5432/mmapp"
    engine.dispose()  # WAL checkpointed into the file, so the grep below reads everything
    assert files_holding(home, OPERATOR_PASSWORD, DB_PASSWORD) == []
    assert rows_holding(engine, OPERATOR_PASSWORD, DB_PASSWORD) == []


def leaky_manifest() -> dict:
    return {"config": {"app": {"operator_password": OPERATOR_PASSWORD, "operator_user": "op"},
                       "storage": {"database_url": DB_URL, "home": "/srv/mmapp"}},
            "stats": {"note": f"connected to {DB_URL}"}, "seed": 0}


def test_migration_0003_scrubs_what_older_versions_stored(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    init_db(engine, revision="0001")
    with Session(engine) as s, s.begin():
        repo.register_version(s, version="r0001", path="/x", sha256="0" * 64, manifest=leaky_manifest(),
                              metrics={"a": 1.0})
        run = repo.start_retrain_run(s, trigger="cli", owner="host:1")
        repo.update_retrain_run(s, run.id, progress=1.0, message="done", stats={"manifest": leaky_manifest()})
    assert rows_holding(engine, OPERATOR_PASSWORD, DB_PASSWORD)
    init_db(engine)  # -> head, through 0003
    assert rows_holding(engine, OPERATOR_PASSWORD, DB_PASSWORD) == []
    with engine.connect() as c:
        manifest = json.loads(c.execute(text("SELECT manifest FROM model_versions")).scalar_one())
    assert manifest["config"]["app"] == {"operator_password": "***", "operator_user": "op"}
    assert manifest["config"]["storage"]["home"] == "/srv/mmapp" and manifest["seed"] == 0  # the rest is kept
    engine.dispose()


def test_scrub_home_masks_old_files_and_is_idempotent(tmp_path):
    config = load_config("offline", env={}, storage={"home": str(tmp_path), "database_url": DB_URL},
                         app={"operator_password": OPERATOR_PASSWORD})
    meta = tmp_path / "models" / "r0001" / "meta.json"
    run = tmp_path / "retrain" / "runs" / "0001" / "manifest.json"
    clean = tmp_path / "models" / "bootstrap" / "meta.json"
    for path, data in ((meta, {"manifest": leaky_manifest(), "labels": ["a"]}), (run, leaky_manifest()),
                       (clean, {"config": redacted(config)})):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(data))
    before = clean.stat().st_mtime_ns
    assert sorted(scrub_home(config)) == sorted([meta, run])
    assert files_holding(tmp_path, OPERATOR_PASSWORD, DB_PASSWORD) == []
    assert json.loads(meta.read_text())["labels"] == ["a"]
    assert clean.stat().st_mtime_ns == before  # a clean file is not rewritten
    assert scrub_home(config) == []  # idempotent
