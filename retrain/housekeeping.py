"""Retention jobs every process runs on its scheduler (``scheduler.housekeeping_s``): export zips and
report copies expire, image files of uploads nobody rated or corrected are deleted after
``app.unrated_upload_retention_days``, the login log's rows after ``auth.login_attempts_keep_days``.
Idempotent; safe from several processes at once. Gradio's own upload temp folder is bounded by
``delete_cache`` in ``app.build_app`` (and the upload limits in ``guard``).
"""
from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.blobstore import BlobStore
from feedback_db.engine import read_only_engine, retry_on_busy

log = logging.getLogger(__name__)


def expire_exports(exports_dir: Path, ttl_s: float, *, now: Optional[float] = None) -> list[Path]:
    """Delete what sits directly in ``exports_dir`` (one random folder or zip per export/report link)
    and is older than ``ttl_s``: its link stops working. Returns what was deleted."""
    now = time.time() if now is None else now
    removed = []
    if not exports_dir.is_dir():
        return removed
    for entry in exports_dir.iterdir():
        try:
            if now - entry.lstat().st_mtime < ttl_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another process got there first
            continue
    if removed:
        log.info("expired %d export/report link(s) older than %.0f s", len(removed), ttl_s)
    return removed


def purge_unrated_uploads(engine: Engine, blobstore: BlobStore, retention_days: float, *,
                          now: Optional[datetime] = None) -> list[str]:
    """Delete the image files of uploads that nobody rated or corrected and that no prediction of the last
    ``retention_days`` shows. The rows stay (hash, size, the prediction log); an export lists such a
    prediction without an image.

    Each file is deleted inside a write transaction that locks its upload row and checks again, so a
    picture uploaded again while the job runs keeps its file: its new prediction either commits first
    (and the check sees it) or waits for the deletion (and ``AppServices.store_prediction`` writes the
    bytes back after its commit)."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=retention_days)

    def read() -> list[tuple[str, str]]:
        with Session(read_only_engine(engine)) as s, s.begin():
            return repo.unrated_uploads(s, before=cutoff)

    def delete_one(sha256: str) -> bool:
        with Session(engine) as s, s.begin():
            relpath = repo.lock_upload(s, sha256)
            if relpath is None or not repo.unrated_uploads(s, before=cutoff, sha256=sha256):
                return False  # a new prediction or a rating since the list was read
            blobstore.path(relpath).unlink()
            return True

    deleted = []
    for sha256, relpath in retry_on_busy(read):
        try:
            if retry_on_busy(lambda: delete_one(sha256)):
                deleted.append(sha256)
        except FileNotFoundError:
            continue
        except ValueError:  # a relpath the blob store would not produce: leave it alone
            log.warning("upload %s has an unexpected relpath %r; not deleted", sha256, relpath)
    if deleted:
        log.info("deleted %d unrated upload(s) older than %g days", len(deleted), retention_days)
    return deleted


def purge_login_attempts(engine: Engine, keep_days: float, *, now: Optional[datetime] = None,
                         batch: int = 10_000) -> int:
    """Delete login-log rows older than ``keep_days`` (0: keep all), in short batches; returns how many.
    A guessing script adds a row per guess: without this the table only grows."""
    if keep_days <= 0:
        return 0
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=keep_days)

    def delete_batch() -> int:
        with Session(engine) as s, s.begin():
            return repo.delete_login_attempts(s, before=cutoff, limit=batch)

    deleted = 0
    while True:
        n = retry_on_busy(delete_batch)
        deleted += n
        if n < batch:
            break
    if deleted:
        log.info("deleted %d login attempt(s) older than %g days", deleted, keep_days)
    return deleted


def run_housekeeping(config, engine: Engine, blobstore: Optional[BlobStore] = None) -> dict[str, int]:
    """All retention jobs once; what the scheduler runs every ``scheduler.housekeeping_s``."""
    blobstore = blobstore or BlobStore(config.paths.uploads)
    exports = expire_exports(config.paths.exports, config.app.export_ttl_s)
    uploads = purge_unrated_uploads(engine, blobstore, config.app.unrated_upload_retention_days)
    logins = purge_login_attempts(engine, config.auth.login_attempts_keep_days)
    return {"exports_expired": len(exports), "uploads_deleted": len(uploads), "login_attempts_deleted": logins}
