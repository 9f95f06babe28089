"""Replicas: two ``python app.py`` processes on one database and one MMAPP_HOME serve together.

The process test runs on PostgreSQL when ``MMAPP_TEST_POSTGRES_URL`` is set (a throwaway database on
that server), else on one SQLite file in the shared home. It starts both replicas at once on a fresh
database, checks that one scheduler leads, that a promotion reaches both, then keeps raters on both
while it SIGKILLs one replica's retrain worker and then the other replica itself: the survivor keeps
serving, the dead replica's worker stops by itself, the survivor's worker takes the scheduler lease
over, and every rating acknowledged before, during and after the kills is in the database exactly once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import init_db, make_engine
from feedback_db.models import Rating
from mmapp.model_store import ModelStore
from retrain.scheduler import LEASE_NAME

from tests.app.conftest import (PHOTOS, REPO, TEST_VERSION, build_tiny_model, free_port, make_config,
                                wait_until_served, worker_pids)
from tests.feedback_db.backends import POSTGRES_URL_ENV, PostgresDatabases

NEW_VERSION = "test-replica-v2"


def test_replicas_starting_together_on_a_fresh_home_build_the_bootstrap_once(predictor, tmp_path):
    """Two replicas' first start at once: one builds and promotes, the other waits and builds nothing."""
    import app as webapp

    config = make_config(tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'mmapp.db'}")
    init_db(engine)
    store = ModelStore(config.paths.models)
    builds, barrier = [], threading.Barrier(2)

    def build() -> None:
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other replica to be waiting on the lock
        build_tiny_model(predictor, store, "bootstrap")

    def replica() -> None:
        barrier.wait()
        webapp.bootstrap_once(config, engine, store, build)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(replica) for _ in range(2)]:
            future.result(timeout=60)
    assert len(builds) == 1
    with Session(engine) as s:
        assert repo.current_version(s).version == "bootstrap"
        assert [v.version for v in repo.list_versions(s)] == ["bootstrap"]
    webapp.bootstrap_once(config, engine, store, build)  # a later start: nothing to do
    assert len(builds) == 1
    engine.dispose()


def test_worker_in_app_off_starts_no_worker_child(tmp_path):
    """A replica with ``MMAPP__RETRAIN__WORKER_IN_APP=false`` serves without a worker (one runs elsewhere)."""
    import app as webapp
    from mmapp.config import load_config

    config = load_config("offline", env={"MMAPP_HOME": str(tmp_path), "MMAPP__RETRAIN__WORKER_IN_APP": "false"})
    assert config.retrain.worker_in_app is False and load_config("offline", env={}).retrain.worker_in_app is True
    assert webapp.start_worker_child(config, make_engine(f"sqlite:///{tmp_path / 'mmapp.db'}")) is None
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def _write_shared(root: str, seed: int, rounds: int) -> None:
    """One replica's writes: the same uploads and cache entries every other writer writes, over and over."""
    import numpy as np

    from feedback_db.blobstore import BlobStore
    from mmapp.cache import EmbeddingCache

    blobs, cache = BlobStore(Path(root) / "uploads"), EmbeddingCache(Path(root) / "cache")
    for r in range(rounds):
        for i in range(8):
            data = bytes([i]) * (200_000 + i)  # big enough that a torn write would show
            blobs.put(data, "jpg")
            cache.put("enc@1", f"{i:064x}", {"image": np.full(4096, i, dtype=np.float32)})


def _read_shared(root: str, stop_after_s: float) -> int:
    """A reader on another replica: whatever exists must be whole. Returns how many reads it checked."""
    import hashlib

    import numpy as np

    from mmapp.cache import EmbeddingCache

    cache, checked, deadline = EmbeddingCache(Path(root) / "cache"), 0, time.monotonic() + stop_after_s
    while time.monotonic() < deadline:
        for path in (Path(root) / "uploads").rglob("*.jpg"):
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == path.stem, f"torn upload {path}"
            checked += 1
        for i in range(8):
            entry = cache.get("enc@1", f"{i:064x}")
            if entry is not None:
                assert entry["image"].shape == (4096,) and np.all(entry["image"] == i), f"torn cache entry {i}"
                checked += 1
    return checked


