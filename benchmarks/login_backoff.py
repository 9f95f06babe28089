"""Cost of a login and what a burst of password guesses against one account does to everyone else.

    python benchmarks/login_backoff.py                     # starts the app in-process (tiny test model, temp database)
    python benchmarks/login_backoff.py --bursts 40 200 --json

Prints: the scrypt check alone; one login over HTTP (POST /auth/login) with nothing else going on;
then, per burst size, N concurrent wrong guesses at account "victim" while account "erin" logs in:
how many guesses were answered 429 (locked: no hash computed), how long the burst took, and how
long erin's login took during it. Client and server share this process (and its GIL), so the
numbers are an upper bound for a real deployment on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def start_in_process():
    """The app on a free port with a tiny model and a temporary home (the app tests' helpers)."""
    from mmapp.model_store import ModelStore
    from mmapp.predictor import Predictor
    from tests.app import conftest as helpers

    home = Path(tempfile.mkdtemp(prefix="mmapp-login-"))
    (home / "cache").mkdir()
    cache = REPO / "var" / "cache" / "embeddings"
    if cache.is_dir():
        (home / "cache" / "embeddings").symlink_to(cache, target_is_directory=True)
    predictor = Predictor.from_config(helpers.make_config(home), caption_bank=helpers.photo_captions())
    store = ModelStore(home / "models")
    store.set_current(helpers.build_tiny_model(predictor, store))
    predictor.load_version(helpers.TEST_VERSION)
    return helpers.start_app(home, predictor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from feedback_db.accounts import hash_password, verify_password

    stored = hash_password("x" * 12)
    checks = []
    for _ in range(20):
        started = time.perf_counter()
        verify_password("x" * 12, stored)
        checks.append(time.perf_counter() - started)
    out: dict = {"scrypt_check_ms": {"median": statistics.median(checks) * 1e3, "min": min(checks) * 1e3, "n": 20}}

    running = start_in_process()
    try:
        operator = running.operator_client()

        def create(name: str) -> str:
            notice = operator.predict(name, "trusted", api_name="/operator_create_rater")[0]
            return re.search(r"shown this once: `([^`]+)`", notice).group(1)

        create("victim")
        password = create("erin")
        alone = []
        for _ in range(5):
            started = time.perf_counter()
            assert running.login("erin", password).status_code == 200
            alone.append(time.perf_counter() - started)
        out["login_alone_ms"] = {"median": statistics.median(alone) * 1e3, "n": 5}
        out["bursts"] = []
        for size in args.bursts:
            with ThreadPoolExecutor(args.threads) as pool:
                started = time.perf_counter()
                guesses = [pool.submit(running.login, "victim", f"guess-{i}") for i in range(size)]
                time.sleep(0.1)
                t = time.perf_counter()
                status = running.login("erin", password).status_code
                erin_ms = (time.perf_counter() - t) * 1e3
                codes = [g.result().status_code for g in guesses]
                burst_s = time.perf_counter() - started
            out["bursts"].append({"guesses": size, "locked_429": codes.count(429), "wrong_401": codes.count(401),
                                  "burst_s": burst_s, "other_login_status": status, "other_login_ms": erin_ms})
            operator.predict("victim", "unlock", api_name="/operator_update_rater")
    finally:
        running.demo.close()
        running.engine.dispose()

    if args.json:
        print(json.dumps(out))
        return 0
    c = out["scrypt_check_ms"]
    print(f"scrypt (n=2^14, r=8, p=1) check: median {c['median']:.0f} ms, min {c['min']:.0f} ms (n={c['n']})")
    print(f"login over HTTP, nothing else running: median {out['login_alone_ms']['median']:.0f} ms (n=5)")
    for b in out["bursts"]:
        print(f"{b['guesses']} concurrent guesses at one account: {b['locked_429']} locked (429, no hash), "
              f"{b['wrong_401']} checked (401); burst {b['burst_s']:.1f} s; another account's login during it: "
              f"HTTP {b['other_login_status']} in {b['other_login_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
