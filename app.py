"""The web app: composition root (``main``) and the Gradio page it serves.

``main()`` reads the config, opens the feedback database and the upload store, builds the
predictor (and the bootstrap model on a fresh machine), starts the retrain worker (a child process that
runs the scheduler and operators' requests; ``retrain.runner: in-process`` keeps both in this process), builds the
page with :func:`build_app` and launches it. Importing this module does nothing but define things: tests call
``build_app(config, predictor, engine, blobstore)`` and launch it in-process.

Layout of this file: services the handlers use (no Gradio), then per tab its handlers (plain
functions: values in, ``{output name: value}`` out, callable without Gradio running) and one
``build_*`` function (components + events), then launch options and ``main``.
"""
from __future__ import annotations

if __name__ == "__main__":  # fresh machine: install what is missing before the imports below need it
    from mmapp.environment import ensure_installed

    ensure_installed()

import argparse
import functools
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote

import gradio as gr
import pandas as pd
from fastapi import FastAPI, File, Form, Request as FastRequest, UploadFile
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field as PydanticField
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.middleware import Middleware

from feedback_db.accounts import Accounts, AuthPolicy, Identity, generate_password
from feedback_db.blobstore import BlobStore
from feedback_db.engine import init_db, make_engine, read_only_engine, retry_on_busy
from feedback_db.export import EXPORT_FORMATS, export_feedback
from feedback_db import repository as repo
from mmapp.config import Config, load_config
from mmapp.filelock import exclusive_file_lock
from mmapp.imageio import DecodedImage, ImageDecodeError, ImageLimits, load_image, strip_metadata
from mmapp.model_store import BRIDGE, ModelIntegrityError, ModelStore
from mmapp.predictor import CaptionResult, MemeResult, Predictor
from mmapp.scrub import scrub_home
from mmapp.towers import Towers
from retrain import api as retrain_api
from retrain.features import FeatureSource, TowerFeatureSource
from retrain.housekeeping import expire_exports, run_housekeeping
from retrain.promotion import (adopt_store_current, current_version_name, fallback_versions, promote_saved_version,
                               registry_sha256)
from retrain.scheduler import RetrainScheduler, start_scheduler
from retrain.worker import WorkerSupervisor, check_runner, worker_argv

log = logging.getLogger("mmapp.app")

MODEL_EVENTS = "model"  # concurrency_id shared by every event that runs the towers
FEEDBACK_EVENTS = "feedback"  # concurrency_id of the database writes
FEEDBACK_CONCURRENCY = 8  # SQLite serialises writers itself (BEGIN IMMEDIATE + busy timeout)
BOOTSTRAP_LOCK_FILE = ".bootstrap.lock"  # under the models folder: one replica builds the first model
RELOAD_POLL_S = 5.0  # the registry's current version is read at most this often
RETRAIN_POLL_S = 3.0  # the operator's retrain status refreshes this often while they are logged in
RETRAIN_EVENTS = "retrain"  # concurrency_id of the operator's retrain actions (trigger, rollback)
PREVIEW_SIDE = 640  # longest side of the image shown back to the user
EXPORT_LABELS = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSONL", "hf": "Hugging Face datasets"}
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,96}")
SESSION_COOKIE = "mmapp_session"  # the server-issued login token (HttpOnly, SameSite=Strict); never in gr.State
ROLE_NAMES = {"operator": "operator", "trusted": "trusted annotator", "rater": "rater"}


# ---- per-client limits and the free-disk watermark -----------------------------------------------
# A client is a keyed hash (HMAC-SHA256 with a random per-process key) of its address: the address itself
# is never kept, the hashes live in memory only and mean nothing after a restart. ``ClientLimitMiddleware``
# is ASGI middleware in front of Gradio's routes: uploads (``POST /gradio_api/upload``) and API calls
# (queue joins, ``/run``, ``/call``) each draw from a token bucket per client, uploads also from a rolling
# daily quota; over a limit the answer is HTTP 429 with ``Retry-After``. Below the free-disk watermark
# uploads get HTTP 507 while every other call (ratings, corrections) goes on. No model, no database here.
_guard_log = logging.getLogger("mmapp.guard")

UPLOADS, EVENTS = "uploads", "events"
DAY_S = 86_400.0
_EVENT_SUFFIXES = ("/queue/join",)
_EVENT_PREFIXES = ("/gradio_api/run/", "/gradio_api/call/", "/run/", "/call/")


@dataclass(frozen=True)
class Budget:
    per_minute: float  # refill rate
    burst: int  # bucket size
    per_day: int = 0  # rolling 24 h quota; 0 = none

    def __post_init__(self) -> None:
        if not self.per_minute > 0 or self.burst < 1 or self.per_day < 0:
            raise ValueError(f"a budget needs per_minute > 0, burst >= 1, per_day >= 0, got {self}")


@dataclass
class _Bucket:
    tokens: float
    updated: float
    day_start: float
    day_count: int = 0


class ClientLimiter:
    """Token buckets per (client hash, kind), in memory, least recently seen evicted past ``max_clients``."""

    def __init__(self, budgets: dict[str, Budget], *, trusted_proxies: Iterable[str] = (), max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.budgets = dict(budgets)
        self.trusted_proxies = frozenset(trusted_proxies)
        self.max_clients = max_clients
        self.clock = clock
        self._key = secrets.token_bytes(32)  # never stored: hashes are unlinkable across restarts
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def client_id(self, address: str | None, forwarded_for: str | None = None) -> str:
        """The keyed hash of the client's address; ``X-Forwarded-For`` counts only from a trusted proxy
        (its rightmost entry: the address that proxy saw)."""
        address = address or "unknown"
        if forwarded_for and address in self.trusted_proxies:
            address = forwarded_for.split(",")[-1].strip() or address
        return hmac.new(self._key, address.encode(), "sha256").hexdigest()[:32]

    def check(self, client: str, kind: str) -> str | None:
        """Take one token; None when allowed, else why not (with the wait), safe to show the client."""
        budget = self.budgets[kind]
        now = self.clock()
        with self._lock:
            bucket = self._buckets.pop((client, kind), None) or _Bucket(float(budget.burst), now, now)
            self._buckets[(client, kind)] = bucket  # most recently seen last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            bucket.tokens = min(float(budget.burst), bucket.tokens + (now - bucket.updated) * budget.per_minute / 60.0)
            bucket.updated = now
            if now - bucket.day_start >= DAY_S:
                bucket.day_start, bucket.day_count = now, 0
            if budget.per_day and bucket.day_count >= budget.per_day:
                wait = DAY_S - (now - bucket.day_start)
                return f"daily limit of {budget.per_day} {kind} reached; try again in {wait / 3600:.1f} h"
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) * 60.0 / budget.per_minute
                return f"too many {kind}: the limit is {budget.per_minute:g} per minute; try again in {wait:.0f} s"
            bucket.tokens -= 1.0
            bucket.day_count += 1
            return None


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class DiskGuard:
    """Refuses new uploads while any of ``paths`` has less than ``min_free_bytes`` free."""

    def __init__(self, paths: Sequence[Path], min_free_bytes: int, *,
                 free_space: Callable[[Path], int] = free_bytes):
        self.paths = [Path(p) for p in paths]
        self.min_free_bytes = min_free_bytes
        self.free_space = free_space

    def refusal(self) -> str | None:
        """None while there is room; else the message to show (safe for users)."""
        for path in self.paths:
            free = self.free_space(path)
            if free < self.min_free_bytes:
                _guard_log.warning("free disk space %.0f MB under %s is below the %.0f MB watermark: refusing uploads",
                            free / 2**20, path, self.min_free_bytes / 2**20)
                return ("The server is low on disk space, so it cannot take new images right now. "
                        "Ratings and corrections of results you already have are still saved.")
        return None


def gradio_temp_dir() -> Path:
    """Where Gradio writes ``/gradio_api/upload`` files (``GRADIO_TEMP_DIR``)."""
    import tempfile

    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


@dataclass
class ClientGuard:
    limiter: ClientLimiter
    disk: DiskGuard

    @classmethod
    def from_config(cls, config, *, free_space: Callable[[Path], int] = free_bytes) -> "ClientGuard":
        app = config.app
        budgets = {UPLOADS: Budget(app.uploads_per_minute, app.upload_burst, app.uploads_per_day),
                   EVENTS: Budget(app.events_per_minute, app.event_burst)}
        disk = DiskGuard([config.paths.home, gradio_temp_dir()], app.min_free_disk_mb * 2**20, free_space=free_space)
        return cls(ClientLimiter(budgets, trusted_proxies=app.trusted_proxies), disk)


def request_kind(method: str, path: str) -> str | None:
    if method != "POST":
        return None
    if path.endswith("/gradio_api/upload") or path == "/upload" or path in API_UPLOAD_PATHS:
        return UPLOADS
    if path in API_EVENT_PATHS:
        return EVENTS
    if path.endswith(_EVENT_SUFFIXES) or any(prefix in path for prefix in _EVENT_PREFIXES):
        return EVENTS
    return None


