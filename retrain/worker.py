"""The retrain worker: the one process that trains, so the web process never shares its cores with a run.

``python -m retrain worker`` (``python app.py`` starts it as a child and restarts it if it dies) runs
the nightly scheduler (one leader fires across every worker) and picks up the operator's "retrain
now" requests from the database. A request is a timestamp in ``scheduler_state``
(:func:`request_run`); the first worker to claim it (:func:`take_request`, the same atomic claim the
cron slots use) runs it, so one click gives one run however many workers there are.
The towers are loaded on the first run, not at start. No UI here.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from typing import Callable, Optional

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from mmapp.config import Config

from retrain.job import RunOutcome, running_run_id, run_retrain

log = logging.getLogger(__name__)

REQUEST_NAME = "retrain-request"  # scheduler_state row: when an operator last asked for a run
HANDLED_NAME = "retrain-request-handled"  # the latest request a worker has claimed
RUNNERS = ("worker", "in-process")


def check_runner(config: Config) -> str:
    """``retrain.runner``, checked with the worker's settings, so ``python app.py`` refuses a bad one at start
    instead of a worker child failing (and being restarted) over and over."""
    if config.retrain.runner not in RUNNERS:
        raise ValueError(f"retrain.runner must be one of {list(RUNNERS)}, got {config.retrain.runner!r}")
    _check_nice(config.retrain.worker_nice)
    return config.retrain.runner


def _check_nice(nice: int) -> int:
    if nice < 0:
        raise ValueError(f"retrain.worker_nice must be >= 0 (raising priority needs privileges), got {nice}")
    return nice


def request_run(engine: Engine) -> dict:
    """The operator's "retrain now" in worker mode: record the request for a worker to take.
    Returns ``{"started", "run_id", "message"}`` like :func:`retrain.scheduler.trigger_now`."""
    running = running_run_id(engine)
    if running is not None:
        return {"started": False, "run_id": running, "message": f"a retrain is already running (run {running})"}

    def write() -> datetime:
        now = datetime.now(timezone.utc)
        with Session(engine) as s, s.begin():
            repo.set_scheduler_state(s, REQUEST_NAME, now)
        return now
    at = retry_on_busy(write)
    return {"started": True, "run_id": None, "requested_at": at.isoformat(),
            "message": "retrain requested: the retrain worker starts it within seconds"}


def take_request(engine: Engine) -> bool:
    """Claim the latest unhandled request; True for exactly one caller per request."""
    def claim() -> bool:
        with Session(engine) as s, s.begin():
            requested = repo.get_scheduler_state(s, REQUEST_NAME)
            return requested is not None and repo.claim_scheduled_slot(s, HANDLED_NAME, requested)
    return retry_on_busy(claim)


def pending_request(engine: Engine) -> Optional[datetime]:
    """When the latest request was made, if no worker has taken it yet."""
    def read() -> Optional[datetime]:
        with Session(engine) as s, s.begin():
            requested = repo.get_scheduler_state(s, REQUEST_NAME)
            handled = repo.get_scheduler_state(s, HANDLED_NAME)
            return requested if requested is not None and (handled is None or handled < requested) else None
    return retry_on_busy(read)


class RetrainWorker:
    """Polls for requests and runs the scheduler; each run happens on its own thread, so a stop
    request is answered at once (the run in flight is recorded as failed, its lease released)."""

    def __init__(self, config: Config, engine: Engine, *, features_factory: Optional[Callable] = None,
                 parent_pid: Optional[int] = None):
        self.config, self.engine = config, engine
        self.parent_pid = parent_pid  # stop when this process is gone (the app that started us was SIGKILLed)
        self._features_factory = features_factory
        self._towers = None
        self._run_lock = threading.Lock()
        self.stop = threading.Event()
        self.scheduler = None

    def features(self):
        """A feature source over towers loaded once (on the first run) and kept for the next ones."""
        if self._features_factory is not None:
            return self._features_factory()
        from mmapp.towers import Towers
        from retrain.features import TowerFeatureSource

        if self._towers is None:
            self._towers = Towers.from_config(self.config)
        return TowerFeatureSource(self._towers, self.config)

    def run(self, trigger: str) -> Optional[RunOutcome]:
        with self._run_lock:  # the scheduler's cron and a request never overlap in one worker
            return run_retrain(self.config, self.engine, trigger=trigger, features=self.features(),
                               force=trigger == "operator")

    def poll_once(self) -> bool:
        """Start a run for a pending request; returns whether one was taken."""
        if not take_request(self.engine):
            return False
        log.info("retrain worker %d takes an operator's request", os.getpid())
        threading.Thread(target=self._run_logged, args=("operator",), name="retrain-request", daemon=True).start()
        return True

    def decide_held(self) -> list:
        """Promote or reject candidates held for blind evaluation once their votes are in (retrain.blind)."""
        from retrain.blind import decide_held

        if not self._run_lock.acquire(blocking=False):  # a run is going: decide after it, not beside it
            return []
        try:
            return decide_held(self.config, self.engine)
        finally:
            self._run_lock.release()

    def orphaned(self) -> bool:
        """True once the app that started this worker has died without stopping it (SIGKILL, OOM kill):
        we were re-parented. An orphan would keep the scheduler lease alive for a replica that no longer
        serves, and a restarted app would start a second worker beside it."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _run_logged(self, trigger: str) -> None:
        try:
            outcome = self.run(trigger)
            if outcome is not None:
                log.info("retrain run %s: %s (%s)", outcome.run_id, outcome.status, outcome.message)
        except Exception:  # the run records its own failure; the worker keeps going
            log.exception("retrain run failed")

    def serve(self) -> None:
        from retrain.scheduler import start_scheduler

        self.scheduler = start_scheduler(self.config, self.engine, self.run)
        log.info("retrain worker %d ready (schedule %r, next %s)", os.getpid(), self.config.retrain.cron,
                 self.scheduler.next_run_time)
        try:
            while not self.stop.wait(self.config.retrain.worker_poll_s):
                if self.orphaned():
                    log.warning("retrain worker %d: its app (pid %d) is gone; stopping", os.getpid(), self.parent_pid)
                    break
                try:
                    self.poll_once()
                    self.decide_held()
                except Exception:  # a database hiccup: try again next poll
                    log.exception("retrain worker poll failed")
        finally:
            self.scheduler.shutdown()
            owner = f"{socket.gethostname()}:{os.getpid()}:"
            with Session(self.engine) as s, s.begin():  # a run still in flight dies with this process
                n = repo.fail_runs_of_dead_owner(s, owner, message="the retrain worker was stopped during the run")
            if n:
                log.warning("retrain worker stopped during a run; the run is marked failed")


