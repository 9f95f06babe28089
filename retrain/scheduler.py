"""Triggers: the nightly cron (APScheduler 3.11) and the operator's "retrain now".

Every app process may start a scheduler; exactly one of them fires. They compete for a leader
lease in the database (renewed by a heartbeat job, taken over when the leader dies), and the
leader additionally claims each cron slot in ``scheduler_state`` before running it, so even two
leaders for a moment cannot run one slot twice. When a process becomes leader it looks at the
last slot that fired: if a scheduled slot was missed (every process was down), it runs once for
the latest missed slot, however many were missed. A first start with no history runs nothing.
"""
from __future__ import annotations

import functools
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy

from retrain.housekeeping import run_housekeeping
from retrain.job import RunOutcome, drive, new_owner, run_retrain, start_run

log = logging.getLogger(__name__)

RunFn = Callable[[str], Any]  # run_fn(trigger) -> anything; trigger is "schedule"
_MAX_LOOKBACK = timedelta(days=400)


SCHEDULE_NAME = "retrain"  # the scheduler_state row for the cron slots
LEASE_NAME = "retrain-scheduler"  # the leader lease (knobs: config.scheduler)


def cron_trigger(expr: str, timezone_name: Optional[str] = None) -> CronTrigger:
    """A crontab expression (5 fields: minute hour day month day-of-week), or 6 fields with seconds
    first (for tests and demos: ``"*/2 * * * * *"``). Day-of-week names (mon..sun) are safest:
    APScheduler numbers weekdays from Monday = 0, unlike cron."""
    fields = expr.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(expr, timezone=timezone_name)
    if len(fields) == 6:
        second, minute, hour, day, month, dow = fields
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=dow,
                           timezone=timezone_name)
    raise ValueError(f"cron expression must have 5 fields (or 6 with seconds first), got {len(fields)}: {expr!r}")


def latest_slot(trigger: CronTrigger, now: datetime) -> Optional[datetime]:
    """The most recent fire time at or before ``now`` (UTC), or None within the last 400 days."""
    now = now.astimezone(timezone.utc)
    first = trigger.get_next_fire_time(None, now)
    if first is None:
        return None
    second = trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
    step = (second - first) if second is not None else timedelta(days=1)
    lookback = max(step * 2, timedelta(seconds=2))
    while lookback <= _MAX_LOOKBACK:
        t = trigger.get_next_fire_time(None, now - lookback)
        if t is not None and t <= now:
            last = t
            while True:
                nxt = trigger.get_next_fire_time(last, last + timedelta(microseconds=1))
                if nxt is None or nxt > now:
                    return last.astimezone(timezone.utc)
                last = nxt
        lookback *= 2
    return None