class ClientLimitMiddleware:
    """ASGI middleware applying a :class:`ClientGuard` (pass it as ``guard=``)."""

    def __init__(self, app, guard: ClientGuard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send):
        kind = request_kind(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None:
            return await self.app(scope, receive, send)
        if kind == UPLOADS:
            refusal = self.guard.disk.refusal()
            if refusal is not None:
                return await _plain(send, 507, refusal)
        headers = dict(scope.get("headers") or [])
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1") or None
        client = scope.get("client")
        who = self.guard.limiter.client_id(client[0] if client else None, forwarded)
        refusal = self.guard.limiter.check(who, kind)
        if refusal is not None:
            return await _plain(send, 429, refusal, retry_after=True)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """ASGI middleware refusing (413) a request whose declared Content-Length is over the upload limit plus
    ``slack_bytes`` (the multipart framing and form fields), before its body is parsed and spooled. Plain
    ASGI: Starlette's ``@app.middleware("http")`` wraps every request in extra streams and tasks, which
    cost the REST API measurable throughput under load."""

    def __init__(self, app, limit_bytes: int, slack_bytes: int = 64 * 1024):
        self.app = app
        self.limit_bytes = limit_bytes
        self.slack_bytes = slack_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit_bytes + self.slack_bytes:
                return await _plain(send, 413, f"the request is {int(declared) / 2**20:.1f} MB; the upload limit "
                                               f"is {self.limit_bytes / 2**20:g} MB")
        return await self.app(scope, receive, send)


async def _plain(send, status: int, message: str, *, retry_after: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"60"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UserInputError(ValueError):
    """A problem the user can fix; shown in the page as a ``gr.Error`` with this message."""


# ---- services: what the handlers call (no Gradio here) ------------------------------------------

class ModelWatcher:
    """Follows the registry's current model version and hot-swaps the predictor when it changes.

    ``maybe_reload()`` runs before each model request; it reads the database at most every
    ``interval_s`` seconds, and only one request at a time does the check (the others go on with
    the model they have). Every load is verified against the sha256 the registry recorded. A version
    that fails to load is logged and the old one keeps serving; it is tried again as soon as its files
    or its registry row change (a fixed copy, a re-promotion), not on every request. When the current
    version cannot be loaded (at start or later) the server serves the most recently promoted good
    version instead, says so in the log and on the operator page (``notice``), and leaves the
    registry as it is: the registry stays the one authority for what is current.
    """

    def __init__(self, predictor: Predictor, engine: Engine, *, interval_s: float = RELOAD_POLL_S,
                 on_reload: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.predictor = predictor
        self.engine = read_only_engine(engine)
        self.interval_s = interval_s
        self.on_reload = on_reload
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self.failed: dict[str, tuple] = {}  # version -> fingerprint of its files and registry row when it failed
        self.failure_reasons: dict[str, str] = {}
        self.notice: str | None = None  # set while serving something other than the registry's current version

    def wanted_version(self) -> str | None:
        with Session(self.engine) as s, s.begin():
            row = repo.current_version(s)
            return row.version if row is not None else None

    def fingerprint(self, version: str) -> tuple:
        """What must change before a failed version is tried again: its registry sha256 and its files."""
        folder = self.predictor.store.path(version)
        stats = []
        for name in ("weights.safetensors", "meta.json"):
            try:
                st = (folder / name).stat()
                stats.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                stats.append(None)
        return (registry_sha256(self.engine, version), *stats)

    def try_load(self, version: str) -> bool:
        """Load ``version`` verified against the registry's sha256; False (logged once) when it fails."""
        fingerprint = self.fingerprint(version)
        if self.failed.get(version) == fingerprint:
            return False  # failed before, and nothing about it changed since
        started = time.perf_counter()
        try:
            if fingerprint[0] is None:
                raise ModelIntegrityError(f"model version {version!r} is not in the registry")
            self.predictor.load_version(version, expected_sha256=fingerprint[0])
        except Exception as exc:
            self.failed[version] = fingerprint
            self.failure_reasons[version] = f"{type(exc).__name__}: {exc}"
            log.error("could not load model version %r (%s); still serving %r", version, self.failure_reasons[version],
                      self.predictor.version)
            return False
        self.failed.pop(version, None)
        self.failure_reasons.pop(version, None)
        log.info("now serving model version %r (sha256 verified, loaded in %.1f s)", version,
                 time.perf_counter() - started)
        return True

    def serve_best(self) -> str | None:
        """The registry's current version, else the most recently promoted version that loads; None if none does."""
        wanted = self.wanted_version()
        served = None
        for version in dict.fromkeys(v for v in (wanted, *fallback_versions(self.engine)) if v is not None):
            if self.try_load(version):
                served = version
                break
        self._note(wanted)
        return served

    def _note(self, wanted: str | None) -> None:
        served = self.predictor.version
        if wanted is None or served == wanted:
            notice = None
        else:
            notice = (f"serving {served!r}, not the registry's current version {wanted!r}, which failed to load "
                      f"({self.failure_reasons.get(wanted, 'not loaded')}); fix its files (it is retried when they "
                      f"change) or roll back")
        if notice != self.notice and notice is not None:
            log.warning("model fallback: %s", notice)
        self.notice = notice

    def maybe_reload(self) -> None:
        if self.clock() - self._checked_at < self.interval_s or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked_at = self.clock()
            wanted = self.wanted_version()
            if wanted is not None and wanted != self.predictor.version and self.try_load(wanted):
                if self.on_reload is not None:
                    self.on_reload(wanted)
            self._note(wanted)
        except Exception:  # a database hiccup must not fail the user's request
            log.exception("model version check failed")
        finally:
            self._lock.release()


@dataclass
class StoredPrediction:
    prediction_id: int
    request_id: str
    relpath: str
    db_ms: float
    session_id: str = ""


@dataclass(frozen=True)
class Captioned:
    """A stored caption prediction: what the model said, where it is stored, what it took."""

    result: CaptionResult
    stored: StoredPrediction
    decoded: DecodedImage
    latency_ms: float
    stage_ms: dict[str, float]


@dataclass(frozen=True)
class Analysed:
    """A stored meme prediction; ``ocr_text`` is what OCR read (kept across re-analyses)."""

    result: MemeResult
    stored: StoredPrediction
    decoded: DecodedImage
    latency_ms: float
    stage_ms: dict[str, float]
    ocr_text: str


@dataclass
class AppServices:
    """Everything the handlers need, injected once by :func:`build_app`."""

    config: Config
    predictor: Predictor
    engine: Engine
    blobstore: BlobStore
    watcher: ModelWatcher
    exports_dir: Path
    scheduler: RetrainScheduler | None = None  # this process' retrain scheduler; None in tests
    retrain_features: Callable[[], FeatureSource] | None = None  # None: the predictor's own towers
    guard: ClientGuard | None = None  # per-client limits and the disk watermark; None: from config
    limits: ImageLimits = field(init=False)
    accounts: Accounts = field(init=False)
    model_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.limits = image_limits(self.config)
        # decoding + the towers (CPU and memory bound) run this many at once, for page events and API calls
        # together; storing the result (disk and database waits) happens outside, so a slot never idles on fsync
        self.model_slots = threading.BoundedSemaphore(model_concurrency(self))
        if self.guard is None:
            self.guard = ClientGuard.from_config(self.config)
        self.read_engine = read_only_engine(self.engine)
        self.accounts = Accounts(self.engine, AuthPolicy.from_config(self.config.auth))
        if operator_credentials_configured(self.config):  # MMAPP_OPERATOR_USER/PASSWORD stay the way in
            self.accounts.ensure_operator(self.config.app.operator_user, self.config.app.operator_password)
        if self.retrain_features is None:  # reuse the loaded towers: a retrain never loads a second set
            self.retrain_features = functools.partial(TowerFeatureSource, self.predictor.towers, self.config)

    # -- who is asking: decided by the server from the login cookie, never by a client-chosen field --
    def identity(self, request: Any) -> Identity | None:
        cookies = (getattr(request, "cookies", None) or {}) if request is not None else {}
        return self.accounts.identity(cookies.get(SESSION_COOKIE))

    def with_user(self, session_data: dict, request: Any) -> dict:
        """``session_data`` with ``user`` = the logged-in account's name (None when anonymous)."""
        who = self.identity(request)
        return {**session_data, "user": who.name if who is not None else None}

    def login_enabled(self) -> bool:
        return operator_credentials_configured(self.config) or bool(self.accounts.list_accounts())

    # -- inputs --
    def decode_upload(self, upload: str | os.PathLike | bytes, *, name: str | None = None) -> DecodedImage:
        """An uploaded file (its path, or its bytes from the REST API) decoded under the upload limits."""
        refusal = self.guard.disk.refusal()  # below the watermark: no new image is stored, feedback still is
        if refusal is not None:
            raise UserInputError(refusal)
        if isinstance(upload, (str, os.PathLike)):
            upload, name = Path(upload), name or Path(upload).name
        try:
            return load_image(upload, limits=self.limits, name=name or "upload", strip_metadata=True)
        except ImageDecodeError as exc:
            raise UserInputError(str(exc)) from exc

    def decode_stored(self, relpath: str) -> DecodedImage:
        path = self.blobstore.path(relpath)
        if not path.is_file():  # retention deleted an image nobody rated (app.unrated_upload_retention_days)
            raise UserInputError("This image is no longer stored (images nobody rated are deleted after "
                                 f"{self.config.app.unrated_upload_retention_days:g} days). Please upload it again.")
        return load_image(path, limits=self.limits, name=relpath)

    def check_text(self, text: str | None, what: str) -> str:
        text = text or ""
        if len(text) > self.config.app.max_text_chars:
            raise UserInputError(f"The {what} is {len(text):,} characters long; the limit is "
                                 f"{self.config.app.max_text_chars:,}. Please shorten it.")
        return text

    # -- writes --
    def store_prediction(self, decoded: DecodedImage, *, request_id: str, kind: str, outputs: dict[str, Any],
                         latency_ms: float, stage_ms: dict[str, float], embedding_ref: str, model_version: str,
                         session: dict, input_text: str | None = None, ablation: str | None = None) -> StoredPrediction:
        """Copy the upload into the blob store, then write its upload and prediction rows in one transaction."""
        started = time.perf_counter()
        ext = _FORMAT_EXT.get(decoded.format, decoded.format.lower())
        sha256, relpath = self.blobstore.put(decoded.data, ext)
        width, height = decoded.original_size

        def transaction() -> int:
            with Session(self.engine) as s, s.begin():
                repo.record_upload(s, sha256=sha256, relpath=relpath, format=ext,
                                   width=width, height=height, n_bytes=len(decoded.data))
                row = repo.record_prediction(
                    s, request_id=request_id, kind=kind, image_sha256=sha256, model_version=model_version,
                    outputs=outputs, latency_ms=latency_ms, session_id=session["session_id"],
                    user=session.get("user"), input_text=input_text, ablation=ablation,
                    stage_ms=stage_ms, embedding_ref=embedding_ref[:255])
                return row.id

        try:
            prediction_id = retry_on_busy(transaction)
        except ValueError as exc:  # a request id reused for another image, and similar client mistakes
            raise UserInputError(str(exc)) from exc
        if not self.blobstore.exists(relpath):  # the retention job deleted an old copy between put and commit
            self.blobstore.put(decoded.data, ext)
        return StoredPrediction(prediction_id, request_id, relpath, (time.perf_counter() - started) * 1e3,
                                session["session_id"])

    # -- model requests: the page's handlers and the REST API both call these --
    def caption(self, upload: str | os.PathLike | bytes, *, request_id: str | None, session: dict,
                name: str | None = None) -> "Captioned":
        """Decode an upload, caption it and store the prediction (``session`` carries ``user``)."""
        self.watcher.maybe_reload()
        request_id = request_id_or_new(request_id)
        with self.model_slots:
            started = time.perf_counter()  # server time from here: the wait for a slot is not the model's
            decoded = self.decode_upload(upload, name=name)
            decode_ms = (time.perf_counter() - started) * 1e3
            result = self.predictor.caption(decoded)
        latency_ms = (time.perf_counter() - started) * 1e3
        stage_ms = {"decode": decode_ms, **result.timings_ms}
        stored = self.store_prediction(
            decoded, request_id=request_id, kind="caption", latency_ms=latency_ms, stage_ms=stage_ms,
            outputs={"caption": result.caption, "alternatives": result.alternatives, "confidence": result.confidence,
                     "low_confidence": result.low_confidence, "source": result.source},
            embedding_ref=result.embedding_ref, model_version=result.model_version, session=session)
        return Captioned(result, stored, decoded, latency_ms, {**stage_ms, "db": stored.db_ms})

    def analyze_meme(self, upload: str | os.PathLike | bytes, *, ablate: str | None, request_id: str | None,
                     session: dict, text: str | None = None, name: str | None = None) -> "Analysed":
        """Decode an uploaded meme, read its text with OCR (unless ``text`` is given), analyse it under
        ``ablate`` and store the prediction."""
        self.watcher.maybe_reload()
        model_ready_for_memes(self.predictor)
        request_id = request_id_or_new(request_id)
        with self.model_slots:
            started = time.perf_counter()  # server time from here: the wait for a slot is not the model's
            decoded = self.decode_upload(upload, name=name)
            decode_ms = (time.perf_counter() - started) * 1e3
            no_text = text is None and ablate == "image" and not self.predictor.read_text(decoded).strip()  # OCR is cached
        if no_text:
            raise UserInputError("No text was found in this meme, so there is nothing to analyse without the image. "
                                 "Keep 'use image' checked, or type the text and re-analyse.")
        return self.analyse_decoded(decoded, text, ablate=ablate, request_id=request_id, session=session,
                                    started=started, decode_ms=decode_ms)

    def analyse_decoded(self, decoded: DecodedImage, text: str | None, *, ablate: str | None, request_id: str,
                        session: dict, started: float, decode_ms: float, previous_ocr: str = "") -> "Analysed":
        """Analyse and store one meme prediction; ``text`` None reads the text with OCR, else the OCR
        reading of the result being re-analysed (``previous_ocr``) is kept."""
        with self.model_slots:
            result = self.predictor.analyze_meme(decoded, text, ablate=ablate)
        latency_ms = (time.perf_counter() - started) * 1e3
        ocr_text = result.ocr_text if result.ocr_text is not None else previous_ocr
        stage_ms = {"decode": decode_ms, **result.timings_ms}
        stored = self.store_prediction(
            decoded, request_id=request_id, kind="meme", latency_ms=latency_ms, stage_ms=stage_ms,
            outputs={"label": result.label, "fused": result.fused, "image_only": result.image_only,
                     "text_only": result.text_only, "deltas": result.deltas, "ocr_text": ocr_text},
            embedding_ref=result.embedding_ref, model_version=result.model_version, session=session,
            input_text=result.text, ablation=ablate)
        return Analysed(result, stored, decoded, latency_ms, {**stage_ms, "db": stored.db_ms}, ocr_text)

    def rating_inputs(self, coherence, relevance, detail, comment: str) -> tuple[dict[str, int | None], str]:
        """The three rating sliders (0 = not rated) and the comment box of a feedback form, checked."""
        scores = dict(zip(repo.RATING_SCORES, map(score_or_none, (coherence, relevance, detail))))
        return scores, self.check_text(comment, "comment").strip()

    def submit_feedback(self, result: dict, request_id: str | None, session: dict, *,
                        scores: dict[str, int | None], comment: str | None, corrections: dict[str, str],
                        hint: str) -> dict[str, Any]:
        """A form's rating/corrections for ``result``: refuse an empty form, derive the idempotency key, store."""
        if not corrections and not comment and all(v is None for v in scores.values()):
            raise UserInputError(f"Nothing to save yet: move a rating slider, {hint} or write a comment.")
        key = feedback_request_id(request_id, result, {**scores, "comment": comment, **corrections})
        return self.store_feedback(prediction_id=result["prediction_id"], request_id=key, session=session,
                                   scores=scores, comment=comment, corrections=corrections)

    def store_feedback(self, *, prediction_id: int, request_id: str, session: dict, scores: dict[str, int | None],
                       comment: str | None, corrections: dict[str, str]) -> dict[str, Any]:
        """Rating and corrections of one prediction, all or nothing; a repeated ``request_id`` stores nothing new."""
        has_scores = any(v is not None for v in scores.values())

        def transaction() -> dict[str, Any]:
            with Session(self.engine) as s, s.begin():
                saved: dict[str, Any] = {}
                if has_scores or comment:
                    rating = repo.record_rating(s, request_id=f"{request_id}:rating", prediction_id=prediction_id,
                                                session_id=session["session_id"], user=session.get("user"),
                                                comment=comment or None, **scores)
                    saved["rating_id"] = rating.id
                for fld, value in corrections.items():
                    row = repo.record_correction(s, request_id=f"{request_id}:{fld}", prediction_id=prediction_id,
                                                 field=fld, value=value, session_id=session["session_id"],
                                                 user=session.get("user"))
                    saved[f"{fld}_correction_id"] = row.id
                return saved

        try:
            return retry_on_busy(transaction)
        except ValueError as exc:
            raise UserInputError(str(exc)) from exc

    def read(self, query: Callable[[Session], Any]) -> Any:
        with Session(self.read_engine) as s, s.begin():
            return query(s)

    # -- retraining (retrain.api does the work; a run goes on in a background thread) --
    def retrain_status(self) -> dict[str, Any]:
        return retrain_api.retrain_status(self.config, self.read_engine, scheduler=self.scheduler)

    def trigger_retrain(self) -> dict[str, Any]:
        return retrain_api.trigger_retrain(self.config, self.engine, features_factory=self.retrain_features)

    def rollback(self, version: str) -> dict[str, Any]:
        try:
            return retrain_api.rollback(self.config, self.engine, version)
        except (ValueError, FileNotFoundError) as exc:  # unknown, never promoted, rejected, folder missing
            raise UserInputError(f"Cannot roll back to {version!r}: {exc}") from exc

    def report(self, version: str) -> dict[str, Any]:
        """The report listing entry of ``version``; looked up, never built from the user's string."""
        reports = retrain_api.list_reports(self.config)
        for entry in reports:
            if entry["version"] == version:
                return entry
        known = ", ".join(r["version"] for r in reports) or "none yet"
        raise UserInputError(f"There is no report for version {version!r}; reports exist for: {known}.")


def image_limits(config: Config) -> ImageLimits:
    return ImageLimits(max_bytes=config.app.max_upload_mb * 2**20, max_pixels=config.app.max_image_pixels)


def new_session() -> dict[str, Any]:
    """Per-browser-session data: an anonymous id (never an IP). Who is logged in is not kept here: the
    server reads it from the login cookie on each request (``AppServices.identity``)."""
    return {"session_id": uuid.uuid4().hex}


def request_id_or_new(value: str | None) -> str:
    """A client-supplied idempotency key, or a fresh one when the client sent none."""
    value = (value or "").strip()
    if not value:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(value):
        raise UserInputError(f"request id must be 1-96 characters from A-Z a-z 0-9 . _ : -, got {value[:40]!r}")
    return value


def feedback_request_id(explicit: str | None, result: dict, form: dict[str, Any]) -> str:
    """The explicit key, else one derived from the result and the form: a double click or a retry of
    the same form maps to the same key (stored once); a changed form is a new submission."""
    if (explicit or "").strip():
        return request_id_or_new(explicit)
    digest = hashlib.sha256(json.dumps(form, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{result['feedback_id']}-{digest}"


def score_or_none(value: float | int | None) -> int | None:
    """Slider value -> 1..5, or None for 0 ("not rated")."""
    if value is None:
        return None
    score = int(round(float(value)))
    if not 0 <= score <= 5:
        raise UserInputError(f"ratings go from 1 to 5 (0 = not rated), got {value!r}")
    return score or None


def preview_image(decoded: DecodedImage) -> Image.Image:
    image = decoded.image.copy()
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return image


def model_ready_for_memes(predictor: Predictor) -> None:
    if not predictor.labels:
        raise UserInputError(f"Meme analysis needs a trained model version; this server runs {predictor.version!r}. "
                             "Start it with `python app.py`, which builds the bootstrap model.")


def ablation_from_toggles(use_image: bool, use_text: bool) -> str | None:
    if not use_image and not use_text:
        raise UserInputError("Keep at least one of 'use image' and 'use text' checked.")
    return "image" if not use_image else "text" if not use_text else None


def accepted_caption_corrections(engine: Engine) -> list[tuple[str, str]]:
    """Caption corrections a retrain accepted ('used'): they join the caption bank."""
    with Session(read_only_engine(engine)) as s, s.begin():
        return [(value, "correction") for value in repo.used_caption_corrections(s)]


# ---- formatting of results -------------------------------------------------------------------

def _pct(p: float) -> str:
    return f"{100 * p:.0f}%"


def confidence_markdown(result: CaptionResult) -> str:
    text = f"**Confidence: {_pct(result.confidence)}** · from the {result.source} captions · model `{result.model_version}`"
    if result.low_confidence:
        text += ("\n\n⚠️ **Low confidence** — the model found no caption that fits this image well. "
                 "Treat the caption as a guess and please correct it below.")
    return text


def meme_verdict_markdown(result: MemeResult) -> str:
    """The prediction under the chosen ablation, and what removing each modality changes."""
    chosen = {None: result.fused, "image": result.text_only or result.fused, "text": result.image_only}[result.ablation]
    where = {None: "with image and text", "image": "without the image (text only)",
             "text": "without the text (image only)"}[result.ablation]
    lines = [f"### Prediction {where}: **{result.label}** ({_pct(chosen[result.label])})"]
    top = max(result.fused, key=result.fused.get)
    p_top = result.fused[top]
    lines.append(f"With both modalities the top label is **{top}** ({_pct(p_top)}).")
    for name, probs, missing in (("the image", result.text_only, "no text was found"),
                                 ("the text", result.image_only, "")):
        if not probs:
            lines.append(f"- Removing {name}: nothing left to predict from ({missing}).")
            continue
        new_top = max(probs, key=probs.get)
        change = f"top label becomes **{new_top}**" if new_top != top else f"top label stays **{top}**"
        points = round(100 * (probs[top] - p_top))
        lines.append(f"- Removing {name}: P({top}) {_pct(p_top)} → {_pct(probs[top])} "
                     f"({points:+d} pts); {change}.")
    if not result.text.strip():
        lines.append("\n_No text was found in the image: type the meme's text in the box above and press Shift+Enter._")
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Rows as a display table: timestamps to the second, latencies to 0.1 ms, session ids shortened."""
    def cell(col: str, value: Any) -> Any:
        if value is None:
            return ""
        if hasattr(value, "strftime"):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        if col == "latency_ms":
            return round(float(value), 1)
        if col == "session_id":
            return str(value)[:8]
        return value

    return pd.DataFrame([[cell(col, row.get(col)) for col in columns] for row in rows], columns=columns)


PREDICTION_COLUMNS = ["id", "created_at", "kind", "output", "input_text", "ablation", "model_version", "latency_ms",
                      "n_ratings", "n_corrections", "session_id", "user"]
FEEDBACK_COLUMNS = ["created_at", "type", "id", "prediction_id", "kind", "coherence", "relevance", "detail",
                    "comment", "field", "value", "status", "session_id", "user"]
RUN_COLUMNS = ["id", "trigger", "status", "progress", "stage", "started_at", "finished_at", "candidate_version",
               "accepted", "rejected", "message"]
VERSION_COLUMNS = ["version", "status", "current", "parent_version", "created_at", "promoted_at", "report"]
_RUN_BADGE = {"promoted": "✔", "succeeded": "✔", "refused": "✖", "failed": "✖"}  # no emoji font needed


def _when(iso: str | None, *, seconds: bool = False) -> str:
    """An ISO timestamp from retrain.api as UTC text; the database's naive timestamps are UTC."""
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso)
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def _progress_bar(fraction: float, width: int = 10) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return f"`{'█' * filled}{'░' * (width - filled)}` {_pct(fraction)}"


def retrain_status_markdown(status: dict[str, Any], serving: str) -> str:
    """Current version, next scheduled run, and the running run's progress or the last run's result."""
    schedule = status["schedule"]
    lines = [f"**Current version:** `{status['current_version'] or 'none registered'}` · this server runs `{serving}`",
             f"**Next scheduled run:** {_when(schedule.get('next_run_time')) or 'none'} (cron `{schedule['cron']}`) · "
             f"scheduler leader: {schedule.get('leader') or 'none'}"]
    running, runs = status["running"], status["recent_runs"]
    if running is None and status.get("pending_request"):
        lines.append(f"⏳ **Retrain requested** {_when(status['pending_request'])}: waiting for the retrain worker "
                     "(`python -m retrain worker`, started by `python app.py`).")
    if running is not None:
        stage = f"stage **{running['stage']}** · " if running["stage"] else ""
        lines.append(f"▶ **Run {running['id']} is running** ({running['trigger']}, started "
                     f"{_when(running['started_at'])}): {_progress_bar(running['progress'] or 0.0)} · "
                     f"{stage}{running['message']}")
    elif runs:
        last = runs[0]
        lines.append(f"**Last run {last['id']}** ({last['trigger']}, finished {_when(last['finished_at'])}): "
                     f"{_RUN_BADGE.get(last['status'], '')} **{last['status']}** — {last['message']}")
        if last["gate_reason"] and last["gate_reason"] != last["message"]:
            lines.append(f"Gate: {last['gate_reason']}")
    else:
        lines.append("No retrain has run yet.")
    return "\n\n".join(lines)


def retrain_runs_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{**run, "progress": _pct(run["progress"] or 0.0), "started_at": _when(run["started_at"], seconds=True),
             "finished_at": _when(run["finished_at"], seconds=True),
             "accepted": (run["cleaning"] or {}).get("accepted"),
             "rejected": sum(((run["cleaning"] or {}).get("rejected") or {}).values()) if run["cleaning"] else None}
            for run in runs]
    return _table(rows, RUN_COLUMNS)


def retrain_versions_table(versions: list[dict[str, Any]], reports: list[str]) -> pd.DataFrame:
    rows = [{**v, "current": "✓" if v["is_current"] else "", "report": "✓" if v["version"] in reports else "",
             "created_at": _when(v["created_at"], seconds=True), "promoted_at": _when(v["promoted_at"], seconds=True)}
            for v in versions]
    return _table(rows, VERSION_COLUMNS)


def rollback_choices(versions: list[dict[str, Any]]) -> list[str]:
    """Versions that were promoted once and may serve again."""
    return [v["version"] for v in versions if v["promoted_at"] and not v["is_current"] and v["status"] != "rejected"]


def status_fingerprint(status: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(status, sort_keys=True, default=str).encode()).hexdigest()


# ---- the page ------------------------------------------------------------------------------------

HEADER = """# mmapp
Caption images, analyse memes, and teach the model: every rating and correction you submit is stored
and used to retrain it. No IP address is stored; you are an anonymous session unless you log in with
a rater account (Operator tab)."""

CSS = """
#operator-login {max-width: 640px;}
#retrain-controls {border: 1px dashed var(--border-color-primary); border-radius: 8px; padding: 8px;}
.status-line p {margin: 0;}
"""


def build_app(config: Config, predictor: Predictor, engine: Engine, blobstore: BlobStore, *,
              watcher: ModelWatcher | None = None, scheduler: RetrainScheduler | None = None,
              retrain_features: Callable[[], FeatureSource] | None = None,
              free_space: Callable[[Path], int] | None = None) -> gr.Blocks:
    """The whole page, wired to the injected services; call ``.launch(**launch_options(config))`` on it.

    ``scheduler``: the process' retrain scheduler (its next run is shown on the operator page);
    ``retrain_features``: where an operator-triggered retrain gets features (default: ``predictor``'s towers);
    ``free_space``: bytes free under a path, for the disk watermark (default: the file system's; tests simulate it).
    The returned Blocks carries ``client_guard``: pass it to :func:`launch_options` so the HTTP limits and the
    handlers share one watermark and one set of buckets.
    """
    exports_dir = config.paths.exports
    services = AppServices(config=config, predictor=predictor, engine=engine, blobstore=blobstore,
                           watcher=watcher or ModelWatcher(predictor, engine), exports_dir=exports_dir,
                           scheduler=scheduler, retrain_features=retrain_features,
                           guard=ClientGuard.from_config(config, free_space=free_space or free_bytes))
    with gr.Blocks(title="mmapp", analytics_enabled=False, delete_cache=(60, 180)) as demo:
        session = gr.State(new_session)
        gr.Markdown(HEADER)
        with gr.Tabs():
            with gr.Tab("Caption", id="caption"):
                build_caption_tab(services, session)
            with gr.Tab("Meme", id="meme"):
                build_meme_tab(services, session)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(services, session)
            with gr.Tab("Operator", id="operator"):
                build_operator_tab(services, session)
    demo.queue(default_concurrency_limit=config.app.concurrency_limit, max_size=config.app.queue_max_size)
    demo.client_guard = services.guard
    demo.mmapp_auth_routes = auth_routes(services)  # served by launch(**launch_options(config, demo))
    demo.mmapp_rest_api = rest_api(services)  # mounted at API_PREFIX by launch_options
    return demo


def user_errors(fn: Callable) -> Callable:
    """Turn problems the user can fix into ``gr.Error`` (a clear message in the page, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    return wrapper


# How handlers meet widgets. A handler is a module-level function: ``services`` first (bound with
# functools.partial when the page is built), then the event's input values in the event's order. It returns
# ``{output name: value}``, or None when nothing changed, and raises UserInputError for what the user can fix;
# where a property changes rather than a value (visibility, choices, a timer) the value is a
# ``gr.update(...)``, which is a plain dict too. A name is the ``ui`` attribute of the component in its
# ``build_*`` function. ``_event_fn`` (via ``_listen``) does the rest: names -> components, None ->
# ``gr.skip()``, UserInputError -> ``gr.Error``. So a test calls a handler with plain values and reads plain
# values back, with no Blocks, server or browser; and a handler that returns a name its event does not list
# fails loudly (KeyError), where a positional tuple would shift every output silently.

def _components(ui: SimpleNamespace, *names: str) -> dict[str, Any]:
    """The outputs of an event, ``{name: component}`` in the event's order (the order of the API's result)."""
    return {name: getattr(ui, name) for name in names}


def _event_fn(handler: Callable[..., dict[str, Any] | None], outputs: dict[str, Any]) -> Callable:
    """``handler`` as a Gradio event function over ``outputs`` (see above)."""

    def event_fn(*values):
        changed = handler(*values)
        return gr.skip() if changed is None else {outputs[name]: value for name, value in changed.items()}

    # Gradio names the API's parameters after the function's; these are the handler's, less ``services``.
    # A ``request`` parameter gets the gr.Request annotation, so Gradio passes the request (and leaves it
    # out of the API): that is how handlers see the login cookie.
    event_fn.__signature__ = inspect.signature(handler)
    event_fn.__annotations__ = {"request": gr.Request} if "request" in event_fn.__signature__.parameters else {}
    event_fn.__name__ = event_fn.__qualname__ = getattr(handler, "func", handler).__name__
    return user_errors(event_fn)


def _listen(trigger: Callable, handler: Callable[..., dict[str, Any] | None], inputs: list | None,
            outputs: dict[str, Any], **event: Any):
    """``trigger`` (e.g. ``button.click``) runs ``handler`` on ``inputs`` and updates ``outputs``."""
    return trigger(_event_fn(handler, outputs), inputs, list(outputs.values()), **event)


def _model_event(services: AppServices) -> dict[str, Any]:
    return {"concurrency_id": MODEL_EVENTS, "concurrency_limit": model_concurrency(services)}


_FEEDBACK_EVENT = {"concurrency_id": FEEDBACK_EVENTS, "concurrency_limit": FEEDBACK_CONCURRENCY}
_FRESH_FORM = {"coherence": 0, "relevance": 0, "detail": 0, "comment": "", "status": ""}  # a new result's empty form


def _rating_sliders(prefix: str) -> tuple[gr.Slider, gr.Slider, gr.Slider]:
    with gr.Row():
        return tuple(gr.Slider(0, 5, value=0, step=1, label=name, info="1 = poor … 5 = excellent; 0 = not rated",
                               elem_id=f"{prefix}-{name.lower()}")
                     for name in ("Coherence", "Relevance", "Detail"))


def _upload_widgets(label: str) -> tuple[gr.File, gr.Image]:
    upload = gr.File(label=label, file_types=["image"], type="filepath", height=120)
    preview = gr.Image(label="Your image", type="pil", format="jpeg", interactive=False, height=320, buttons=[])  # JPEG: ~0.5 ms to encode, WebP ~16 ms
    return upload, preview


def saved_markdown(saved: dict[str, Any]) -> str:
    parts = []
    if "rating_id" in saved:
        parts.append(f"rating #{saved['rating_id']}")
    parts += [f"{key.removesuffix('_correction_id').replace('_', ' ')} correction #{value}"
              for key, value in saved.items() if key.endswith("_correction_id")]
    return f"✔ **Saved** — thank you! ({', '.join(parts)})"


# -- caption tab --

def caption_image(services: AppServices, upload: str | None, request_id: str | None,
                  session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """Caption an uploaded image and store the prediction; the form below starts empty for it."""
    if not upload:
        raise UserInputError("Choose an image to upload first.")
    session_data = services.with_user(session_data, request)
    done = services.caption(upload, request_id=request_id, session=session_data)
    result, stored = done.result, done.stored
    state = {"prediction_id": stored.prediction_id, "request_id": stored.request_id, "feedback_id": uuid.uuid4().hex,
             "relpath": stored.relpath, "caption": result.caption}
    details = {"prediction_id": stored.prediction_id, "request_id": stored.request_id, **asdict(result),
               "latency_ms": done.latency_ms, "stage_ms": done.stage_ms}
    return {**_FRESH_FORM, "preview": preview_image(done.decoded), "caption": result.caption,
            "confidence": confidence_markdown(result),
            "alternatives": {text: conf for text, conf in result.alternatives},
            "details": details, "result": state, "upload": None, "corrected": result.caption}


def submit_caption_feedback(services: AppServices, coherence, relevance, detail, corrected: str, comment: str,
                            request_id: str, result: dict | None, session_data: dict,
                            request: gr.Request | None = None) -> dict[str, Any]:
    """Store the rating and, when the caption was edited, the correction of the caption in ``result``."""
    if not result:
        raise UserInputError("Upload an image first: there is no caption to rate yet.")
    session_data = services.with_user(session_data, request)
    corrected = " ".join(services.check_text(corrected, "corrected caption").split())
    scores, comment = services.rating_inputs(coherence, relevance, detail, comment)
    corrections = {"caption": corrected} if corrected and corrected != result["caption"] else {}
    saved = services.submit_feedback(result, request_id, session_data, scores=scores, comment=comment,
                                     corrections=corrections, hint="correct the caption")
    return {"status": saved_markdown(saved)}


def clear_caption() -> dict[str, Any]:
    return {**_FRESH_FORM, "preview": None, "caption": "", "confidence": "", "alternatives": None, "details": None,
            "result": None, "upload": None, "corrected": ""}


def build_caption_tab(services: AppServices, session: gr.State) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.result = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            ui.upload, ui.preview = _upload_widgets("Upload an image (JPEG, PNG, WebP, GIF, BMP, TIFF)")
            ui.request_id = gr.Textbox("", visible=False, label="request id")
        with gr.Column(scale=1):
            ui.caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
            ui.confidence = gr.Markdown(elem_id="caption-confidence")
            ui.alternatives = gr.Label(label="Alternatives", num_top_classes=3, show_heading=False)
            with gr.Accordion("Details", open=False):
                ui.details = gr.JSON(label="Result")
    gr.Markdown("#### Rate and correct this caption")
    with gr.Group():
        ui.coherence, ui.relevance, ui.detail = _rating_sliders("caption")
        ui.corrected = gr.Textbox(label="Corrected caption", placeholder="Edit the caption if it is wrong",
                                  max_length=services.config.app.max_text_chars, elem_id="caption-corrected")
        ui.comment = gr.Textbox(label="Comment (optional)", lines=2, max_length=services.config.app.max_text_chars)
        ui.feedback_request_id = gr.Textbox("", visible=False, label="feedback request id")
        with gr.Row():
            ui.submit = gr.Button("Submit feedback", variant="primary", elem_id="caption-submit")
            ui.clear = gr.Button("Clear", variant="secondary")
        ui.status = gr.Markdown(elem_id="caption-status", elem_classes="status-line")

    outputs = _components(ui, "preview", "caption", "confidence", "alternatives", "details", "result", "upload",
                          "corrected", "coherence", "relevance", "detail", "comment", "status")
    _listen(ui.upload.upload, functools.partial(caption_image, services), [ui.upload, ui.request_id, session],
            outputs, api_name="caption", **_model_event(services))
    _listen(ui.submit.click, functools.partial(submit_caption_feedback, services),
            [ui.coherence, ui.relevance, ui.detail, ui.corrected, ui.comment, ui.feedback_request_id, ui.result,
             session],
            _components(ui, "status"), api_name="rate_caption", **_FEEDBACK_EVENT)
    _listen(ui.clear.click, clear_caption, None, outputs, api_name="clear_caption", queue=False)
    return ui


# -- meme tab --

def _meme_outputs(done: Analysed) -> dict[str, Any]:
    """The meme tab's outputs for one stored analysis."""
    result, stored, ocr_text = done.result, done.stored, done.ocr_text
    state = {"prediction_id": stored.prediction_id, "request_id": stored.request_id, "feedback_id": uuid.uuid4().hex,
             "relpath": stored.relpath, "ocr_text": ocr_text, "text": result.text, "label": result.label}
    details = {"prediction_id": stored.prediction_id, "request_id": stored.request_id, **asdict(result),
               "latency_ms": done.latency_ms, "stage_ms": done.stage_ms}
    return {**_FRESH_FORM, "text": result.text, "verdict": meme_verdict_markdown(result), "fused": result.fused,
            "image_only": result.image_only, "text_only": result.text_only or None, "details": details,
            "result": state, "corrected_text": result.text,
            "corrected_label": gr.update(choices=list(result.labels), value=None)}


def analyze_meme(services: AppServices, upload: str | None, use_image: bool, use_text: bool,
                 request_id: str | None, session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """Read the text of an uploaded meme (OCR), analyse it under the toggles' ablation, store the prediction."""
    if not upload:
        raise UserInputError("Choose a meme image to upload first.")
    session_data = services.with_user(session_data, request)
    ablate = ablation_from_toggles(use_image, use_text)
    done = services.analyze_meme(upload, ablate=ablate, request_id=request_id, session=session_data)
    return {**_meme_outputs(done), "preview": preview_image(done.decoded), "upload": None}


def reanalyze_meme(services: AppServices, text: str, use_image: bool, use_text: bool, request_id: str | None,
                   result: dict | None, session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """Analyse the meme in ``result`` again with the (edited) ``text`` and the toggles; no OCR this time."""
    if not result:
        raise UserInputError("Upload a meme first.")
    session_data = services.with_user(session_data, request)
    ablate = ablation_from_toggles(use_image, use_text)
    text = services.check_text(text, "meme text").strip()
    if ablate == "image" and not text:
        raise UserInputError("Without the image there is nothing left to analyse: the meme text is empty. "
                             "Type the meme's text or keep 'use image' checked.")
    services.watcher.maybe_reload()
    model_ready_for_memes(services.predictor)
    request_id = request_id_or_new(request_id)
    started = time.perf_counter()
    decoded = services.decode_stored(result["relpath"])
    decode_ms = (time.perf_counter() - started) * 1e3
    return _meme_outputs(services.analyse_decoded(decoded, text, ablate=ablate, request_id=request_id,
                                                  session=session_data, started=started, decode_ms=decode_ms,
                                                  previous_ocr=result.get("ocr_text", "")))


def submit_meme_feedback(services: AppServices, coherence, relevance, detail, corrected_text: str,
                         corrected_label: str | None, comment: str, request_id: str, result: dict | None,
                         session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """Store the rating and the text/label corrections of the analysis in ``result``."""
    if not result:
        raise UserInputError("Upload a meme first: there is no analysis to rate yet.")
    session_data = services.with_user(session_data, request)
    labels = services.predictor.labels
    corrected_text = " ".join(services.check_text(corrected_text, "corrected text").split())
    scores, comment = services.rating_inputs(coherence, relevance, detail, comment)
    corrections = {}
    if corrected_text and corrected_text != " ".join((result.get("ocr_text") or "").split()):
        corrections["ocr_text"] = corrected_text
    if corrected_label:
        if corrected_label not in labels:
            raise UserInputError(f"unknown label {corrected_label!r}; choose one of {list(labels)}")
        corrections["label"] = corrected_label
    saved = services.submit_feedback(result, request_id, session_data, scores=scores, comment=comment,
                                     corrections=corrections, hint="correct the text or label")
    return {"status": saved_markdown(saved)}


def clear_meme() -> dict[str, Any]:
    return {**_FRESH_FORM, "preview": None, "text": "", "verdict": "", "fused": None, "image_only": None,
            "text_only": None, "details": None, "result": None, "upload": None, "corrected_text": "",
            "corrected_label": None, "use_image": True, "use_text": True}


def build_meme_tab(services: AppServices, session: gr.State) -> SimpleNamespace:
    ui = SimpleNamespace()
    max_chars = services.config.app.max_text_chars
    ui.result = gr.State(None)
    gr.Markdown("The meme model was trained on a synthetic set (text rendered on clip art, see `docs/memes.md`): "
                "its scores show what the model learned, not real-world accuracy.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            ui.upload, ui.preview = _upload_widgets("Upload a meme")
            ui.request_id = gr.Textbox("", visible=False, label="request id")
        with gr.Column(scale=1):
            ui.text = gr.Textbox(label="Text in the meme (OCR) — edit it, then Shift+Enter or Re-analyse", lines=2,
                                 max_lines=6, max_length=max_chars, elem_id="meme-text")
            with gr.Row():
                ui.use_image = gr.Checkbox(value=True, label="use image", elem_id="use-image")
                ui.use_text = gr.Checkbox(value=True, label="use text", elem_id="use-text")
                ui.reanalyze = gr.Button("Re-analyse", size="sm")
            ui.verdict = gr.Markdown(elem_id="meme-verdict")
    with gr.Row():
        ui.fused = gr.Label(label="Fused (image + text)", elem_id="label-fused")
        ui.image_only = gr.Label(label="Image only", elem_id="label-image-only")
        ui.text_only = gr.Label(label="Text only", elem_id="label-text-only")
    with gr.Accordion("Details", open=False):
        ui.details = gr.JSON(label="Result")
    gr.Markdown("#### Rate and correct this analysis")
    with gr.Group():
        ui.coherence, ui.relevance, ui.detail = _rating_sliders("meme")
        with gr.Row():
            ui.corrected_text = gr.Textbox(label="Corrected text", max_length=max_chars, scale=2,
                                           elem_id="meme-corrected-text")
            ui.corrected_label = gr.Dropdown(choices=list(services.predictor.labels), value=None,
                                             label="Correct label", scale=1, elem_id="meme-corrected-label")
        ui.comment = gr.Textbox(label="Comment (optional)", lines=2, max_length=max_chars)
        ui.feedback_request_id = gr.Textbox("", visible=False, label="feedback request id")
        with gr.Row():
            ui.submit = gr.Button("Submit feedback", variant="primary", elem_id="meme-submit")
            ui.clear = gr.Button("Clear", variant="secondary")
        ui.status = gr.Markdown(elem_id="meme-status", elem_classes="status-line")

    analysis = ("text", "verdict", "fused", "image_only", "text_only", "details", "result", "corrected_text",
                "corrected_label", "coherence", "relevance", "detail", "comment", "status")
    _listen(ui.upload.upload, functools.partial(analyze_meme, services),
            [ui.upload, ui.use_image, ui.use_text, ui.request_id, session],
            _components(ui, *analysis, "preview", "upload"), api_name="analyze_meme", **_model_event(services))
    _listen(functools.partial(gr.on, [ui.text.submit, ui.reanalyze.click, ui.use_image.input, ui.use_text.input]),
            functools.partial(reanalyze_meme, services),
            [ui.text, ui.use_image, ui.use_text, ui.request_id, ui.result, session], _components(ui, *analysis),
            api_name="reanalyze_meme", trigger_mode="always_last", **_model_event(services))
    _listen(ui.submit.click, functools.partial(submit_meme_feedback, services),
            [ui.coherence, ui.relevance, ui.detail, ui.corrected_text, ui.corrected_label, ui.comment,
             ui.feedback_request_id, ui.result, session],
            _components(ui, "status"), api_name="rate_meme", **_FEEDBACK_EVENT)
    _listen(ui.clear.click, clear_meme, None,
            _components(ui, *analysis, "preview", "upload", "use_image", "use_text"),
            api_name="clear_meme", queue=False)
    return ui


# -- operator tab: login (operators and raters), the operator's tables, rater accounts, exports --

# The page's login: the button's script posts the credentials to /auth/login (a plain HTTP route beside
# Gradio, outside its queue), which sets the HttpOnly session cookie; the password never enters a
# Gradio event. The event that follows gets only the HTTP status ("200", "401", "403", "429:<seconds>")
# in place of the password and reads the identity from the cookie.
LOGIN_JS = """async (user, password, session) => {
  const r = await fetch("auth/login", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({user: user, password: password})});
  let status = String(r.status);
  if (r.status === 429) { status += ":" + (r.headers.get("Retry-After") || ""); }
  return [user, status, session];
}"""
LOGOUT_JS = """async (...args) => { await fetch("auth/logout", {method: "POST", credentials: "same-origin"}); return args; }"""
RATER_ACTIONS = {"make trusted annotator": {"role": "trusted"}, "make rater (untrusted)": {"role": "rater"},
                 "make operator": {"role": "operator"}, "disable": {"disabled": True}, "enable": {"disabled": False},
                 "unlock": {}, "new password": {}}
RATER_COLUMNS = ["user", "role", "disabled", "failed_logins", "locked_until", "last_login_at", "ratings",
                 "corrections", "used", "rejected"]


def operator_credentials_configured(config: Config) -> bool:
    return bool(config.app.operator_user and config.app.operator_password)


def login_failure_message(status: str | None) -> str:
    """What the page says for the login route's HTTP status; never echoes what the client sent."""
    code, _, retry = (status or "").partition(":")
    if code == "429":
        return f"Too many failed logins for this account: try again in {retry or 'a few minutes'} s." \
            if retry.isdigit() else "Too many failed logins for this account: try again later."
    if code == "403":
        return "This account is disabled."
    return "Wrong user or password."


# -- compare tab: blind before/after evaluation (retrain.blind) --

COMPARE_CHOICES = {"a": "a", "b": "b", "same": "same", "A is better": "a", "B is better": "b", "About the same": "same"}
_NO_PAIR = {"pair_id": None, "image": None, "output_a": "", "output_b": ""}


def compare_rater(services: AppServices, session_data: dict, request: Any) -> str:
    """Who votes: the logged-in account, else (when retrain.blind_anonymous_votes) the browser session."""
    who = services.identity(request)
    if who is not None:
        return f"account:{who.name}"
    if not services.config.retrain.blind_anonymous_votes:
        raise UserInputError("Log in (Operator tab) to compare outputs: only rater accounts vote.")
    session_id = (session_data or {}).get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise UserInputError("This browser session has no id; reload the page.")
    return f"session:{session_id}"


def _compare_pair(services: AppServices, rater: str) -> dict[str, Any]:
    """The next pair ``rater`` has not judged: image and the two outputs, never which side is which version."""
    def query(s: Session) -> dict[str, Any] | None:
        row = repo.next_blind_pair(s, rater=rater)
        return None if row is None else {"id": row.id, "image_relpath": row.image_relpath, "output_a": row.output_a,
                                         "output_b": row.output_b}
    pair = services.read(query)
    if pair is None:
        return {**_NO_PAIR, "status": "Nothing to compare right now: you have judged every open pair. Thank you!"}
    path = services.blobstore.path(pair["image_relpath"])
    return {"pair_id": pair["id"], "image": str(path) if path.is_file() else None, "output_a": pair["output_a"],
            "output_b": pair["output_b"],
            "status": "Which description fits the picture better? The two come from two model versions, in random order."
                      + ("" if path.is_file() else " (The picture is no longer stored; judge by the texts or skip.)")}


def compare_next(services: AppServices, session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """Show the next blind pair for this rater."""
    return _compare_pair(services, compare_rater(services, session_data, request))


def compare_vote(services: AppServices, pair_id: int | None, choice: str, session_data: dict,
                 request: gr.Request | None = None) -> dict[str, Any]:
    """Record this rater's pick on ``pair_id`` ("a", "b" or "same"; one vote per pair) and show the next pair."""
    rater = compare_rater(services, session_data, request)
    if pair_id is None:
        raise UserInputError("Show a pair first (Next pair).")
    if choice not in COMPARE_CHOICES:
        raise UserInputError(f"Pick one of 'a', 'b' or 'same', got {choice!r}.")

    def vote() -> bool:
        with Session(services.engine) as s, s.begin():
            if repo.get_blind_pair(s, int(pair_id)) is None:
                raise UserInputError(f"There is no comparison #{pair_id}.")
            return repo.record_blind_vote(s, pair_id=int(pair_id), rater=rater, choice=COMPARE_CHOICES[choice])[1]
    created = retry_on_busy(vote)
    nxt = _compare_pair(services, rater)
    said = "✔ Saved." if created else "You had already judged that pair; your first answer stands."
    return {**nxt, "status": f"{said} {nxt['status']}"}


def build_compare_tab(services: AppServices, session: gr.State) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown("After a retrain, two model versions describe the same held-out pictures. Pick the better "
                "description; you are not told which version wrote which (docs/flywheel.md, \"Blind comparison\").")
    ui.pair_id = gr.Number(None, visible=False, precision=0, label="pair id")  # an API parameter, hence not gr.State
    ui.choice = gr.Textbox("", visible=False, label="choice")  # the API's "a" | "b" | "same"
    ui.vote_api = gr.Button(visible=False)
    with gr.Row(equal_height=False):
        ui.image = gr.Image(label="Picture", type="filepath", interactive=False, height=320, buttons=[])
        with gr.Column():
            ui.output_a = gr.Textbox(label="A", interactive=False, elem_id="compare-a")
            ui.output_b = gr.Textbox(label="B", interactive=False, elem_id="compare-b")
            with gr.Row():
                ui.a_better = gr.Button("A is better", elem_id="compare-a-better")
                ui.same = gr.Button("About the same", elem_id="compare-same")
                ui.b_better = gr.Button("B is better", elem_id="compare-b-better")
            ui.next = gr.Button("Next pair", size="sm", elem_id="compare-next")
    ui.status = gr.Markdown(elem_id="compare-status", elem_classes="status-line")
    shown = _components(ui, "pair_id", "image", "output_a", "output_b", "status")
    _listen(ui.next.click, functools.partial(compare_next, services), [session], shown, api_name="compare_next",
            **_FEEDBACK_EVENT)
    _listen(ui.vote_api.click, functools.partial(compare_vote, services), [ui.pair_id, ui.choice, session], shown,
            api_name="compare_vote", **_FEEDBACK_EVENT)
    for button, api in ((ui.a_better, "compare_vote_a"), (ui.same, "compare_vote_same"), (ui.b_better, "compare_vote_b")):
        # In the page the button's own label is the choice (a Button input is not an API parameter).
        _listen(button.click, functools.partial(compare_vote, services), [ui.pair_id, button, session], shown,
                api_name=api, api_visibility="private", **_FEEDBACK_EVENT)
    return ui


def retrain_decide_held(services: AppServices, request: gr.Request | None = None) -> dict[str, Any]:
    """Promote or reject candidates held for blind evaluation whose votes are in (retrain.blind.decide_held)."""
    from retrain.blind import decide_held

    require_operator(services, request)
    decisions = decide_held(services.config, services.engine)
    lines = [f"`{d.version}`: **{d.action}** — {d.reason}" for d in decisions]
    notice = "\n\n".join(lines) if lines else "No candidate is held for blind evaluation."
    return {"notice": notice, **retrain_view(services, services.retrain_status())}


def require_operator(services: AppServices, request: Any) -> Identity:
    """Every operator handler starts with this: the page hides the panel, but the API is open. The
    identity comes from the login cookie, so a copied session hash carries no operator rights."""
    who = services.identity(request)
    if who is None or not who.is_operator:
        raise UserInputError("Log in as operator first.")
    return who


def rater_table(services: AppServices) -> pd.DataFrame:
    accounts = {a["name"]: a for a in services.accounts.list_accounts()}
    counts = services.read(repo.feedback_counts_per_rater)
    rows = [{**{k: v for k, v in accounts.get(c["user"], {}).items() if k in RATER_COLUMNS},
             **c, "role": ROLE_NAMES.get(c["role"], c["role"])} for c in counts]
    return _table(rows, RATER_COLUMNS)


def operator_tables(services: AppServices) -> dict[str, Any]:
    """The operator panel's version line, recent predictions and feedback, counts and rater accounts."""
    predictor = services.predictor

    def query(s: Session) -> dict:
        row = repo.current_version(s)
        return {"predictions": repo.recent_predictions(s, 50), "feedback": repo.recent_feedback(s, 50),
                "per_day": repo.counts_per_day(s, 14), "per_label": repo.counts_per_label(s),
                "registry": row.version if row else None}

    data = services.read(query)
    version = (f"**Model version served:** `{predictor.version}` · registry current: "
               f"`{data['registry'] or 'none'}` · labels: {', '.join(predictor.labels) or '—'}")
    if services.watcher.notice:  # a fallback is being served: the operator must see it
        version += f"\n\n⚠ **Model fallback:** {services.watcher.notice}"
    return {"version": version,
            "predictions": _table(data["predictions"], PREDICTION_COLUMNS),
            "feedback": _table(data["feedback"], FEEDBACK_COLUMNS),
            "per_day": _table(list(reversed(data["per_day"])), ["day", "predictions", "ratings", "corrections"]),
            "per_label": _table(data["per_label"], ["predicted_label", "corrected_label", "n"]),
            "raters": rater_table(services)}


def operator_login(services: AppServices, user: str, login_status: str, session_data: dict,
                   request: gr.Request | None = None) -> dict[str, Any]:
    """After the page's script posted the credentials to /auth/login: show who is logged in (and the
    operator panel to an operator). ``login_status`` is that route's HTTP status, only used for the
    message; the cookie alone decides. API clients log in with ``POST /auth/login`` first."""
    if not services.login_enabled():
        raise UserInputError("Login is disabled: no operator credentials or accounts are configured on this server.")
    who = services.identity(request)
    if who is None:
        raise UserInputError(login_failure_message(login_status))
    whoami = f"Logged in as **{who.name}** ({ROLE_NAMES[who.role]})."
    out = {"session": session_data, "login_box": gr.update(visible=False), "account_box": gr.update(visible=True),
           "whoami": whoami, "password": "", "login_status": "", "panel": gr.update(visible=who.is_operator)}
    return {**out, **operator_tables(services)} if who.is_operator else out


def operator_refresh(services: AppServices, request: gr.Request | None = None) -> dict[str, Any]:
    require_operator(services, request)
    return operator_tables(services)


def operator_logout(services: AppServices, session_data: dict, request: gr.Request | None = None) -> dict[str, Any]:
    """End the login session on the server (the page's script also drops the cookie)."""
    cookies = getattr(request, "cookies", None) or {}
    services.accounts.logout(cookies.get(SESSION_COOKIE))
    return {"session": session_data, "login_box": gr.update(visible=True), "account_box": gr.update(visible=False),
            "whoami": "", "panel": gr.update(visible=False), "export_file": gr.update(value=None, visible=False),
            "rater_notice": "", **retrain_panel_closed()}


def operator_export(services: AppServices, fmt: str, request: gr.Request | None = None) -> dict[str, Any]:
    """All feedback and its images in ``fmt``, zipped into a folder only this answer names."""
    require_operator(services, request)
    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    # A random folder per export: the exports dir is servable, so a path must not be guessable; and
    # every export holds all data and images, so links expire (app.export_ttl_s; also the scheduler's job).
    expire_exports(services.exports_dir, services.config.app.export_ttl_s)
    out_dir = services.exports_dir / secrets.token_urlsafe(16)
    strip = functools.partial(strip_metadata, limits=services.limits)  # blobs stored before stripping, too
    folder = services.read(lambda s: export_feedback(s, out_dir, fmt, services.blobstore, image_filter=strip))
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)
    shutil.rmtree(folder)
    return {"export_file": gr.update(value=archive, visible=True)}


def operator_create_rater(services: AppServices, name: str, role: str,
                          request: gr.Request | None = None) -> dict[str, Any]:
    """A new account with a generated password, shown once here (hand it to the rater)."""
    who = require_operator(services, request)
    role = role if role in ROLE_NAMES else "trusted"
    try:
        created, password = services.accounts.create((name or "").strip(), role, created_by=who.name)
    except ValueError as exc:
        raise UserInputError(str(exc)) from exc
    notice = (f"Created **{created.name}** ({ROLE_NAMES[created.role]}). Password, shown this once: "
              f"`{password}`")
    return {"rater_notice": notice, "raters": rater_table(services), "rater_name": ""}


def operator_update_rater(services: AppServices, name: str, action: str,
                          request: gr.Request | None = None) -> dict[str, Any]:
    """Change a rater's role, disable/enable, unlock, or issue a new password; open sessions end."""
    who = require_operator(services, request)
    name = (name or "").strip()
    if action not in RATER_ACTIONS:
        raise UserInputError(f"unknown action {action!r}; choose one of {list(RATER_ACTIONS)}")
    if name == who.name and action in ("disable", "make trusted annotator", "make rater (untrusted)"):
        raise UserInputError("You cannot disable or demote your own account while logged in with it.")
    notice = f"**{name}**: {action} done."
    try:
        if action == "unlock":
            services.accounts.unlock(name)
        elif action == "new password":
            password = generate_password()
            services.accounts.update(name, password=password)
            notice = f"**{name}**: new password, shown this once: `{password}` (their open sessions ended)."
        else:
            services.accounts.update(name, **RATER_ACTIONS[action])
    except ValueError as exc:
        raise UserInputError(str(exc)) from exc
    return {"rater_notice": notice, "raters": rater_table(services)}


def build_operator_tab(services: AppServices, session: gr.State) -> SimpleNamespace:
    ui = SimpleNamespace(session=session)
    enabled = services.login_enabled()
    with gr.Column(visible=True, elem_id="operator-login") as ui.login_box:
        if enabled:
            gr.Markdown("### Log in\nOperators: recent predictions and feedback, counts, raters and exports. "
                        "Raters: your ratings and corrections are stored under your account.")
        else:
            gr.Markdown("### Operator page disabled\n⚠️ No operator credentials are configured on this server. "
                        "Set `MMAPP_OPERATOR_USER` and `MMAPP_OPERATOR_PASSWORD` and restart to enable it.")
        with gr.Row():
            ui.user = gr.Textbox(label="User", interactive=enabled, scale=1)
            ui.password = gr.Textbox(label="Password", type="password", interactive=enabled, scale=1)
        ui.login = gr.Button("Log in", variant="primary", interactive=enabled)
        ui.login_status = gr.Markdown()
    with gr.Row(visible=False, elem_id="account-box") as ui.account_box:
        ui.whoami = gr.Markdown(elem_id="whoami")
        ui.logout = gr.Button("Log out", size="sm", scale=0)
    with gr.Column(visible=False) as ui.panel:
        with gr.Row():
            ui.version = gr.Markdown(elem_id="operator-version")
            ui.refresh = gr.Button("Refresh", size="sm", scale=0)
        with gr.Row():
            ui.per_day = gr.Dataframe(label="Counts per day (UTC, last 14 days)", interactive=False, max_height=320)
            ui.per_label = gr.Dataframe(label="Meme predictions per predicted / corrected label", interactive=False,
                                        max_height=320)
        ui.predictions = gr.Dataframe(label="Recent predictions", interactive=False, max_height=400)
        ui.feedback = gr.Dataframe(label="Recent feedback", interactive=False, max_height=400)
        gr.Markdown("#### Raters\nAccounts and their feedback. A trusted annotator's corrections count fully; "
                    "anonymous sessions and untrusted raters need a trusted rater's agreement (see the README).")
        ui.raters = gr.Dataframe(label="Rater accounts (anonymous sessions pooled)", interactive=False,
                                 max_height=320, elem_id="rater-table")
        with gr.Row(equal_height=False):
            ui.rater_name = gr.Textbox(label="Account name", scale=2)
            ui.rater_role = gr.Dropdown([(label, role) for role, label in ROLE_NAMES.items()], value="trusted",
                                        label="Role of a new account", scale=1)
            ui.create_rater = gr.Button("Create account", scale=1)
        with gr.Row(equal_height=False):
            ui.rater_action = gr.Dropdown(list(RATER_ACTIONS), value="make trusted annotator", label="Change account",
                                          scale=2)
            ui.update_rater = gr.Button("Apply to the named account", scale=1)
        ui.rater_notice = gr.Markdown(elem_id="rater-notice")
        gr.Markdown("#### Export feedback and images")
        with gr.Row(equal_height=False):
            ui.export_format = gr.Radio([(label, fmt) for fmt, label in EXPORT_LABELS.items()], value="csv",
                                        label="Format", scale=3)
            with gr.Column(scale=2):
                ui.export = gr.Button("Export (zip)")
                ui.export_file = gr.File(label="Download", interactive=False, visible=False)
        with gr.Column(elem_id="retrain-controls") as ui.retrain_column:
            ui.retrain = build_retrain_controls(services, session)

    tables = ("version", "predictions", "feedback", "per_day", "per_label", "raters")
    login_outputs = _components(ui, "session", "login_box", "account_box", "whoami", "panel", "password",
                                "login_status", *tables)
    # One function for the button and the Enter key: the two events share its concurrency group (limit 4).
    login = _event_fn(functools.partial(operator_login, services), login_outputs)
    logged_in = [
        ui.login.click(login, [ui.user, ui.password, session], list(login_outputs.values()), js=LOGIN_JS,
                       api_name="operator_login", concurrency_limit=4),
        ui.password.submit(login, [ui.user, ui.password, session], list(login_outputs.values()), js=LOGIN_JS,
                           api_name="operator_login_enter", api_visibility="undocumented", concurrency_limit=4)]
    opened = _event_fn(functools.partial(retrain_panel_opened, services), ui.retrain.opened_outputs)
    for event, name in zip(logged_in, ("retrain_open", "retrain_open_enter")):  # fill in and start polling
        event.success(opened, None, list(ui.retrain.opened_outputs.values()), api_name=name,
                      api_visibility="private", queue=False)
    _listen(ui.refresh.click, functools.partial(operator_refresh, services), None, _components(ui, *tables),
            api_name="operator_refresh", concurrency_limit=4)
    _listen(ui.logout.click, functools.partial(operator_logout, services), [session],
            {**_components(ui, "session", "login_box", "account_box", "whoami", "panel", "export_file",
                           "rater_notice"), **ui.retrain.closed_outputs},
            api_name="operator_logout", queue=False, js=LOGOUT_JS)
    _listen(ui.export.click, functools.partial(operator_export, services), [ui.export_format],
            _components(ui, "export_file"), api_name="operator_export", concurrency_id="export", concurrency_limit=1)
    _listen(ui.create_rater.click, functools.partial(operator_create_rater, services), [ui.rater_name, ui.rater_role],
            _components(ui, "rater_notice", "raters", "rater_name"), api_name="operator_create_rater",
            concurrency_limit=2)
    _listen(ui.update_rater.click, functools.partial(operator_update_rater, services), [ui.rater_name, ui.rater_action],
            _components(ui, "rater_notice", "raters"), api_name="operator_update_rater", concurrency_limit=2)
    return ui


# -- retrain controls (inside the operator panel) --

def retrain_view(services: AppServices, status: dict[str, Any]) -> dict[str, Any]:
    """The panel drawn from a ``retrain.api`` status: status line, runs, versions, dropdowns, fingerprint."""
    reports = [r["version"] for r in status["reports"]]
    return {"status": retrain_status_markdown(status, services.predictor.version),
            "runs": retrain_runs_table(status["recent_runs"]),
            "versions": retrain_versions_table(status["versions"], reports),
            "report_version": gr.update(choices=reports),
            "rollback_version": gr.update(choices=rollback_choices(status["versions"])),
            "seen": status_fingerprint(status)}


def retrain_status(services: AppServices, request: gr.Request | None = None) -> dict[str, Any]:
    require_operator(services, request)
    return retrain_view(services, services.retrain_status())


def poll_retrain_status(services: AppServices, seen: str | None,
                        request: gr.Request | None = None) -> dict[str, Any] | None:
    """The timer's tick: never an error in the page; None (nothing redrawn) unless the status changed."""
    try:
        who = services.identity(request)
        if who is None or not who.is_operator:
            return None
        status = services.retrain_status()
    except Exception:  # a busy or unreachable database; the next tick tries again
        log.warning("retrain status poll failed", exc_info=True)
        return None
    return None if status_fingerprint(status) == seen else retrain_view(services, status)


def retrain_now(services: AppServices, request: gr.Request | None = None) -> dict[str, Any]:
    """Start a retrain run in the background, or say which run is already going."""
    require_operator(services, request)
    started = services.trigger_retrain()
    if started["started"] and started["run_id"] is None:  # retrain.runner "worker": the worker takes it
        notice = "Retrain requested: the retrain worker starts it within seconds; its progress shows above."
    elif started["started"]:
        notice = f"Retrain run {started['run_id']} started; its progress shows above."
    else:
        notice = f"⚠ A retrain is already running (run {started['run_id']}): no second run was started."
    return {"notice": notice, **retrain_view(services, services.retrain_status())}


def retrain_rollback(services: AppServices, version: str | None, request: gr.Request | None = None) -> dict[str, Any]:
    """Make an earlier promoted ``version`` current again; this server follows within RELOAD_POLL_S."""
    require_operator(services, request)
    version = (version or "").strip()
    if not version:
        raise UserInputError("Choose the version to roll back to.")
    result = services.rollback(version)
    if result["previous"] == result["current_version"]:
        notice = f"`{version}` is already the current version; nothing changed."
    else:
        notice = (f"↩ **Rolled back:** the current version is now `{result['current_version']}` (was "
                  f"`{result['previous']}`); this server switches to it within {RELOAD_POLL_S:.0f} s.")
    status = services.retrain_status()
    return {**retrain_view(services, status), "notice": notice,
            "rollback_version": gr.update(choices=rollback_choices(status["versions"]), value=None)}


def retrain_report(services: AppServices, version: str | None, request: gr.Request | None = None) -> dict[str, Any]:
    """The human-eval report of ``version`` as a download and a link; nothing for an empty choice."""
    require_operator(services, request)
    if not (version or "").strip():
        return {"report_file": gr.update(value=None, visible=False), "report_link": ""}
    entry = services.report(version.strip())
    # Served from a random folder: report paths (reports/<version>/) are guessable, and a report
    # quotes users' corrections, so only a logged-in operator gets a link to one; it expires (app.export_ttl_s).
    expire_exports(services.exports_dir, services.config.app.export_ttl_s)
    shared = services.exports_dir / secrets.token_urlsafe(16)
    shared.mkdir(parents=True)
    html = shutil.copy2(entry["html"], shared / f"report-{entry['version']}.html")
    link = (f"Valid for {services.config.app.export_ttl_s / 60:.0f} min: "
            f"[Open the report of `{entry['version']}` in a new tab](gradio_api/file={quote(str(html))})")
    return {"report_file": gr.update(value=str(html), visible=True), "report_link": link}


def retrain_panel_opened(services: AppServices, request: gr.Request | None = None) -> dict[str, Any] | None:
    """After a login: draw the panel and start the status timer (operators only)."""
    who = services.identity(request)
    if who is None or not who.is_operator:
        return None
    return {**retrain_view(services, services.retrain_status()), "timer": gr.update(active=True)}


def retrain_panel_closed() -> dict[str, Any]:
    """At logout: stop the timer and forget the notice and report."""
    return {"timer": gr.update(active=False), "notice": "", "report_link": "",
            "report_file": gr.update(value=None, visible=False)}


def build_retrain_controls(services: AppServices, session: gr.State) -> SimpleNamespace:
    """The operator's retraining panel: status and progress, "Retrain now", runs, versions, reports, rollback.

    A run goes on in a background thread (``retrain.api``); a ``gr.Timer`` re-reads the status every
    ``RETRAIN_POLL_S`` seconds while an operator is logged in and redraws only when it changed.
    Returns the components plus ``opened_outputs``/``closed_outputs``, the outputs that the operator
    tab's login and logout events update with :func:`retrain_panel_opened` / :func:`retrain_panel_closed`.
    """
    ui = SimpleNamespace()
    gr.Markdown("#### Retraining")
    with gr.Row(equal_height=False):
        ui.status = gr.Markdown(elem_id="retrain-status", elem_classes="status-line")
        with gr.Column(scale=0, min_width=170):
            ui.retrain_now = gr.Button("Retrain now", variant="primary", elem_id="retrain-now")
            ui.refresh = gr.Button("Refresh status", size="sm")
            ui.decide_held = gr.Button("Decide pending candidates", size="sm", elem_id="retrain-decide-held")
    ui.notice = gr.Markdown(elem_id="retrain-notice", elem_classes="status-line")
    ui.runs = gr.Dataframe(label="Recent retrain runs", interactive=False, max_height=320)
    ui.versions = gr.Dataframe(label="Model versions", interactive=False, max_height=320)
    with gr.Row(equal_height=False):
        with gr.Column():
            ui.report_version = gr.Dropdown(choices=[], value=None, label="Human-eval report of version",
                                            allow_custom_value=True, elem_id="retrain-report-version")
            ui.report_link = gr.Markdown()
            ui.report_file = gr.File(label="Report (HTML)", interactive=False, visible=False)
        with gr.Column():
            ui.rollback_version = gr.Dropdown(choices=[], value=None, label="Roll back to version",
                                              allow_custom_value=True, elem_id="retrain-rollback-version",
                                              info="An earlier promoted version; the app switches to it "
                                                   f"within {RELOAD_POLL_S:.0f} s, no restart.")
            ui.rollback = gr.Button("Roll back", variant="stop")
    ui.timer = gr.Timer(RETRAIN_POLL_S, active=False)
    ui.seen = gr.State(None)  # fingerprint of the status this browser shows

    view = ("status", "runs", "versions", "report_version", "rollback_version", "seen")
    ui.opened_outputs = _components(ui, *view, "timer")
    ui.closed_outputs = _components(ui, "timer", "notice", "report_link", "report_file")
    _listen(ui.refresh.click, functools.partial(retrain_status, services), None, _components(ui, *view),
            api_name="retrain_status", concurrency_limit=4)
    _listen(ui.timer.tick, functools.partial(poll_retrain_status, services), [ui.seen],
            _components(ui, *view), api_name="retrain_poll", api_visibility="undocumented", queue=False,
            show_progress="hidden")
    _listen(ui.retrain_now.click, functools.partial(retrain_now, services), None,
            _components(ui, "notice", *view), api_name="retrain_now", concurrency_id=RETRAIN_EVENTS,
            concurrency_limit=1)
    _listen(ui.decide_held.click, functools.partial(retrain_decide_held, services), None,
            _components(ui, "notice", *view), api_name="retrain_decide_held", concurrency_id=RETRAIN_EVENTS,
            concurrency_limit=1)
    _listen(ui.rollback.click, functools.partial(retrain_rollback, services), [ui.rollback_version],
            _components(ui, "notice", *view), api_name="retrain_rollback", concurrency_id=RETRAIN_EVENTS,
            concurrency_limit=1)
    _listen(ui.report_version.input, functools.partial(retrain_report, services), [ui.report_version],
            _components(ui, "report_file", "report_link"), api_name="retrain_report", concurrency_limit=4)
    return ui


# ---- login routes: plain HTTP beside Gradio ------------------------------------------------------

MAX_LOGIN_BODY = 4096  # bytes; a login is two short strings


def auth_routes(services: AppServices) -> list:
    """``POST /auth/login`` (JSON or form ``user``, ``password``) sets the HttpOnly, SameSite=Strict
    session cookie; ``POST /auth/logout`` ends the session; ``GET /auth/whoami`` says who the cookie is.
    They run outside Gradio's queue (in the server's thread pool), so guesses queued against one account
    never wait in front of another person's login or of anyone's Gradio events."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from urllib.parse import urlsplit

    auth = services.config.auth

    def cross_site(request: HTTPRequest) -> bool:
        origin = request.headers.get("origin")
        return bool(origin) and origin != "null" and urlsplit(origin).netloc != request.headers.get("host")

    async def login(request: HTTPRequest) -> JSONResponse:
        if cross_site(request):
            return JSONResponse({"error": "cross-site login refused"}, status_code=403)
        body = await request.body()
        if len(body) > MAX_LOGIN_BODY:
            return JSONResponse({"error": "request too large"}, status_code=413)
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                fields = json.loads(body or b"{}")
            else:
                from urllib.parse import parse_qs
                fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8")).items()}
            user, password = str(fields.get("user") or ""), str(fields.get("password") or "")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return JSONResponse({"error": "send JSON or a form with 'user' and 'password'"}, status_code=400)
        if not services.login_enabled():
            return JSONResponse({"error": "login is disabled on this server"}, status_code=403)
        result = await run_in_threadpool(services.accounts.login, user, password)
        if not result.ok:
            if result.retry_after_s > 0:
                return JSONResponse({"error": result.message}, status_code=429,
                                    headers={"Retry-After": str(int(result.retry_after_s) + 1)})
            return JSONResponse({"error": result.message}, status_code=403 if "disabled" in result.message else 401)
        response = JSONResponse({"user": result.identity.name, "role": result.identity.role})
        response.set_cookie(SESSION_COOKIE, result.token, max_age=result.max_age_s, path="/", httponly=True,
                            samesite="strict", secure=auth.cookie_secure)
        return response

    async def logout(request: HTTPRequest) -> JSONResponse:
        ended = await run_in_threadpool(services.accounts.logout, request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"logged_out": ended})
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=auth.cookie_secure)
        return response

    async def whoami(request: HTTPRequest) -> JSONResponse:
        who = await run_in_threadpool(services.identity, request)
        if who is None:
            return JSONResponse({"error": "not logged in"}, status_code=401)
        return JSONResponse({"user": who.name, "role": who.role})

    return [Route("/auth/login", login, methods=["POST"]), Route("/auth/logout", logout, methods=["POST"]),
            Route("/auth/whoami", whoami, methods=["GET"])]


# ---- REST API: /api/v1 beside the page (issue 13) ------------------------------------------------
# Plain HTTP + JSON for annotation scripts and integrations, over the same services as the page's
# handlers (AppServices.caption / analyze_meme / store_feedback). Stateless: no Gradio session; an
# item returned by /caption or /memes/analyze is addressed by its ``item_id`` and the ``item_key`` the
# server generated for it (its anonymous session id), so any replica can take the rating. Who is
# asking comes from the login cookie (``mmapp_session``, set by POST /auth/login) or the same token as
# ``Authorization: Bearer``; without either the call is anonymous, as in the page. The per-client
# limits (ClientLimitMiddleware) count /caption and /memes/analyze as uploads, /ratings and
# /corrections as events. Errors are JSON ``{"error": message}`` with a 4xx status.

API_PREFIX = "/api/v1"
API_UPLOAD_PATHS = (f"{API_PREFIX}/caption", f"{API_PREFIX}/memes/analyze")
API_EVENT_PATHS = (f"{API_PREFIX}/ratings", f"{API_PREFIX}/corrections")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Alternative(BaseModel):
    caption: str
    confidence: float


class CaptionOut(BaseModel):
    item_id: int = PydanticField(description="the stored prediction's id: rate or correct it with item_id + item_key")
    item_key: str = PydanticField(description="secret of this item, needed to rate or correct it")
    request_id: str
    caption: str
    alternatives: list[Alternative]
    confidence: float
    low_confidence: bool
    source: str
    model_version: str
    latency_ms: float


class MemeOut(BaseModel):
    item_id: int
    item_key: str
    request_id: str
    text: str = PydanticField(description="the text analysed (OCR, or the text sent)")
    ocr_text: str | None = PydanticField(description="what OCR read; null when the text was sent")
    label: str = PydanticField(description="the predicted label under the ablation")
    ablation: str | None
    fused: dict[str, float]
    image_only: dict[str, float]
    text_only: dict[str, float]
    labels: list[str]
    model_version: str
    latency_ms: float


class RatingIn(BaseModel):
    item_id: int
    item_key: str = PydanticField(max_length=64)
    coherence: int | None = PydanticField(None, ge=1, le=5)
    relevance: int | None = PydanticField(None, ge=1, le=5)
    detail: int | None = PydanticField(None, ge=1, le=5)
    comment: str = ""
    request_id: str | None = PydanticField(None, description="idempotency key; default: derived from the body")


class CorrectionIn(BaseModel):
    item_id: int
    item_key: str = PydanticField(max_length=64)
    field: str = PydanticField(description="caption (caption items); ocr_text or label (meme items)")
    value: str
    request_id: str | None = None


class SavedOut(BaseModel):
    item_id: int
    user: str | None
    rating_id: int | None = None
    correction_id: int | None = None


class HealthOut(BaseModel):
    status: str
    model_version: str


class VersionOut(BaseModel):
    api: str
    model_version: str
    encoders: dict[str, str]
    labels: list[str]
    batching: bool
    batches: dict[str, float] = PydanticField(default_factory=dict, description="micro-batcher counts so far")


def api_identity(services: AppServices, request: Any) -> Identity | None:
    """The login cookie, or the same token as ``Authorization: Bearer``; None = anonymous."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        who = services.accounts.identity(auth[7:].strip())
        if who is None:
            raise ApiError(401, "the bearer token is not a valid session (log in again: POST /auth/login)")
        return who
    return services.identity(request)


async def read_api_upload(services: AppServices, image: UploadFile) -> bytes:
    """The upload's bytes; refused over ``app.max_upload_mb`` (413) or below the disk watermark (507)."""
    limit = services.limits.max_bytes  # a declared Content-Length over it was refused by rest_api's body_limit
    refusal = services.guard.disk.refusal()
    if refusal is not None:
        raise ApiError(507, refusal)
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"the upload is larger than the limit of {limit / 2**20:g} MB")
    return data


def api_item(services: AppServices, item_id: int, item_key: str) -> dict[str, Any]:
    """The prediction an API feedback call is about; 404 unless ``item_key`` is its key."""
    found = services.read(lambda s: repo.prediction_for_feedback(s, item_id))
    if found is None or not hmac.compare_digest(found["session_id"].encode(), item_key.encode()):
        raise ApiError(404, f"there is no item {item_id} with that item_key")
    return found


def api_session(who: Identity | None) -> dict[str, Any]:
    """A fresh anonymous id per API prediction (its ``item_key``) and the account's name, if any."""
    return {"session_id": f"api-{uuid.uuid4().hex}", "user": who.name if who is not None else None}


def api_feedback_key(explicit: str | None, item: dict[str, Any], form: dict[str, Any]) -> str:
    """The explicit idempotency key, else one derived from the item and the body: a retry stores nothing new."""
    return feedback_request_id(explicit, {"feedback_id": f"api{item['id']}"}, form)


def rest_api(services: AppServices) -> "FastAPI":
    """The REST API as a FastAPI app; ``launch_options`` mounts it at ``API_PREFIX``."""
    import anyio
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    # Swagger UI's scripts and styles are served from the fastapi-offline package, not a CDN: the app runs offline
    api = FastAPIOffline(title="mmapp REST API", version="1",
                         description="Caption photos, analyse memes, rate and correct the results. Same models, "
                                     "limits and database as the web page. Errors: JSON {\"error\": message}.",
                         docs_url="/docs", openapi_url="/openapi.json", redoc_url=None, static_url="/docs-assets")
    # Model calls wait here in arrival order (anyio's limiter is first come, first served), not as up to 40
    # threadpool threads racing for AppServices.model_slots: the wait is fair and the p95 close to the p50.
    # Two more than the model slots may be inside, storing a result while the next one computes.
    model_queue = anyio.CapacityLimiter(model_concurrency(services) + 2)

    api.add_middleware(BodyLimitMiddleware, limit_bytes=services.limits.max_bytes)

    @api.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @api.exception_handler(UserInputError)
    async def user_error(_request, exc: UserInputError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @api.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request", "detail": jsonable_errors(exc)},
                            status_code=422)

    @api.get("/health", response_model=HealthOut)
    def health() -> HealthOut:
        return HealthOut(status="ok", model_version=services.predictor.version)

    @api.get("/version", response_model=VersionOut)
    def version() -> VersionOut:
        predictor = services.predictor
        return VersionOut(api="v1", model_version=predictor.version, encoders=predictor.embedder.identity,
                          labels=list(predictor.labels), batching=predictor.image_batcher is not None,
                          batches=batch_counts(predictor))

    @api.post("/caption", response_model=CaptionOut, responses={400: {}, 413: {}, 429: {}, 507: {}})
    async def caption(request: FastRequest, image: UploadFile = File(..., description="JPEG, PNG, WebP, GIF, BMP or TIFF"),
                      request_id: str | None = Form(None)) -> CaptionOut:
        """Caption a photo and store the prediction."""
        data = await read_api_upload(services, image)

        def run() -> Captioned:  # one threadpool hop: who is asking (a database read with a cookie), then the model
            return services.caption(data, request_id=request_id, session=api_session(api_identity(services, request)),
                                    name=image.filename or "upload")

        async with model_queue:
            done = await run_in_threadpool(run)
        r = done.result
        return CaptionOut(item_id=done.stored.prediction_id, item_key=api_item_key(done), request_id=done.stored.request_id,
                          caption=r.caption, confidence=r.confidence, low_confidence=r.low_confidence, source=r.source,
                          alternatives=[Alternative(caption=t, confidence=c) for t, c in r.alternatives],
                          model_version=r.model_version, latency_ms=done.latency_ms)

    @api.post("/memes/analyze", response_model=MemeOut, responses={400: {}, 413: {}, 429: {}, 507: {}})
    async def analyze(request: FastRequest, image: UploadFile = File(...),
                      text: str | None = Form(None, description="the meme's text; default: read with OCR"),
                      use_image: bool = Form(True), use_text: bool = Form(True),
                      request_id: str | None = Form(None)) -> MemeOut:
        """Read a meme's text (OCR, unless sent), predict its label with both modalities and each alone."""
        ablate = ablation_from_toggles(use_image, use_text)
        if text is not None:
            text = services.check_text(text, "meme text").strip()
            if ablate == "image" and not text:
                raise UserInputError("Without the image there is nothing left to analyse: the text is empty.")
        data = await read_api_upload(services, image)

        def run() -> Analysed:
            return services.analyze_meme(data, ablate=ablate, request_id=request_id,
                                         session=api_session(api_identity(services, request)), text=text,
                                         name=image.filename or "upload")

        async with model_queue:
            done = await run_in_threadpool(run)
        r = done.result
        return MemeOut(item_id=done.stored.prediction_id, item_key=api_item_key(done), request_id=done.stored.request_id,
                       text=r.text, ocr_text=r.ocr_text, label=r.label, ablation=r.ablation, fused=r.fused,
                       image_only=r.image_only, text_only=r.text_only, labels=list(r.labels),
                       model_version=r.model_version, latency_ms=done.latency_ms)

    @api.post("/ratings", response_model=SavedOut, responses={400: {}, 404: {}, 429: {}})
    def rate(body: RatingIn, request: FastRequest) -> SavedOut:
        """Rate an item (1-5 on any of coherence, relevance, detail) and/or comment on it."""
        who = api_identity(services, request)
        item = api_item(services, body.item_id, body.item_key)
        scores = {"coherence": body.coherence, "relevance": body.relevance, "detail": body.detail}
        comment = services.check_text(body.comment, "comment").strip()
        if not comment and all(v is None for v in scores.values()):
            raise UserInputError("Nothing to save: send at least one of coherence, relevance, detail or comment.")
        key = api_feedback_key(body.request_id, item, {**scores, "comment": comment})
        saved = services.store_feedback(prediction_id=item["id"], request_id=key, session=api_feedback_session(item, who),
                                        scores=scores, comment=comment, corrections={})
        return SavedOut(item_id=item["id"], user=who.name if who else None, rating_id=saved["rating_id"])

    @api.post("/corrections", response_model=SavedOut, responses={400: {}, 404: {}, 429: {}})
    def correct(body: CorrectionIn, request: FastRequest) -> SavedOut:
        """Correct an item: its caption, or a meme's text (``ocr_text``) or label."""
        who = api_identity(services, request)
        item = api_item(services, body.item_id, body.item_key)
        allowed = {"caption": ("caption",), "meme": ("ocr_text", "label")}[item["kind"]]
        if body.field not in allowed:
            raise UserInputError(f"a {item['kind']} item takes corrections of {' or '.join(allowed)}, "
                                 f"not {body.field!r}")
        value = " ".join(services.check_text(body.value, f"corrected {body.field}").split())
        if not value:
            raise UserInputError("The correction is empty.")
        if body.field == "label" and value not in services.predictor.labels:
            raise UserInputError(f"unknown label {value!r}; choose one of {list(services.predictor.labels)}")
        key = api_feedback_key(body.request_id, item, {body.field: value})
        saved = services.store_feedback(prediction_id=item["id"], request_id=key, session=api_feedback_session(item, who),
                                        scores=dict.fromkeys(repo.RATING_SCORES), comment=None,
                                        corrections={body.field: value})
        return SavedOut(item_id=item["id"], user=who.name if who else None,
                        correction_id=saved[f"{body.field}_correction_id"])

    return api


def batch_counts(predictor: Predictor) -> dict[str, float]:
    """Image-tower batches so far (calls, pictures, mean and largest batch); empty with batching off."""
    if predictor.image_batcher is None:
        return {}
    stats = predictor.image_batcher.stats
    return {"batches": stats.batches, "calls": stats.items, "mean_size": round(stats.mean_size, 2),
            "largest": stats.largest}


def api_item_key(done: Captioned | Analysed) -> str:
    """An API item's key is the anonymous session id stored with it (``api-<uuid4>``, made by the server)."""
    return done.stored.session_id


def api_feedback_session(item: dict[str, Any], who: Identity | None) -> dict[str, Any]:
    """Feedback on an API item is stored under the item's own anonymous id, with the caller's account."""
    return {"session_id": item["session_id"], "user": who.name if who is not None else None}


def jsonable_errors(exc: Exception) -> list[dict[str, Any]]:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder([{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()])


def rest_mount(demo: gr.Blocks | None) -> list:
    """The REST API of ``demo`` (from :func:`build_app`) as a route mounted at ``API_PREFIX``; none without a demo."""
    from starlette.routing import Mount

    api = getattr(demo, "mmapp_rest_api", None)
    return [Mount(API_PREFIX, app=api)] if api is not None else []


def set_serving_threads(config: Config) -> None:
    """Intra-op threads per model call (``app.torch_threads``; 0 keeps torch's default, one per core).
    On the shared 2-core machine one thread made a lone image-tower call ~17x faster (0.12 s vs ~2 s),
    but the served throughput halved: the process then got about half the CPU share (docs/results.md,
    "Load test (issue 13)"), so the default stays torch's."""
    import torch

    if config.app.torch_threads > 0:
        torch.set_num_threads(config.app.torch_threads)


def model_concurrency(services: AppServices) -> int:
    """Model requests (page events and API calls) that run at once: ``app.concurrency_limit``, or while the
    predictor micro-batches (``model.batch_images``) ``app.batched_concurrency_limit``, so batches can form."""
    app_config = services.config.app
    if services.predictor.image_batcher is not None:
        return max(app_config.concurrency_limit, app_config.batched_concurrency_limit)
    return app_config.concurrency_limit


# ---- launch ---------------------------------------------------------------------------------------

def launch_options(config: Config, demo: gr.Blocks | None = None, *, guard: ClientGuard | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch`` that every way of serving the app shares. Pass the
    ``demo`` from :func:`build_app` to serve its login routes (/auth/...; without them nobody can log in)
    and its per-client HTTP limits and disk watermark (``demo.client_guard``; default: from config)."""
    guard = guard or getattr(demo, "client_guard", None) or ClientGuard.from_config(config)
    exports_dir = config.paths.exports  # export_feedback creates it on first use
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                           font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    return {"server_name": config.app.host, "server_port": config.app.port,
            "max_file_size": config.app.max_upload_mb * 2**20,
            "allowed_paths": [str(exports_dir)],
            "enable_monitoring": False, "ssr_mode": False, "footer_links": ["api"], "theme": theme, "css": CSS,
            "show_error": False,
            "app_kwargs": {"middleware": [Middleware(ClientLimitMiddleware, guard=guard)],
                           "routes": list(getattr(demo, "mmapp_auth_routes", [])) + rest_mount(demo)},
            **({"root_path": config.app.root_path} if config.app.root_path else {})}  # docs/deploy.md


def warn_if_no_operator(config: Config) -> None:
    if operator_credentials_configured(config):
        return
    banner = "!" * 78
    message = ("WARNING: no operator credentials are set, so the Operator page is disabled.\n"
               "Set MMAPP_OPERATOR_USER and MMAPP_OPERATOR_PASSWORD (or app.operator_user/operator_password).")
    log.warning("no operator credentials configured; the operator page is disabled")
    print(f"\n{banner}\n{message}\n{banner}\n", file=sys.stderr, flush=True)


def build_predictor(config: Config, engine: Engine, towers: Towers) -> Predictor:
    """The predictor serving the registry's current version (see :func:`build_serving`)."""
    return build_serving(config, engine, towers)[0]


def build_serving(config: Config, engine: Engine, towers: Towers, *,
                  on_reload: Callable[[str], None] | None = None) -> tuple[Predictor, ModelWatcher]:
    """The predictor and the watcher that keeps it on the registry's current version.

    Builds and promotes the bootstrap model on a fresh machine (or when the registry's current version
    is missing from disk and nothing else was ever promoted). A current version that is on disk but
    fails its sha256 check or does not load is not served: the last good promoted version is, with a
    warning in the log and on the operator page (the registry is not changed)."""
    from mmapp.pipeline import bank_from_items, build_bootstrap

    store = ModelStore(config.paths.models)
    version = adopt_store_current(engine, store)  # an install from before the registry keeps its version
    predictor = Predictor.from_config(config, version=BRIDGE, towers=towers, caption_bank=bank_from_items(config))
    watcher = ModelWatcher(predictor, engine, on_reload=on_reload)
    if version is not None and watcher.serve_best() is not None:
        predictor.add_to_caption_bank(accepted_caption_corrections(engine))
        return predictor, watcher
    if version is not None and store.exists(version):
        log.error("no model version could be loaded (%s); serving the zero-training bridge", watcher.failure_reasons)
        return predictor, watcher
    if version is not None:
        log.warning("model version %r is current but missing from %s; building the bootstrap model", version,
                    store.root)
    bootstrap_once(config, engine, store, lambda: build_bootstrap(config, towers, version="bootstrap", progress=True))
    watcher.failed.clear()
    watcher.serve_best()
    predictor.add_to_caption_bank(accepted_caption_corrections(engine))
    return predictor, watcher


def bootstrap_once(config: Config, engine: Engine, store: ModelStore, build: Callable[[], Any]) -> None:
    """Build (``build()``) and promote the bootstrap model unless the registry's current version is on disk.
    Replicas starting together on a fresh shared home take turns on a file lock under the models folder:
    the first builds, the others find its promoted version when they get the lock and build nothing."""
    with exclusive_file_lock(store.root / BOOTSTRAP_LOCK_FILE):
        current = current_version_name(engine)
        if current is not None and store.exists(current):
            log.info("model version %r was made current by another replica while we waited", current)
            return
        print("[app] no model version yet: building the bootstrap model (first start only)", flush=True)
        if not store.exists("bootstrap"):
            build()
        promote_saved_version(config, "bootstrap", reason="first start", engine=engine)


def start_worker_child(config: Config, engine: Engine) -> WorkerSupervisor | None:
    """The retrain worker this app supervises (restarted when it dies; it stops by itself if this process
    is SIGKILLed), or None when ``retrain.worker_in_app`` is off and the worker runs elsewhere. Several
    replicas may each start one: one scheduler fires (a lease) and one worker takes each request (a claim)."""
    if not config.retrain.worker_in_app:
        log.info("retrain.worker_in_app is off: this app starts no retrain worker; run `python -m retrain worker`")
        return None
    return WorkerSupervisor(worker_argv(config.profile, parent_pid=os.getpid()), engine).start()


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a service manager's stop) ends ``launch()`` like Ctrl-C, so ``main`` can clean up."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Serve the mmapp web page.")
    parser.add_argument("--host", help="interface to bind (default from config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default from config: 7860)")
    parser.add_argument("--profile", help="config profile: offline (default), clip or blip")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline stack never fetches from a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes, one line each
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # two lines per lease heartbeat otherwise
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = load_config(args.profile, app=overrides)
    warn_if_no_operator(config)
    engine = make_engine(config.storage.resolved_database_url)
    init_db(engine)  # migration 0003 masks secrets older versions stored in the database
    scrub_home(config)  # ... and in manifests / meta.json files under the home
    blobstore = BlobStore(config.paths.uploads)
    set_serving_threads(config)
    towers = Towers.from_config(config)

    def on_reload(version: str) -> None:
        predictor.add_to_caption_bank(accepted_caption_corrections(engine))

    predictor, watcher = build_serving(config, engine, towers, on_reload=on_reload)

    retrain_features = functools.partial(TowerFeatureSource, towers, config)  # the towers already loaded
    scheduler, worker = None, None
    if check_runner(config) == "worker":  # training (and housekeeping) happen in a child process, never in this one
        worker = start_worker_child(config, engine)
    else:
        scheduler = start_scheduler(config, engine, features_factory=retrain_features,
                                    housekeeping=functools.partial(run_housekeeping, config, engine, blobstore))
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        demo = build_app(config, predictor, engine, blobstore, scheduler=scheduler, retrain_features=retrain_features,
                         watcher=watcher)
        print(f"[app] serving model {predictor.version!r} on http://{config.app.host}:{config.app.port}; "
              f"retrain schedule {config.retrain.cron!r} run by "
              + (f"the retrain worker (pid {worker.proc.pid})" if worker else
                 "a retrain worker started elsewhere" if config.retrain.runner == "worker" else "this process"),
              flush=True)
        demo.launch(**launch_options(config, demo))
    finally:  # hands the scheduler lease on at once instead of after its TTL; stops the worker
        if scheduler is not None:
            scheduler.shutdown()
        if worker is not None:
            worker.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
