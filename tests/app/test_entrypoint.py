"""The real entry point: ``python app.py`` in a subprocess, and importing ``app`` doing nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from gradio_client import Client, handle_file
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import make_engine
from retrain.scheduler import LEASE_NAME

from tests.app.conftest import PHOTOS, REPO, TEST_VERSION, caption_with_app_py, free_port, wait_until_served


def test_importing_app_does_no_work(tmp_path):
    """No launch, no model, no database, nothing written: the module only defines things."""
    env = {**os.environ, "MMAPP_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    code = ("import sys, app, threading; "
            "assert 'mmapp.predictor' in sys.modules; "
            "assert threading.active_count() == 1, threading.enumerate(); "
            "assert callable(app.main) and callable(app.build_app)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)
    assert not (tmp_path / "home").exists()


def test_launch_options_are_safe_by_default():
    import app
    from mmapp.config import load_config

    config = load_config("offline", env={})
    options = app.launch_options(config)
    assert options["server_name"] == "127.0.0.1"
    assert options["max_file_size"] == config.app.max_upload_mb * 2**20
    assert options["enable_monitoring"] is False and options["ssr_mode"] is False
    assert str(config.storage.home / "reports") not in options["allowed_paths"]  # guessable paths: served via random copies


@pytest.mark.server
def test_python_app_py_serves_the_page(predictor, app_home, tmp_path):
    """`python app.py --port P` with a model already current: it warns about the missing operator
    credentials, registers the served version, answers a caption request, starts the retrain worker
    (a child process that runs the scheduler), and on SIGTERM stops it, which hands the scheduler's
    lease back instead of leaving it to expire."""
    home = tmp_path / "home"
    home.mkdir()
    for shared in ("models", "cache"):
        (home / shared).symlink_to(app_home / shared, target_is_directory=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAPP")}
    env.update(MMAPP_HOME=str(home), PYTHONUNBUFFERED="1")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = wait_until_served(server, url, log)
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        details = client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")[4]
        assert details["caption"] and details["model_version"] == TEST_VERSION
        output = log.read_text()
        assert "WARNING: no operator credentials are set" in output
        assert f"serving model {TEST_VERSION!r}" in output and "run by the retrain worker (pid" in output
        while "retrain worker" not in log.read_text() or " ready " not in log.read_text():  # its own log line
            assert time.monotonic() < deadline + 60, "the retrain worker never came up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0, log.read_text()[-3000:]
    assert (home / "mmapp.db").is_file() and any((home / "uploads").rglob("*.jpg"))
    engine = make_engine(f"sqlite:///{home / 'mmapp.db'}")
    with Session(engine) as s:
        assert repo.lock_holder(s, LEASE_NAME) is None
    engine.dispose()


@pytest.mark.server
def test_python_app_py_profile_blip_serves_the_generated_caption_first(predictor, app_home, tmp_path):
    """`python app.py --profile blip` with a local captioner folder (a tiny BLIP taught one shapes
    caption): the caption endpoint answers with the generated caption, the bank's matches beside it."""
    from mmapp.data.shapes import render_scene
    from tests.mmapp.test_captioner import SCENE, save_tiny_blip

    blip = save_tiny_blip(tmp_path / "blip")
    home = tmp_path / "home"
    home.mkdir()
    for shared in ("models", "cache"):
        (home / shared).symlink_to(app_home / shared, target_is_directory=True)
    picture = tmp_path / "scene.png"
    render_scene(SCENE).save(picture)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAPP")}
    env.update(MMAPP_HOME=str(home), PYTHONUNBUFFERED="1", MMAPP__MODEL__CAPTIONER_PATH=str(blip),
               MMAPP__MODEL__DEVICE="cpu")
    details, _ = caption_with_app_py("blip", env, picture, tmp_path)
    assert details["caption"] == SCENE.caption and details["source"] == "generated", details
    assert details["alternatives"]
