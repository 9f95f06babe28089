"""The one authority for the current model version: the database registry. Promotion, rollback, adoption.

Every way a version becomes current goes through here: a retrain's promotion, the operator's
rollback, ``python -m mmapp build-bootstrap`` and ``train-alignment --make-current``
(:func:`promote_saved_version`), and the app's first start. Readers ask the registry
(:func:`current_version_name`); ``current.json`` in the model folder is derived from it (written
here only) for tools that have no database.

Order that keeps every crash harmless:
1. the version folder is written atomically (temp folder, fsync, rename) by ``ModelStore.save``;
2. ONE database transaction registers the version, marks it current (the old one retired), runs
   the caller's bookkeeping (corrections used, run finished) and, just before commit, points
   ``current.json`` at it. A failure anywhere rolls the transaction back and points the file at
   the database's current version again. The database is authoritative; the app reloads from it.
A folder written by a run that died before step 2 is never registered, so it is never served.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from mmapp.model_store import ModelStore, read_meta

log = logging.getLogger(__name__)


def current_version_name(engine: Engine) -> Optional[str]:
    """The registry's current version (what the app should serve), or None."""
    def read() -> Optional[str]:
        with Session(engine) as s, s.begin():
            row = repo.current_version(s)
            return row.version if row is not None else None
    return retry_on_busy(read)


def registry_sha256(engine: Engine, version: str) -> Optional[str]:
    """The weights sha256 the registry recorded for ``version`` (None: not registered)."""
    def read() -> Optional[str]:
        with Session(engine) as s, s.begin():
            row = repo.get_version(s, version)
            return row.sha256 if row is not None else None
    return retry_on_busy(read)


def fallback_versions(engine: Engine) -> list[str]:
    """Versions a server may serve when the current one cannot be loaded: promoted once, not rejected,
    not current; most recently promoted first. Reading this changes nothing: the registry's current
    version stays what it is (an operator rolls back to make a fallback current)."""
    def read() -> list[str]:
        with Session(engine) as s, s.begin():
            rows = [v for v in repo.list_versions(s) if v.promoted_at is not None and not v.is_current
                    and v.status != "rejected"]
            return [v.version for v in sorted(rows, key=lambda v: v.promoted_at, reverse=True)]
    return retry_on_busy(read)


def sync_pointer(engine: Engine, store: ModelStore) -> Optional[str]:
    """Point ``current.json`` at the registry's current version (after a failed promotion)."""
    name = current_version_name(engine)
    if name is not None and store.exists(name) and store.current() != name:
        store.set_current(name)
    return name


def adopt_store_current(engine: Engine, store: ModelStore) -> Optional[str]:
    """Register the version ``current.json`` names when the registry has no current one yet (the
    bootstrap model is built on disk before any database exists; the app adopts what it starts with).
    Metrics, encoders and code version come from the version's meta. Idempotent; returns the current name."""
    def adopt() -> Optional[str]:
        with Session(engine) as s, s.begin():
            row = repo.current_version(s)
            if row is not None:
                return row.version
            name = store.current()
            if name is None or not store.exists(name):
                return None
            meta = read_meta(store.path(name))
            manifest = {"adopted_from": str(store.path(name)), "encoders": meta.encoders,
                        "code_version": meta.code_version}
            repo.register_version(s, version=name, path=str(store.path(name)), sha256=store.weights_sha256(name),
                                  manifest=manifest, metrics=meta.metrics)
            s.flush()
            repo.promote(s, name)
            return name
    return retry_on_busy(adopt)


def _registration(store: ModelStore, version: str, *, parent_version: Optional[str], metrics: dict[str, Any],
                  manifest: dict[str, Any], report_path: Optional[str] = None) -> Callable[[Session], None]:
    """What registers a saved ``version`` (its weights hashed once, outside the transaction)."""
    if not store.exists(version):
        raise FileNotFoundError(f"model version {version!r} is not saved under {store.root}")
    sha = store.weights_sha256(version)

    def register(s: Session) -> None:
        repo.register_version(s, version=version, path=str(store.path(version)), sha256=sha,
                              parent_version=parent_version, metrics=metrics, manifest=manifest,
                              report_path=report_path)
        s.flush()
    return register


def promote_version(engine: Engine, store: ModelStore, *, version: str, parent_version: Optional[str],
                    metrics: dict[str, Any], manifest: dict[str, Any], report_path: Optional[str] = None,
                    in_transaction: Callable[[Session], None] = lambda s: None) -> None:
    """Register ``version`` (already saved in ``store``) and make it current, atomically with
    ``in_transaction(session)`` and the pointer file."""
    register = _registration(store, version, parent_version=parent_version, metrics=metrics, manifest=manifest,
                             report_path=report_path)

    def commit() -> None:
        with Session(engine) as s, s.begin():
            register(s)
            repo.promote(s, version)
            in_transaction(s)
            s.flush()
            store.set_current(version)  # last step before COMMIT: a failure above leaves the file alone

    try:
        retry_on_busy(commit)
    except BaseException:
        try:
            sync_pointer(engine, store)
        except Exception:  # the original error matters more; the app reads the database anyway
            log.exception("could not re-point current.json after a failed promotion of %s", version)
        raise


def hold_version(engine: Engine, store: ModelStore, *, version: str, parent_version: Optional[str],
                 metrics: dict[str, Any], manifest: dict[str, Any],
                 in_transaction: Callable[[Session], None] = lambda s: None) -> None:
    """Register ``version`` (already saved in ``store``) as a candidate that is NOT current, atomically with
    ``in_transaction(session)``: a candidate held for blind evaluation (:func:`retrain.blind.decide_held`
    later promotes it with :func:`promote_version` or rejects it). The pointer file is not touched."""
    register = _registration(store, version, parent_version=parent_version, metrics=metrics, manifest=manifest)

    def commit() -> None:
        with Session(engine) as s, s.begin():
            register(s)
            in_transaction(s)
    retry_on_busy(commit)


def promote_saved_version(config, version: str, *, reason: str, engine: Optional[Engine] = None) -> str:
    """Make a version that is already saved (bootstrap, ``train-alignment``) current through the same
    registry transaction a retrain uses; a running app serves it after its next reload poll.
    Opens (and migrates) the configured database unless ``engine`` is given. Returns the current name."""
    from feedback_db.engine import init_db, make_engine

    store = ModelStore(config.paths.models)
    own = engine is None
    engine = engine or make_engine(config.storage.resolved_database_url)
    try:
        if own:
            init_db(engine)
        adopt_store_current(engine, store)  # an install that predates the registry keeps its history
        if current_version_name(engine) == version:
            return version
        meta = read_meta(store.path(version))
        promote_version(engine, store, version=version, parent_version=current_version_name(engine),
                        metrics=meta.metrics, manifest={"promoted_by": reason, "encoders": meta.encoders,
                                                        "code_version": meta.code_version})
        return version
    finally:
        if own:
            engine.dispose()


def rollback_version(engine: Engine, store: ModelStore, version: Optional[str] = None) -> str:
    """Make an earlier promoted version current again (default: the previous one); returns its name."""
    def commit() -> str:
        with Session(engine) as s, s.begin():
            row = repo.rollback_to(s, version)
            if not store.exists(row.version):
                raise FileNotFoundError(f"cannot roll back to {row.version!r}: its folder is missing under {store.root}")
            s.flush()
            store.set_current(row.version)
            return row.version

    try:
        return retry_on_busy(commit)
    except BaseException:
        try:
            sync_pointer(engine, store)
        except Exception:
            log.exception("could not re-point current.json after a failed rollback")
        raise
