"""Cost of ``PRAGMA synchronous=FULL`` (the app's setting) against NORMAL for feedback writes on SQLite/WAL.

    python benchmarks/sqlite_sync.py            # 400 ratings per mode, 1 and 4 writer threads, 3 rounds
    python benchmarks/sqlite_sync.py -n 1000 --json

Each rating is one transaction exactly as the app writes it (``repository.record_rating`` in
``BEGIN IMMEDIATE`` through ``make_engine``), on a fresh database file per mode in the same folder
(a temporary folder under ``--dir``, default the system's temp folder). Modes alternate within each round so
disk cache and noise hit both alike; the table shows ratings/s (median of rounds, min-max) and the
ratio FULL/NORMAL from the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy.orm import Session  # noqa: E402

from feedback_db import repository as repo  # noqa: E402
from feedback_db.engine import init_db, make_engine  # noqa: E402


def prepare(path: Path, synchronous: str):
    engine = make_engine(f"sqlite:///{path}", synchronous=synchronous)
    init_db(engine)
    with Session(engine) as s, s.begin():
        repo.record_upload(s, sha256="ab" * 32, relpath=f"ab/{'ab' * 32}.png", format="png", width=8, height=8, n_bytes=8)
        pid = repo.record_prediction(s, request_id="p", kind="caption", image_sha256="ab" * 32, model_version="v",
                                     outputs={"caption": "a cat"}, latency_ms=1.0, session_id="bench").id
    return engine, pid


def rate(engine, pid: int, n: int, threads: int, tag: str) -> float:
    """ratings/s for ``n`` ratings written by ``threads`` threads, one transaction each."""
    per = n // threads

    def worker(t: int) -> None:
        for i in range(per):
            with Session(engine) as s, s.begin():
                repo.record_rating(s, request_id=f"{tag}-{t}-{i}", prediction_id=pid, session_id="bench",
                                   coherence=1 + i % 5, comment="fine")

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return per * threads / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="ratings per mode, thread count and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dir", default=None, help="folder (disk) the databases are created on (default: the temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-sync-") as tmp:
        engines = {mode: prepare(Path(tmp) / f"{mode}.db", mode) for mode in ("NORMAL", "FULL")}
        for threads in args.threads:
            for r in range(args.rounds):
                for mode, (engine, pid) in engines.items():
                    results.setdefault(threads, {}).setdefault(mode, []).append(
                        rate(engine, pid, args.n, threads, f"{threads}-{r}"))
        for engine, _ in engines.values():
            engine.dispose()
    rows = []
    for threads, by_mode in results.items():
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        rows.append({"threads": threads, **{f"{m}_per_s": round(med[m], 1) for m in med},
                     **{f"{m}_range": [round(min(v), 1), round(max(v), 1)] for m, v in by_mode.items()},
                     "full_over_normal": round(med["FULL"] / med["NORMAL"], 3)})
    if args.json:
        print(json.dumps({"n": args.n, "rounds": args.rounds, "dir": args.dir, "rows": rows}, indent=2))
        return 0
    print(f"ratings/s, SQLite WAL, {args.n} ratings x {args.rounds} rounds per cell, databases under {args.dir or tempfile.gettempdir()}")
    print(f"{'threads':>7} | {'NORMAL (median, min-max)':>26} | {'FULL (median, min-max)':>26} | FULL/NORMAL")
    for row in rows:
        n, f = row["NORMAL_range"], row["FULL_range"]
        print(f"{row['threads']:>7} | {row['NORMAL_per_s']:>9} ({n[0]}-{n[1]}){'':>4} | "
              f"{row['FULL_per_s']:>9} ({f[0]}-{f[1]}){'':>4} | {row['full_over_normal']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