class RetrainScheduler:
    """One process' scheduler; only the lease holder fires. Use :func:`start_scheduler`."""

    def __init__(self, config, engine: Engine, run_fn: RunFn, *, owner: Optional[str] = None,
                 housekeeping: Optional[Callable[[], Any]] = None):
        self.config, self.engine, self.run_fn, self.settings = config, engine, run_fn, config.scheduler
        self.housekeeping = housekeeping  # retention jobs (retrain.housekeeping.run_housekeeping)
        self.owner = owner or new_owner()
        self.trigger = cron_trigger(config.retrain.cron, self.settings.timezone or None)
        self.is_leader = False
        self._aps: Optional[BackgroundScheduler] = None
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "RetrainScheduler":
        aps = BackgroundScheduler(timezone=self.trigger.timezone)
        aps.add_job(self.heartbeat, IntervalTrigger(seconds=self.settings.heartbeat_s), id="lease",
                    next_run_time=datetime.now(timezone.utc), max_instances=1, coalesce=True)
        # Missed slots are handled by catch_up (once, from the database), not by APScheduler's misfire logic.
        aps.add_job(self.fire, self.trigger, id="retrain", max_instances=1, coalesce=True, misfire_grace_time=30)
        if self.housekeeping is not None:  # every process, leader or not: exports and uploads are local files
            aps.add_job(self._housekeep, IntervalTrigger(seconds=self.settings.housekeeping_s), id="housekeeping",
                        max_instances=1, coalesce=True)
        aps.start()
        self._aps = aps
        return self

    def shutdown(self) -> None:
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None
        if self.is_leader:
            def release() -> None:
                with Session(self.engine) as s, s.begin():
                    repo.release_lock(s, LEASE_NAME, self.owner)
            try:
                retry_on_busy(release)
            except Exception:
                log.exception("could not release the scheduler lease (it expires on its own)")
            self.is_leader = False

    @property
    def next_run_time(self) -> Optional[datetime]:
        job = self._aps.get_job("retrain") if self._aps is not None else None
        return job.next_run_time if job is not None else self.trigger.get_next_fire_time(None, datetime.now(timezone.utc))

    # --- jobs -----------------------------------------------------------------------------
    def _housekeep(self) -> None:
        try:
            self.housekeeping()
        except Exception:  # the next interval tries again
            log.exception("housekeeping failed")

    def heartbeat(self, now: Optional[datetime] = None) -> bool:
        """Take or renew the leader lease; a process that just became leader catches up."""
        def take() -> bool:
            with Session(self.engine) as s, s.begin():
                return repo.try_acquire_lock(s, LEASE_NAME, self.owner, self.settings.lease_ttl_s, now=now)
        try:
            held = retry_on_busy(take)
        except Exception:
            log.exception("scheduler heartbeat failed")
            held = False
        became = held and not self.is_leader
        self.is_leader = held
        if became:
            log.info("retrain scheduler %s is the leader", self.owner)
            self.catch_up(now)
        return held

    def catch_up(self, now: Optional[datetime] = None) -> bool:
        """Run once for the latest slot if it was missed; returns whether a run was started."""
        now = now or datetime.now(timezone.utc)
        slot = latest_slot(self.trigger, now)
        if slot is None:
            return False

        def check() -> str:
            with Session(self.engine) as s, s.begin():
                last = repo.get_scheduler_state(s, SCHEDULE_NAME)
                if last is None:  # first start ever: remember where we are, run nothing
                    repo.claim_scheduled_slot(s, SCHEDULE_NAME, slot)
                    return "initialised"
                return "missed" if last < slot else "up to date"
        state = retry_on_busy(check)
        if state != "missed":
            return False
        log.info("retrain slot %s was missed; running it once now", slot.isoformat())
        if self._aps is not None:  # do not block the heartbeat job with a long run
            self._aps.add_job(self._run_slot, args=[slot], id=f"catch-up-{slot.isoformat()}", replace_existing=True)
            return True
        return self._run_slot(slot)

    def fire(self, now: Optional[datetime] = None) -> bool:
        """The cron job: only the leader, and only the first claimant of the slot, runs it."""
        if not self.is_leader:
            return False
        slot = latest_slot(self.trigger, now or datetime.now(timezone.utc))
        return slot is not None and self._run_slot(slot)

    def _run_slot(self, slot: datetime) -> bool:
        def claim() -> bool:
            with Session(self.engine) as s, s.begin():
                return repo.claim_scheduled_slot(s, SCHEDULE_NAME, slot)
        if not retry_on_busy(claim):
            return False
        log.info("retrain scheduler %s fires for slot %s", self.owner, slot.isoformat())
        try:
            self.run_fn("schedule")
        except Exception:  # the run records its own failure; the scheduler keeps going
            log.exception("scheduled retrain for %s failed", slot.isoformat())
        return True



def start_scheduler(config, engine: Engine, run_fn: Optional[RunFn] = None, *,
                    features_factory=None, housekeeping: Optional[Callable[[], Any]] = None) -> RetrainScheduler:
    """Start this process' scheduler (for ``app.py``); call ``.shutdown()`` on exit.

    ``run_fn(trigger)`` runs a retrain; by default :func:`retrain.job.run_retrain` with a feature
    source from ``features_factory()`` (or towers built from ``config``)."""
    if run_fn is None:
        def run_fn(trigger: str) -> RunOutcome:
            features = features_factory() if features_factory is not None else None
            return run_retrain(config, engine, trigger=trigger, features=features)
    if housekeeping is None:
        housekeeping = functools.partial(run_housekeeping, config, engine)
    return RetrainScheduler(config, engine, run_fn, housekeeping=housekeeping).start()


def trigger_now(config, engine: Engine, *, trigger: str = "operator", features=None, features_factory=None,
                wait: bool = False, force: bool = True) -> dict[str, Any]:
    """Start a retrain now, in a background thread, unless one is running anywhere.

    Returns at once with ``{"started": bool, "run_id": int, "message": str}`` (the lease is taken
    before returning, so two simultaneous clicks give one run); with ``wait=True`` it blocks and adds
    ``"outcome"``. ``force`` runs even below ``retrain.min_new_items``."""
    handle = start_run(config, engine, trigger=trigger)
    if isinstance(handle, RunOutcome):
        return {"started": False, "run_id": handle.run_id, "message": handle.message}
    result: dict[str, Any] = {"started": True, "run_id": handle.run_id, "message": f"retrain run {handle.run_id} started"}

    def work() -> None:
        result["outcome"] = drive(handle, config, features=features, features_factory=features_factory,
                                  force=force).to_dict()

    thread = threading.Thread(target=work, name=f"retrain-run-{handle.run_id}", daemon=True)
    thread.start()
    if wait:
        thread.join()
    return result