class WorkerSupervisor:
    """Keeps one ``python -m retrain worker`` child alive for ``python app.py``: restarts it when it
    dies (backing off), and frees what a dead child held so a new run can start at once."""

    def __init__(self, argv: list[str], engine: Engine, *, restart_after_s: float = 5.0,
                 env: Optional[dict] = None):
        self.argv, self.engine, self.restart_after_s = argv, engine, restart_after_s
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="retrain-worker-supervisor", daemon=True)

    def start(self) -> "WorkerSupervisor":
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL)
        log.info("started the retrain worker (pid %d)", self.proc.pid)

    def _watch(self) -> None:
        while not self._stop.is_set():
            code = self.proc.wait()
            if self._stop.is_set():
                return
            log.error("the retrain worker (pid %d) exited with %s; restarting in %.0f s", self.proc.pid, code,
                      self.restart_after_s)
            try:
                with Session(self.engine) as s, s.begin():
                    repo.fail_runs_of_dead_owner(s, f"{socket.gethostname()}:{self.proc.pid}:",
                                                 message=f"the retrain worker died (exit {code}) during the run")
            except Exception:
                log.exception("could not release what the dead retrain worker held (it expires on its own)")
            if self._stop.wait(self.restart_after_s):
                return
            self.restarts += 1
            self._spawn()

    def shutdown(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker_argv(profile: Optional[str], *, parent_pid: Optional[int] = None) -> list[str]:
    """The command line of a worker child; with ``parent_pid`` it stops when that process dies."""
    return [sys.executable, "-m", "retrain", *(["--profile", profile] if profile else []), "worker",
            *(["--exit-with-parent", str(parent_pid)] if parent_pid is not None else [])]


def lower_priority(nice: int) -> int:
    """Lower this process' CPU priority by ``nice`` (``retrain.worker_nice``; 0 = unchanged); the new niceness.
    Training then uses the cores the web process leaves idle instead of competing with its requests."""
    niceness = os.nice(_check_nice(nice))
    if nice:
        log.info("retrain worker %d runs at niceness %d", os.getpid(), niceness)
    return niceness


def serve_until_signalled(worker: RetrainWorker) -> None:
    """Run ``worker`` in this (main) thread until SIGTERM or Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    try:
        worker.serve()
    except KeyboardInterrupt:
        worker.stop.set()
