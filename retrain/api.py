"""What the operator page (and the CLI) call: trigger a retrain, read its status, list reports, roll back.

Plain functions over a config and an engine; every return value is JSON-able (datetimes as ISO
strings). No UI code here: the page renders these dicts.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Optional

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from feedback_db.models import ModelVersion, RetrainRun
from mmapp.model_store import ModelStore

from retrain import report as _report
from retrain.promotion import adopt_store_current, current_version_name, rollback_version
from retrain.scheduler import LEASE_NAME, SCHEDULE_NAME, cron_trigger, trigger_now

__all__ = ["trigger_retrain", "retrain_status", "list_reports", "rollback", "current_version_name"]


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def run_as_dict(run: RetrainRun) -> dict[str, Any]:
    stats = run.stats or {}
    gate = stats.get("gate") or {}
    return {"id": run.id, "trigger": run.trigger, "status": run.status, "progress": run.progress,
            "message": run.message, "stage": stats.get("stage"), "candidate_version": run.candidate_version,
            "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
            "heartbeat_at": _iso(run.heartbeat_at), "owner": run.owner, "report_path": run.report_path,
            "selection": stats.get("selection"), "cleaning": stats.get("cleaning"),
            "gate_reason": gate.get("reason"), "stage_seconds": stats.get("stage_seconds")}


def version_as_dict(row: ModelVersion) -> dict[str, Any]:
    return {"version": row.version, "status": row.status, "is_current": row.is_current,
            "parent_version": row.parent_version, "created_at": _iso(row.created_at),
            "promoted_at": _iso(row.promoted_at), "report_path": row.report_path}


def trigger_retrain(config, engine: Engine, *, features_factory: Optional[Callable[[], Any]] = None,
                    features: Any = None) -> dict[str, Any]:
    """The operator's "retrain now": starts in the background and returns at once with
    ``{"started", "run_id", "message"}``; poll :func:`retrain_status` for progress and the result.
    Pass the app's feature source (``features`` or ``features_factory``) to reuse its loaded towers."""
    from retrain.worker import check_runner, request_run

    if check_runner(config) == "worker":  # the web process never trains: a worker takes the request
        return request_run(engine)
    out = trigger_now(config, engine, trigger="operator", features=features, features_factory=features_factory)
    return {k: v for k, v in out.items() if k != "outcome"}


def retrain_status(config, engine: Engine, *, scheduler=None, limit: int = 10) -> dict[str, Any]:
    """Current version, the running run (progress, stage, message), recent runs, versions, the
    schedule and the reports. ``scheduler``: this process' RetrainScheduler, if any."""
    def read() -> dict[str, Any]:
        with Session(engine) as s, s.begin():
            runs = repo.recent_retrain_runs(s, limit=limit)
            current = repo.current_version(s)
            last_slot = repo.get_scheduler_state(s, SCHEDULE_NAME)
            leader = repo.lock_holder(s, LEASE_NAME)
            return {
                "current_version": current.version if current is not None else None,
                "running": next((run_as_dict(r) for r in runs if r.status == "running"), None),
                "recent_runs": [run_as_dict(r) for r in runs],
                "versions": [version_as_dict(v) for v in repo.list_versions(s)],
                "schedule": {"cron": config.retrain.cron, "last_slot": _iso(last_slot),
                             "leader": leader.owner if leader is not None else None},
            }
    status = retry_on_busy(read)
    if scheduler is not None:
        status["schedule"]["next_run_time"] = _iso(scheduler.next_run_time)
    else:
        nxt = cron_trigger(config.retrain.cron, config.scheduler.timezone or None).get_next_fire_time(None, datetime.now(timezone.utc))
        status["schedule"]["next_run_time"] = _iso(nxt)
    status["reports"] = list_reports(config)[:limit]
    if config.retrain.runner == "worker":
        from retrain.worker import pending_request

        status["pending_request"] = _iso(pending_request(engine))
    return status


def list_reports(config) -> list[dict[str, Any]]:
    """Human-eval reports on disk, newest first: ``{"version", "html", "json", "written_at"}``."""
    return _report.list_reports(config)




def rollback(config, engine: Engine, version: Optional[str] = None) -> dict[str, Any]:
    """Make an earlier promoted ``version`` current (default: the previous one). The app picks it up
    from the registry without a restart. Returns ``{"previous", "current_version"}``."""
    store = ModelStore(config.paths.models)
    adopt_store_current(engine, store)
    previous = current_version_name(engine)
    now = rollback_version(engine, store, version)
    return {"previous": previous, "current_version": now}
