"""Caption+rating throughput of one process, the code path before issue 13 against today's, in one run.

Each phase starts a fresh ``python app.py`` on SQLite in a fresh home (models and embedding cache
linked from ``var/``, per-client limits lifted) and drives it with 50 Locust users without think time
(benchmarks/locustfile.py), one phase after the other, each after a cool-down (``--cooldown``: load
average below 1), and takes back its photos' cache entries when it ends:

* ``before``: the page's path: a ``gradio_client`` session per user (``StressRater``) and the image
  tower in eager torch (``MMAPP__MODEL__IMAGE_RUNTIME=torch``);
* ``gradio``: the same clients against today's defaults (onnxruntime tower);
* ``rest``: today's defaults through the REST API (``RestStressRater``);
* ``rest_retrain``: as ``rest``, with the operator pressing "Retrain now" when the warm-up ends (the
  retrain worker is a separate process on the same cores); the runs' times are in the JSON.

Pairs that completed in the first ``--warmup`` seconds are left out. Prints one JSON object with
pairs/s, p50/p95 per phase, the server's CPU seconds per pair and the ratios against ``before``; the
load generator shares the machine (its CPU is in the JSON too).

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --duration 60 --out /tmp/throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicas import (REPO, forget_load_test_images, load_test_arguments, make_home, run_locust,  # noqa: E402
                      start_replica, summarise, wait_served)

OPERATOR = {"MMAPP_OPERATOR_USER": "operator", "MMAPP_OPERATOR_PASSWORD": "throughput-bench-operator-pw"}
PHASES = {  # name: (Locust user classes, server environment)
    "before": ("StressRater", {"MMAPP__MODEL__IMAGE_RUNTIME": "torch"}),
    "gradio": ("StressRater", {}),
    "rest": ("RestStressRater", {}),
    # the operator presses "Retrain now" after the warm-up; the load's own anonymous corrections are let
    # into cleaning (rule open) so the worker goes through features, cleaning, training and evaluation
    "rest_retrain": ("RestStressRater RetrainTrigger", {**OPERATOR, "MMAPP__RETRAIN__ANONYMOUS_RULE": "open"}),
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children: the retrain worker idles apart)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def retrain_runs(home: Path, started: float) -> list[dict]:
    """The phase's retrain runs: status and start / end in seconds after the load started."""
    from datetime import timezone

    from sqlalchemy.orm import Session

    sys.path.insert(0, str(REPO))
    from feedback_db import repository as repo
    from feedback_db.engine import make_engine

    def since(stamp) -> float | None:
        return None if stamp is None else round(stamp.replace(tzinfo=timezone.utc).timestamp() - started, 1)

    engine = make_engine(f"sqlite:///{home / 'mmapp.db'}")
    try:
        with Session(engine) as s:
            runs = sorted(repo.recent_retrain_runs(s, limit=20), key=lambda r: r.id)
            return [{"id": r.id, "status": r.status, "started_s": since(r.started_at),
                     "finished_s": since(r.finished_at)} for r in runs]
    finally:
        engine.dispose()


def run_phase(name: str, work: Path, built_home: Path, users: int, duration_s: int, warmup_s: float,
              server_env: dict[str, str] | None = None) -> dict:
    user_class, env = PHASES[name]
    env = {**(server_env or {}), **env}  # a phase's own settings win: "before" must stay the old path
    home = make_home(work / name, built_home)
    (home / "models").unlink()  # a copy, not the link make_home made: a retrain here may promote a version
    shutil.copytree(built_home / "models", home / "models", symlinks=True)
    for shared in ("datasets", "corpus", "weights"):  # what a retrain reads besides the model (replay pairs, towers)
        if (built_home / shared).is_dir():
            (home / shared).symlink_to((built_home / shared).resolve(), target_is_directory=True)
    log = work / f"{name}-server.log"
    proc, url = start_replica(home, f"sqlite:///{home / 'mmapp.db'}", log, env)
    try:
        start_s = wait_served(proc, url, log)
        time.sleep(2)
        cpu0, load0, locust0 = cpu_seconds(proc.pid), os.getloadavg()[0], children_cpu_seconds()
        pairs = work / f"{name}.tsv"
        retraining = "RetrainTrigger" in user_class
        started = run_locust([url], users + retraining, duration_s, pairs, work, user_class=user_class,
                             locust_env={**OPERATOR, "LOCUST_RETRAIN_AFTER_S": str(warmup_s)} if retraining else None)
        cpu = cpu_seconds(proc.pid) - cpu0
        out = summarise(pairs, started=started, duration_s=duration_s, warmup_s=warmup_s)
        out.update(client=user_class, server_env=env, start_s=round(start_s, 1), load_before=round(load0, 2),
                   load_after=round(os.getloadavg()[0], 2), server_cpu_s=round(cpu, 1),
                   server_cpu_ms_per_pair=round(1e3 * cpu / max(out.get("all_pairs_ok", 0), 1), 1),
                   locust_cpu_s=round(children_cpu_seconds() - locust0, 1))
        if retraining:
            out["retrain_runs"] = retrain_runs(home, started)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
        removed = forget_load_test_images(home, f"sqlite:///{home / 'mmapp.db'}")
        print(f"[throughput] {name}: removed its photos' {removed} cache entries and its uploads", file=sys.stderr)


def cool_down(max_s: float) -> None:
    """Let the previous phase's processes exit and the machine settle (1-minute load average below 1, at most
    ``max_s``), so every phase starts from the same quiet machine whatever its place in the order."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and os.getloadavg()[0] >= 1.0:
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    load_test_arguments(parser, warmup_s=15.0)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {list(PHASES)}")
    parser.add_argument("--cooldown", type=float, default=60.0,
                        help="seconds at most to wait between phases for the 1-minute load average to fall below 1")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every phase's server (e.g. MMAPP__APP__TORCH_THREADS=1); repeatable")
    args = parser.parse_args(argv)
    bad = [kv for kv in args.server_env if "=" not in kv]
    if bad:
        parser.error(f"--server-env takes KEY=VALUE, got {bad}")
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; valid: {list(PHASES)}")

    work = Path(tempfile.mkdtemp(prefix="mmapp-throughput-"))
    result: dict = {"users": args.users, "duration_s": args.duration, "warmup_s": args.warmup, "cpus": os.cpu_count()}
    for i, name in enumerate(phases):
        if i:
            cool_down(args.cooldown)
        result[name] = run_phase(name, work, args.built_home, args.users, args.duration, args.warmup, server_env)
        print(f"[throughput] {name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)
    if result.get("rest", {}).get("p95_ms") and result.get("rest_retrain", {}).get("p95_ms"):
        result["p95_rest_retrain_vs_rest"] = round(result["rest_retrain"]["p95_ms"] / result["rest"]["p95_ms"], 2)
    base = result.get("before", {}).get("pairs_per_s")
    for name in phases:
        if base and name != "before" and result[name].get("pairs_per_s"):
            result[f"ratio_{name}_vs_before"] = round(result[name]["pairs_per_s"] / base, 2)
    result["logs"] = str(work)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
