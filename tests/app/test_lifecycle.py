"""The registry is the one authority for the current version: a version made current from the command
line goes through the same promotion path as a retrain, and the running app serves it after its
next reload poll."""
from __future__ import annotations

import json
import time

import pytest
from gradio_client import handle_file
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from mmapp import __main__ as cli
from mmapp.model_store import ModelStore
from retrain.promotion import promote_saved_version
from tests.app.conftest import PHOTOS, TEST_VERSION, module_home, start_app

pytestmark = pytest.mark.server


def served_version(client) -> str:
    return client.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")[4]["model_version"]


def test_train_alignment_make_current_is_promoted_and_served(predictor, app_home, tmp_path_factory, monkeypatch,
                                                            capsys):
    home = module_home(app_home, tmp_path_factory)
    running = start_app(home, predictor)
    try:
        promote_saved_version(running.config, TEST_VERSION, reason="test install", engine=running.engine)
        client = running.client()
        assert served_version(client) == TEST_VERSION

        monkeypatch.setenv("MMAPP_DATABASE_URL", f"sqlite:///{home / 'app.db'}")  # the app's database
        pairs = str(PHOTOS / "captions.tsv")
        rc = cli.main(["--home", str(home), "train-alignment", "--train", pairs, "--val", pairs, "--epochs", "1",
                       "--version", "aligned-cli", "--make-current", "--json"])
        out = json.loads(capsys.readouterr().out)  # one JSON document on stdout, nothing else
        assert rc == 0 and out["version"] == "aligned-cli" and out["current"] is True

        with Session(running.engine) as s:
            row = repo.current_version(s)
            assert row.version == "aligned-cli" and row.parent_version == TEST_VERSION
            assert row.sha256 == ModelStore(home / "models").weights_sha256("aligned-cli")
        assert ModelStore(home / "models").current() == "aligned-cli"  # the pointer follows the registry

        deadline = time.monotonic() + 20
        while served_version(client) != "aligned-cli":  # the watcher polls the registry every 0.2 s here
            assert time.monotonic() < deadline, "the running app never served the promoted version"
            time.sleep(0.3)
    finally:
        running.demo.close()
        running.engine.dispose()
        ModelStore(app_home / "models").set_current(TEST_VERSION)  # the shared fixtures serve the tiny model
        predictor.load_version(TEST_VERSION)
