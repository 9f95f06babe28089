"""Command line for the flywheel: a thin layer over :mod:`retrain.api`, :mod:`retrain.job` and
:mod:`retrain.scheduler` (``python -m retrain --help``).

  python -m retrain worker         the retrain worker: nightly scheduler + operators' "retrain now" (python app.py starts it)
  python -m retrain run            run the nightly scheduler in the foreground (a separate scheduler process)
  python -m retrain run --now      retrain once now and print the outcome
  python -m retrain status [--json]
  python -m retrain rollback VERSION
  python -m retrain report [VERSION]
  python -m retrain accounts list | create NAME --role trusted|rater|operator | set NAME ROLE |
                             disable NAME | enable NAME | unlock NAME | password NAME   (rater accounts)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _setup(args):
    from feedback_db.engine import init_db, make_engine
    from mmapp.config import load_config
    from mmapp.scrub import scrub_home

    overrides = {"storage": {"home": args.home}} if args.home else {}
    config = load_config(args.profile, **overrides)
    engine = make_engine(config.storage.resolved_database_url)
    init_db(engine)  # migration 0003 masks secrets older versions stored in the database
    scrub_home(config)  # ... and in manifests / meta.json files under the home
    return config, engine


def cmd_run(args) -> int:
    config, engine = _setup(args)
    if args.now:
        from retrain.job import run_retrain

        outcome = run_retrain(config, engine, trigger="cli", force=True)
        if args.json:
            print(json.dumps(outcome.to_dict(), default=str))
        else:
            print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.1f} s: {outcome.message}")
            if outcome.report and "html" in outcome.report:
                print(f"report: {outcome.report['html']}")
        return {"failed": 1, "busy": 2}.get(outcome.status, 0)

    from retrain.scheduler import start_scheduler

    scheduler = start_scheduler(config, engine)
    print(f"retrain scheduler running ({config.retrain.cron!r}, next {scheduler.next_run_time}); Ctrl-C stops it",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    scheduler.shutdown()
    return 0


def cmd_worker(args) -> int:
    from retrain.worker import RetrainWorker, lower_priority, serve_until_signalled

    config, engine = _setup(args)
    lower_priority(config.retrain.worker_nice)
    serve_until_signalled(RetrainWorker(config, engine, parent_pid=args.exit_with_parent))
    return 0


def cmd_status(args) -> int:
    from retrain.api import retrain_status

    config, engine = _setup(args)
    status = retrain_status(config, engine)
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    print(f"current version: {status['current_version']}")
    sched = status["schedule"]
    print(f"schedule: {sched['cron']}  next {sched['next_run_time']}  last slot {sched['last_slot']}  "
          f"leader {sched['leader']}")
    running = status["running"]
    if running:
        print(f"RUNNING run {running['id']} ({running['trigger']}): {running['progress']:.0%} {running['message']}")
    print("recent runs:")
    for r in status["recent_runs"]:
        print(f"  #{r['id']:<4} {r['status']:<9} {r['trigger']:<8} {r['started_at'][:19]}  "
              f"{r['candidate_version'] or '-':<24} {r['message'][:90]}")
    print("versions:")
    for v in status["versions"]:
        print(f"  {'*' if v['is_current'] else ' '} {v['version']:<24} {v['status']:<9} parent {v['parent_version']}")
    return 0


def cmd_rollback(args) -> int:
    from retrain.api import rollback

    config, engine = _setup(args)
    result = rollback(config, engine, args.version)
    print(f"current version: {result['current_version']} (was {result['previous']})")
    return 0


def cmd_report(args) -> int:
    from retrain.report import build_report

    config, engine = _setup(args)
    paths = build_report(config, engine, version=args.version)
    print(f"{paths['html']}\n{paths['json']}")
    return 0


def cmd_decide_held(args) -> int:
    from retrain.blind import decide_held

    config, engine = _setup(args)
    decisions = decide_held(config, engine)
    for d in decisions:
        print(f"{d.version}: {d.action}: {d.reason}")
    if not decisions:
        print("no candidate is held for blind evaluation")
    return 0


def cmd_accounts(args) -> int:
    """Rater accounts (docs/security.md "Accounts and sessions"). A new password is generated and printed
    once, or read from stdin with --password-stdin (never from the command line, which shells keep)."""
    from feedback_db.accounts import Accounts, AuthPolicy, generate_password

    config, engine = _setup(args)
    accounts = Accounts(engine, AuthPolicy.from_config(config.auth))
    password = sys.stdin.readline().rstrip("\n") if getattr(args, "password_stdin", False) else None
    if args.action == "list":
        for a in accounts.list_accounts():
            state = "disabled" if a["disabled"] else f"locked until {a['locked_until']}" if a["locked_until"] else "ok"
            print(f"{a['name']:<24} {a['role']:<9} {state:<30} failed {a['failed_logins']}  "
                  f"last login {a['last_login_at'] or '-'}")
    elif args.action == "create":
        who, password = accounts.create(args.name, args.role, password, created_by="cli")
        print(f"created {who.name} ({who.role})" + ("" if args.password_stdin else f"; password: {password}"))
    elif args.action == "set":
        accounts.update(args.name, role=args.role)
        print(f"{args.name}: role {args.role}; open sessions ended")
    elif args.action in ("disable", "enable"):
        accounts.update(args.name, disabled=args.action == "disable")
        print(f"{args.name}: {args.action}d")
    elif args.action == "unlock":
        accounts.unlock(args.name)
        print(f"{args.name}: unlocked")
    elif args.action == "password":
        new = password or generate_password()
        accounts.update(args.name, password=new)
        print(f"{args.name}: new password" + ("" if password else f": {new}") + "; open sessions ended")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="config profile (default: $MMAPP_PROFILE or offline)")
    parser.add_argument("--home", default=None, help="data folder (default: config storage.home)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the scheduler in the foreground, or retrain once with --now")
    p.add_argument("--now", action="store_true", help="retrain once now (even below retrain.min_new_items)")
    p.add_argument("--json", action="store_true", help="with --now: print the outcome as one JSON object")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("worker", help="the retrain worker: nightly schedule and operators' requests (python app.py starts it)")
    p.add_argument("--exit-with-parent", type=int, metavar="PID",
                   help="stop when process PID is gone (python app.py passes its own pid)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("status", help="current version, running and recent runs, schedule")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("rollback", help="make an earlier promoted version current")
    p.add_argument("version")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("report", help="write the human-eval report of a version (default: the current one)")
    p.add_argument("version", nargs="?")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("decide-held", help="promote or reject candidates held for blind evaluation (retrain.blind_required)")
    p.set_defaults(func=cmd_decide_held)
    p = sub.add_parser("accounts", help="rater accounts: list, create, set role, disable/enable, unlock, password")
    acc = p.add_subparsers(dest="action", required=True)
    acc.add_parser("list", help="every account with its role and lock state")
    q = acc.add_parser("create", help="a new account; prints its generated password once")
    q.add_argument("name")
    q.add_argument("--role", choices=("trusted", "rater", "operator"), default="trusted")
    q.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    q = acc.add_parser("set", help="change an account's role (its open sessions end)")
    q.add_argument("name")
    q.add_argument("role", choices=("trusted", "rater", "operator"))
    for action in ("disable", "enable", "unlock"):
        acc.add_parser(action).add_argument("name")
    q = acc.add_parser("password", help="a new password (generated and printed once, or from stdin)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=cmd_accounts)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
