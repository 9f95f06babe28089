"""Per-client limits and the free-disk watermark of the web server (issue 11, item 2; docs/security.md).

A client is a keyed hash (HMAC-SHA256 with a random per-process key) of its address: the address itself
is never kept, the hashes live in memory only and mean nothing after a restart. ``ClientLimitMiddleware``
is ASGI middleware in front of Gradio's routes: uploads (``POST /gradio_api/upload``) and API calls
(queue joins, ``/run``, ``/call``) each draw from a token bucket per client, uploads also from a rolling
daily quota; over a limit the answer is HTTP 429 with ``Retry-After``. Below the free-disk watermark
uploads get HTTP 507 while every other call (ratings, corrections) goes on. No model, no database here.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

log = logging.getLogger("mmapp.guard")

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
                log.warning("free disk space %.0f MB under %s is below the %.0f MB watermark: refusing uploads",
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
    if path.endswith("/gradio_api/upload") or path == "/upload":
        return UPLOADS
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


async def _plain(send, status: int, message: str, *, retry_after: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"60"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
