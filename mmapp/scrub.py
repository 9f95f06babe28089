"""Remove secrets that older versions wrote into JSON files under ``MMAPP_HOME`` (issue 11, item 1).

Before config was serialised only through :func:`mmapp.config.redacted`, a retrain wrote the whole
config (operator password, database URL with its password) into ``retrain/runs/NNNN/manifest.json``
and the version's ``meta.json``. :func:`scrub_home` rewrites those files with the secrets masked; the
app and the ``retrain`` CLI call it at start. Idempotent: a clean file is not rewritten. The database
side is migration ``0003`` (``feedback_db/migrations/versions/0003_scrub_secrets.py``). No DB here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from mmapp.config import Config, redact_url
from mmapp.model_store import write_text_atomic

log = logging.getLogger(__name__)

MASK = "***"
SECRET_KEYS = frozenset({"operator_password", "password", "secret", "token"})  # values masked wherever found
URL_KEYS = frozenset({"database_url", "url"})  # values kept with their password masked
SCRUBBED_GLOBS = ("models/*/meta.json", "models/.*/meta.json", "retrain/runs/*/manifest.json", "reports/*/*.json")


def scrub_secrets(value: Any, *, literals: Iterable[str] = ()) -> Any:
    """``value`` (JSON data) with secret-named keys masked, URL passwords masked, and each of ``literals``
    (the live secrets) replaced by ``***`` inside any string."""
    literals = tuple(s for s in literals if s and len(s) >= 4)  # a 1-3 char "secret" would mangle every string

    def walk(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: walk(item, str(k).lower()) for k, item in v.items()}
        if isinstance(v, list):
            return [walk(item) for item in v]
        if isinstance(v, str):
            if key in SECRET_KEYS and v:
                return MASK
            v = redact_url(v)
            for secret in literals:
                v = v.replace(secret, MASK)
        return v

    return walk(value)


def live_secrets(config: Config) -> tuple[str, ...]:
    """The secret strings of the running config: the operator password and the database password."""
    found = [config.app.operator_password]
    url = config.storage.database_url
    if "://" in url and "@" in url.split("://", 1)[1]:
        userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    return tuple(s for s in found if s)


def scrub_file(path: Path, *, literals: Iterable[str] = ()) -> bool:
    """Rewrite one JSON file with secrets masked (atomically); True when it changed."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot scrub %s: %s", path, exc)
        return False
    clean = scrub_secrets(raw, literals=literals)
    if clean == raw:
        return False
    write_text_atomic(path, json.dumps(clean, indent=2, default=str))
    return True


def scrub_home(config: Config) -> list[Path]:
    """Scrub every manifest and ``meta.json`` under ``config.storage.home``; returns the files rewritten."""
    home = config.paths.home
    literals = live_secrets(config)
    changed = []
    for pattern in SCRUBBED_GLOBS:
        for path in sorted(home.glob(pattern)):
            if path.is_file() and scrub_file(path, literals=literals):
                changed.append(path)
    if changed:
        log.warning("masked secrets in %d file(s) under %s written by an older version", len(changed), home)
    return changed