def test_concurrent_replicas_never_see_a_torn_upload_or_cache_entry(tmp_path):
    """Four writer processes store the same uploads and embedding-cache entries into one home while
    two reader processes read them: every read is whole, and no temp file is left behind."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # separate processes (own file descriptors), started in milliseconds
    with ctx.Pool(6) as pool:
        readers = [pool.apply_async(_read_shared, (str(tmp_path), 3.0)) for _ in range(2)]
        writers = [pool.apply_async(_write_shared, (str(tmp_path), seed, 5)) for seed in range(4)]
        for w in writers:
            w.get(timeout=120)
        checked = sum(r.get(timeout=120) for r in readers)
    assert checked > 0
    assert len(list((tmp_path / "uploads").rglob("*.jpg"))) == 8
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 8
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left


def _database_url(home: Path):
    """(url, cleanup) on the Postgres test server if there is one, else a SQLite file in the shared home."""
    server = os.environ.get(POSTGRES_URL_ENV)
    if not server:
        return f"sqlite:///{home / 'mmapp.db'}", lambda: None
    databases = PostgresDatabases(server)
    return databases.create(), databases.close


def _start(home: Path, url: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAPP")}
    env.update(MMAPP_HOME=str(home), MMAPP_DATABASE_URL=url, PYTHONUNBUFFERED="1",
               MMAPP__SCHEDULER__LEASE_TTL_S="3", MMAPP__SCHEDULER__HEARTBEAT_S="1",
               MMAPP__RETRAIN__WORKER_POLL_S="0.5",
               # every test client comes from 127.0.0.1: lift the per-client abuse limits
               MMAPP__APP__EVENTS_PER_MINUTE="1000000", MMAPP__APP__EVENT_BURST="100000")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _leader_pid(engine) -> int | None:
    with Session(engine) as s:
        holder = repo.lock_holder(s, LEASE_NAME)
    return int(holder.owner.split(":")[1]) if holder is not None else None


def _wait(condition, what: str, timeout_s: float, logs=()) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s} s\n" + "\n".join(p.read_text()[-2000:] for p in logs))
        time.sleep(0.2)
    print(f"  {time.monotonic() - started:5.1f} s  {what}")


class Rater(threading.Thread):
    """One browser session on one replica: a caption, then ratings back to back until told to stop.
    Keeps the request ids the server acknowledged (the call returned) and every one it sent."""

    def __init__(self, url: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.sent, self.acked, self.ack_times, self.error = [], [], [], None

    def run(self) -> None:
        try:
            client = Client(self.url, verbose=False, download_files=False, analytics_enabled=False)
            client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                self.sent.append(request_id)
                client.predict(4, 3, 2, "", f"replica rating {request_id[:8]}", request_id, api_name="/rate_caption")
                self.acked.append(request_id)
                self.ack_times.append(time.monotonic())
        except Exception as exc:  # the replica was killed under it: what it acknowledged still counts
            self.error = exc


@pytest.mark.server
def test_two_replicas_serve_together_and_a_sigkilled_one_loses_nothing(predictor, app_home, tmp_path):
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "embeddings").symlink_to(app_home / "cache" / "embeddings", target_is_directory=True)
    store = ModelStore(home / "models")  # this test's own models: it promotes one, the session's stay as they are
    shutil.copytree(app_home / "models" / TEST_VERSION, store.path(TEST_VERSION))
    store.set_current(TEST_VERSION)
    build_tiny_model(predictor, store, NEW_VERSION, seed=2)
    url, drop_database = _database_url(home)
    logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
    (a, url_a), (b, url_b) = _start(home, url, logs[0]), _start(home, url, logs[1])  # at once, on an empty database
    engine = None
    try:
        started = time.monotonic()
        for proc, served, log in ((a, url_a, logs[0]), (b, url_b, logs[1])):
            wait_until_served(proc, served, log, timeout_s=240)
        print(f"\n  {time.monotonic() - started:5.1f} s  both replicas serve")
        engine = make_engine(url)
        _wait(lambda: all(worker_pids(log) for log in logs), "both replicas started a retrain worker", 30, logs)
        worker_a, worker_b = worker_pids(logs[0])[0], worker_pids(logs[1])[0]
        _wait(lambda: _leader_pid(engine) in (worker_a, worker_b), "one worker leads the scheduler", 30, logs)

        # A promotion through the registry reaches both replicas (each polls it every few seconds).
        with Session(engine) as s, s.begin():
            repo.register_version(s, version=NEW_VERSION, path=str(store.path(NEW_VERSION)),
                                  sha256=store.weights_sha256(NEW_VERSION))
            repo.promote(s, NEW_VERSION)
        clients = {u: Client(u, verbose=False, download_files=False, analytics_enabled=False) for u in (url_a, url_b)}
        served = lambda u: clients[u].predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")[4]
        _wait(lambda: all(served(u)["model_version"] == NEW_VERSION for u in clients), "both replicas serve the promoted version", 30, logs)

        stop = threading.Event()
        raters = [Rater(u, stop) for u in (url_a, url_b) for _ in range(3)]
        on_a, on_b = raters[:3], raters[3:]
        for rater in raters:
            rater.start()
        _wait(lambda: sum(len(r.acked) for r in raters) >= 20, "20 ratings acknowledged", 60, logs)

        os.kill(worker_b, signal.SIGKILL)  # B's retrain worker dies: B's web goes on, its supervisor restarts it
        time.sleep(1.0)
        acked_b = sum(len(r.acked) for r in on_b)
        _wait(lambda: sum(len(r.acked) for r in on_b) >= acked_b + 5, "B serves on after its worker died", 30, logs)

        os.kill(a.pid, signal.SIGKILL)  # replica A dies mid-load
        killed_at = time.monotonic()
        a.wait(timeout=10)
        _wait(lambda: not _alive(worker_a), "A's orphaned worker stops by itself", 45, logs)  # it waits for its DB writes (lease release)
        _wait(lambda: sum(t > killed_at + 0.5 for r in on_b for t in r.ack_times) >= 10,
              "B acknowledges 10 ratings after A died", 60, logs)
        _wait(lambda: len(worker_pids(logs[1])) == 2, "B's supervisor restarts its worker", 30, logs)
        new_worker_b = worker_pids(logs[1])[1]
        _wait(lambda: _leader_pid(engine) == new_worker_b, "the survivor's worker takes the scheduler lease", 30, logs)
        stop.set()
        for rater in raters:
            rater.join(timeout=60)
        assert all(r.error is None for r in on_b), [r.error for r in on_b]
        assert all(r.error is not None for r in on_a)  # each of A's raters saw A die

        acked = [rid for r in raters for rid in r.acked]
        sent = {rid for r in raters for rid in r.sent}
        with Session(engine) as s:
            rows = s.execute(select(Rating.request_id, func.count()).group_by(Rating.request_id)).all()
            per_comment = set(s.scalars(select(func.count()).select_from(Rating).group_by(Rating.comment)))
        stored = {key.removesuffix(":rating"): n for key, n in rows}  # the app keys a form's rating '<id>:rating'
        assert per_comment == {1}  # no rating stored twice under another key either
        assert len(acked) == len(set(acked))
        assert not [rid for rid in acked if stored.get(rid) != 1]  # zero lost, zero duplicated
        assert set(stored) <= sent and set(stored.values()) == {1}  # nothing else, nothing twice
        print(f"\n{len(acked)} acknowledged ratings ({sum(len(r.acked) for r in on_a)} on A before its SIGKILL), "
              f"{len(stored)} stored, {len(sent - set(stored))} sent but never stored (in flight at the kill)")
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if engine is not None:
            engine.dispose()
        drop_database()
    assert b.returncode == 0, logs[1].read_text()[-3000:]
    for log in logs:
        for pid in worker_pids(log):
            assert not _alive(pid), f"retrain worker {pid} outlived its app"


def test_root_path_for_a_proxy_path_prefix_reaches_gradio():
    """``app.root_path`` (docs/deploy.md, a path prefix behind nginx) is passed to Gradio's launch; unset, nothing is."""
    import app as webapp
    from mmapp.config import load_config

    assert "root_path" not in webapp.launch_options(load_config("offline", env={}))
    prefixed = load_config("offline", env={"MMAPP__APP__ROOT_PATH": "/mmapp"})
    assert webapp.launch_options(prefixed)["root_path"] == "/mmapp"
