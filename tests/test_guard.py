"""app.py per-client limits: token buckets per keyed client hash, daily quota, trusted proxies, eviction, the watermark."""
from __future__ import annotations

import pytest

from app import EVENTS, UPLOADS, Budget, ClientLimiter, DiskGuard, request_kind


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def limiter(clock, **kw):
    return ClientLimiter({UPLOADS: Budget(per_minute=60, burst=5, per_day=8), EVENTS: Budget(per_minute=600, burst=2)},
                         clock=clock, **kw)


def test_burst_then_rate_then_daily_quota():
    clock = Clock()
    lim = limiter(clock)
    a = lim.client_id("203.0.113.7")
    assert [lim.check(a, UPLOADS) for _ in range(5)] == [None] * 5
    assert "too many uploads" in lim.check(a, UPLOADS)
    clock.now += 1.0  # 60/min refills one per second
    assert lim.check(a, UPLOADS) is None and lim.check(a, UPLOADS) is not None
    clock.now += 10.0
    assert [lim.check(a, UPLOADS) for _ in range(2)] == [None, None]  # 8 used today
    clock.now += 10.0
    assert "daily limit of 8 uploads" in lim.check(a, UPLOADS)
    clock.now += 86_400
    assert lim.check(a, UPLOADS) is None
    b = lim.client_id("198.51.100.9")
    assert lim.check(b, UPLOADS) is None  # another client has its own bucket


def test_the_address_is_hashed_with_a_per_process_key():
    clock = Clock()
    one, two = limiter(clock), limiter(clock)
    assert one.client_id("203.0.113.7") == one.client_id("203.0.113.7") != two.client_id("203.0.113.7")
    assert "203.0.113.7" not in one.client_id("203.0.113.7")


def test_forwarded_for_counts_only_from_a_trusted_proxy():
    lim = limiter(Clock(), trusted_proxies=("10.0.0.1",))
    assert lim.client_id("10.0.0.1", "1.2.3.4, 203.0.113.7") == lim.client_id("203.0.113.7")
    assert lim.client_id("198.51.100.9", "203.0.113.7") == lim.client_id("198.51.100.9")  # spoofed header ignored


def test_least_recently_seen_clients_are_evicted():
    lim = limiter(Clock(), max_clients=3)
    for i in range(10):
        lim.check(lim.client_id(f"198.51.100.{i}"), EVENTS)
    assert len(lim._buckets) == 3


def test_disk_watermark_and_routes():
    free = {"n": 10 * 2**30}
    disk = DiskGuard(["/nonexistent/deep/path"], 2**30, free_space=lambda p: free["n"])
    assert disk.refusal() is None
    free["n"] = 2**20
    assert "low on disk space" in disk.refusal() and "Ratings" in disk.refusal()
    assert request_kind("POST", "/gradio_api/upload") == UPLOADS
    assert request_kind("POST", "/gradio_api/queue/join") == EVENTS
    assert request_kind("POST", "/gradio_api/call/caption") == EVENTS
    assert request_kind("GET", "/gradio_api/queue/data") is None


def test_a_budget_must_make_sense():
    with pytest.raises(ValueError):
        Budget(per_minute=0, burst=1)
