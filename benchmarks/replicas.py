"""One process vs two replicas on one Postgres and one MMAPP_HOME, in one run (issue 13, item 3).

Starts a throwaway PostgreSQL (``.ci/postgres.sh``; or uses ``--database-url``), a fresh home whose
``models`` and embedding cache are links to the built ones (``var/``), then:

1. one ``python app.py`` (port P1), driven by Locust's ``StressRater`` (benchmarks/locustfile.py: one
   gradio_client session per user, photo -> caption -> rating, no think time) with ``--users`` users;
2. a second ``python app.py`` (port P2) on the same database and home, and two Locust processes, one
   per replica, with half the users each (a sticky proxy would split sessions the same way).

Every completed pair is appended by the locustfile to one file per phase (``MMAPP_LOCUST_PAIRS``), so
pairs/s, p50 and p95 are computed over both Locust processes together, after a warm-up cut. Every
rating each phase acknowledged is then counted in the database. Prints one JSON object (and
``--out`` writes it). On a 2-core machine two replicas share the same two cores: the number to read is
the ratio, measured minutes apart under the same machine load (note ``uptime`` beside it).

    python benchmarks/replicas.py --users 50 --duration 60 --out /tmp/replicas.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LIFTED_LIMITS = {  # all Locust users come from 127.0.0.1: lift the per-client abuse limits (docs/security.md)
    "MMAPP__APP__UPLOADS_PER_MINUTE": "1e6", "MMAPP__APP__UPLOAD_BURST": "1000000", "MMAPP__APP__UPLOADS_PER_DAY": "0",
    "MMAPP__APP__EVENTS_PER_MINUTE": "1e6", "MMAPP__APP__EVENT_BURST": "1000000",
    "MMAPP__APP__QUEUE_MAX_SIZE": "1000",
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_home(root: Path, built_home: Path) -> Path:
    """A fresh home (database, uploads) whose models and embedding cache are links to the built ones."""
    home = root / "home"
    (home / "cache").mkdir(parents=True)
    if not (built_home / "models" / "current.json").is_file():
        sys.exit(f"no built model under {built_home / 'models'}: run `python -m mmapp bootstrap` first")
    (home / "models").symlink_to((built_home / "models").resolve(), target_is_directory=True)
    embeddings = built_home / "cache" / "embeddings"
    if embeddings.is_dir():
        (home / "cache" / "embeddings").symlink_to(embeddings.resolve(), target_is_directory=True)
    return home


def start_replica(home: Path, database_url: str, log: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAPP")}
    env.update(MMAPP_HOME=str(home), MMAPP_DATABASE_URL=database_url, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               **LIFTED_LIMITS, **extra_env)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_served(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            sys.exit(f"replica exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"replica did not start in {timeout_s} s:\n{log.read_text()[-3000:]}")


def run_locust(hosts: list[str], users: int, duration_s: int, pairs_file: Path, logs: Path, *,
               user_class: str = "StressRater", locust_env: dict[str, str] | None = None) -> float:
    """One Locust process per host, started together, ``users`` split evenly; waits for all and
    returns when they were started (``time.time()``). ``user_class``: Locust user classes, space-separated."""
    started = time.time()
    procs = []
    for i, host in enumerate(hosts):
        n = users // len(hosts) + (1 if i < users % len(hosts) else 0)
        env = {**os.environ, "MMAPP_LOCUST_PAIRS": str(pairs_file), **(locust_env or {})}
        with open(logs / f"locust-{pairs_file.stem}-{i}.log", "w") as out:
            procs.append(subprocess.Popen(
                ["locust", "-f", str(REPO / "benchmarks" / "locustfile.py"), "--headless", "-u", str(n),
                 "-r", str(max(1, n)), "-t", f"{duration_s}s", "--host", host, "--only-summary", *user_class.split()],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(timeout=duration_s + 120)
    return started


def summarise(pairs_file: Path, *, started: float, duration_s: float, warmup_s: float) -> dict:
    """pairs/s, p50, p95 over all Locust processes of a phase: the pairs that completed between
    ``warmup_s`` after the start and the end of the load (ramp-up and connection set-up left out)."""
    rows = []
    for line in pairs_file.read_text().splitlines() if pairs_file.exists() else []:
        at, name, ms, ok = line.split("\t")
        rows.append((float(at), float(ms), ok == "1"))
    start, end = started + warmup_s, started + duration_s
    window = [r for r in rows if start <= r[0] <= end]
    if not window:
        return {"pairs_ok": 0, "all_pairs_ok": sum(r[2] for r in rows)}
    ok = sorted(r[1] for r in window if r[2])
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [ok[0]] * 99 if ok else [float("nan")] * 99
    return {"pairs_ok": len(ok), "pairs_failed": sum(not r[2] for r in window), "window_s": round(end - start, 1),
            "pairs_per_s": round(len(ok) / max(end - start, 1e-9), 2), "p50_ms": round(q[49]), "p95_ms": round(q[94]),
            "all_pairs_ok": sum(r[2] for r in rows)}


def count_ratings(database_url: str) -> int:
    sys.path.insert(0, str(REPO))
    from sqlalchemy.orm import Session

    from feedback_db import repository as repo
    from feedback_db.engine import make_engine

    engine = make_engine(database_url)
    try:
        with Session(engine) as s:
            return len(repo.ratings_with_outputs(s))
    finally:
        engine.dispose()


def forget_load_test_images(home: Path, database_url: str) -> int:
    """Take back what a load test left in the built home: the embedding and OCR cache entries of its photos
    (``make_home`` links the cache to ``var/``, so each run would add thousands of entries for pictures
    nobody will send again) and its uploads. Returns the cache entries removed."""
    sys.path.insert(0, str(REPO))
    from sqlalchemy.orm import Session

    from feedback_db import repository as repo
    from feedback_db.engine import make_engine
    from mmapp.cache import EmbeddingCache
    from mmapp.paths import Paths

    engine = make_engine(database_url)
    try:
        with Session(engine) as s:
            digests = repo.upload_digests(s)
    finally:
        engine.dispose()
    paths = Paths(home)
    removed = sum(EmbeddingCache(paths.embeddings).forget(sha) for sha in digests)
    shutil.rmtree(paths.uploads, ignore_errors=True)
    return removed


def load_test_arguments(parser: argparse.ArgumentParser, *, warmup_s: float) -> None:
    """The options every load-test script here takes (also benchmarks/throughput.py)."""
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load per phase")
    parser.add_argument("--warmup", type=float, default=warmup_s, help="seconds of each phase left out of the figures")
    parser.add_argument("--built-home", type=Path, default=REPO / "var", help="where the built model and cache are")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    load_test_arguments(parser, warmup_s=20.0)
    parser.add_argument("--database-url", default="", help="default: a throwaway Postgres from .ci/postgres.sh")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mmapp-replicas-"))
    pg_dir = Path(tempfile.gettempdir()) / f"mmapp-replicas-pg-{os.getpid()}"  # not in `work`: mkdtemp is 0700, postgres runs as another user
    database_url = args.database_url
    if not database_url:
        database_url = subprocess.run(["bash", str(REPO / ".ci" / "postgres.sh")], env={**os.environ, "MMAPP_PG_DIR": str(pg_dir)},
                                      check=True, capture_output=True, text=True).stdout.strip()
    home = make_home(work, args.built_home)
    replicas: list[subprocess.Popen] = []
    result: dict = {"users": args.users, "duration_s": args.duration, "warmup_s": args.warmup,
                    "database": database_url.split("://")[0], "cpus": os.cpu_count(),
                    "load_before": os.getloadavg()}
    try:
        a, url_a = start_replica(home, database_url, work / "replica-a.log", {})
        replicas.append(a)
        result["start_s_first"] = round(wait_served(a, url_a, work / "replica-a.log"), 1)
        started = run_locust([url_a], args.users, args.duration, work / "one.tsv", work)
        result["one_process"] = summarise(work / "one.tsv", started=started, duration_s=args.duration,
                                          warmup_s=args.warmup)
        result["load_after_one"] = os.getloadavg()

        b, url_b = start_replica(home, database_url, work / "replica-b.log", {})
        replicas.append(b)
        result["start_s_second"] = round(wait_served(b, url_b, work / "replica-b.log"), 1)
        started = run_locust([url_a, url_b], args.users, args.duration, work / "two.tsv", work)
        result["two_replicas"] = summarise(work / "two.tsv", started=started, duration_s=args.duration,
                                           warmup_s=args.warmup)
        result["load_after_two"] = os.getloadavg()

        one, two = result["one_process"], result["two_replicas"]
        if one.get("pairs_per_s") and two.get("pairs_per_s"):
            result["throughput_ratio_two_vs_one"] = round(two["pairs_per_s"] / one["pairs_per_s"], 2)
        acknowledged = one.get("all_pairs_ok", 0) + two.get("all_pairs_ok", 0)
        result["ratings_in_db"] = count_ratings(database_url)
        result["pairs_acknowledged"] = acknowledged  # each ok pair ended in an acknowledged rating
    finally:
        for proc in replicas:
            proc.terminate()
        for proc in replicas:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            result["cache_entries_removed"] = forget_load_test_images(home, database_url)
        finally:
            if not args.database_url:
                subprocess.run(["bash", str(REPO / ".ci" / "postgres.sh"), "stop"],
                               env={**os.environ, "MMAPP_PG_DIR": str(pg_dir)}, capture_output=True)
    result["logs"] = str(work)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
