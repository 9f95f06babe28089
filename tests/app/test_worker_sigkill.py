"""The real retrain worker SIGKILLed in the middle of a real run (issue 13): the web serves on, the run
is marked failed at once, the worker is restarted and the next requested run starts.

Runs on the built bootstrap model (``python -m mmapp build-bootstrap``, which CI runs first): a scratch
home gets a copy of its models (a retrain may write there) and links to its datasets, corpus, weights
and embedding cache.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import make_engine
from retrain.job import running_run_id
from retrain.worker import request_run
from tests.app.conftest import PHOTOS, REPO, free_port, wait_until_served, worker_pids

pytestmark = pytest.mark.server
BUILT = Path(os.environ.get("MMAPP_HOME") or REPO / "var")


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def scratch_home(tmp_path: Path) -> Path:
    if not (BUILT / "models" / "current.json").is_file() or not (BUILT / "datasets").is_dir():
        pytest.skip(f"no bootstrap model under {BUILT}: run `python -m mmapp build-bootstrap`")
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    shutil.copytree(BUILT / "models", home / "models", symlinks=True)
    for shared in ("datasets", "corpus", "weights"):
        if (BUILT / shared).is_dir():
            (home / shared).symlink_to((BUILT / shared).resolve(), target_is_directory=True)
    (home / "cache" / "embeddings").symlink_to((BUILT / "cache" / "embeddings").resolve(), target_is_directory=True)
    return home


def fresh_jpeg(rng: random.Random) -> bytes:
    """One of the guard photos with a few pixels changed: new content, so nothing comes from a cache."""
    image = Image.open(rng.choice(sorted(PHOTOS.glob("*.jpg")))).convert("RGB")
    for _ in range(8):
        image.putpixel((rng.randrange(image.width), rng.randrange(image.height)), tuple(rng.randrange(256) for _ in "rgb"))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def caption(client: httpx.Client, rng: random.Random) -> dict:
    response = client.post("/api/v1/caption", files={"image": ("photo.jpg", fresh_jpeg(rng), "image/jpeg")})
    response.raise_for_status()
    return response.json()


def wait_for(condition, what: str, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s} s\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_a_real_worker_killed_mid_run_fails_its_run_and_the_web_serves_on(tmp_path):
    home = scratch_home(tmp_path)
    url, log = f"http://127.0.0.1:{free_port()}", tmp_path / "app.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAPP")}
    env.update(MMAPP_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               MMAPP__RETRAIN__ANONYMOUS_RULE="open",  # the test's anonymous corrections reach training
               MMAPP__RETRAIN__WORKER_POLL_S="0.2", MMAPP__APP__UPLOADS_PER_MINUTE="1e6",
               MMAPP__APP__UPLOAD_BURST="1000000", MMAPP__APP__EVENTS_PER_MINUTE="1e6", MMAPP__APP__EVENT_BURST="1000000")
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--port", url.rsplit(":", 1)[1]], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    engine = make_engine(f"sqlite:///{home / 'mmapp.db'}")
    stop, served, errors = threading.Event(), [], []
    try:
        wait_until_served(server, url + "/", log, timeout_s=240)
        rng = random.Random(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(30):  # something for the run to learn from, so it trains instead of skipping
                item = caption(client, rng)
                client.post("/api/v1/corrections", json={"item_id": item["item_id"], "item_key": item["item_key"],
                                                          "field": "caption", "value": f"a test correction {i % 3}"}
                            ).raise_for_status()
        first_worker = wait_for(lambda: worker_pids(log), "the app started its retrain worker", 60, log)[0]
        # training takes what the web process leaves idle (retrain.worker_nice, default 10)
        assert niceness(first_worker) - niceness(server.pid) == 10

        def keep_captioning():  # a user of the page's API the whole time
            with httpx.Client(base_url=url, timeout=60) as client:
                own = random.Random(1)
                while not stop.is_set():
                    try:
                        served.append((time.monotonic(), caption(client, own)["caption"]))
                    except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                        errors.append(exc)
        user = threading.Thread(target=keep_captioning, daemon=True)
        user.start()

        request_run(engine)
        run_id = wait_for(lambda: running_run_id(engine), "the worker started the requested run", 60, log)
        time.sleep(0.5)  # into the run's stages
        assert running_run_id(engine) == run_id, "the run ended before the kill: nothing mid-run was tested"
        os.kill(first_worker, signal.SIGKILL)
        killed_at = time.monotonic()

        def failed():
            with Session(engine) as s:
                run = next(r for r in repo.recent_retrain_runs(s, limit=5) if r.id == run_id)
            return run if run.status != "running" else None
        dead = wait_for(failed, "the killed worker's run was marked", 30, log)
        assert dead.status == "failed" and "died" in dead.message, (dead.status, dead.message)
        second_worker = wait_for(lambda: worker_pids(log)[1:], "the app restarted its worker", 60, log)[0]
        assert second_worker != first_worker

        request_run(engine)  # nothing blocks the next run
        wait_for(lambda: _a_run_after(engine, run_id), "a new run started after the kill", 90, log)
        wait_for(lambda: any(at > killed_at for at, _ in served), "a caption served after the kill", 30, log)
        stop.set()
        user.join(timeout=60)
        assert not errors, errors[:3]
        assert server.poll() is None, "the web process died with its worker"
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        engine.dispose()
    assert server.returncode == 0, log.read_text()[-3000:]


def _a_run_after(engine, run_id: int) -> bool:
    with Session(engine) as s:
        return any(r.id > run_id for r in repo.recent_retrain_runs(s, limit=5))
