"""Issue 11, item 9: the registry's sha256 is verified at load; a corrupt current version is refused and the
previous one keeps serving (at start and on hot reload), visibly; a fixed version is picked up without a restart."""
from __future__ import annotations

import os
import shutil
import time

import pytest
from gradio_client import handle_file
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import init_db, make_engine
from mmapp.model_store import ModelIntegrityError
from retrain.promotion import promote_version
from tests.app.conftest import PHOTOS, TEST_VERSION, build_tiny_model, start_app

pytestmark = pytest.mark.server

GOOD, BAD = "integrity-good", "integrity-bad"


@pytest.fixture
def versions(predictor):
    """Two saved versions in the session's model store; the predictor and pointer are restored after."""
    store = predictor.store
    for name, seed in ((GOOD, 11), (BAD, 12)):
        shutil.rmtree(store.path(name), ignore_errors=True)
        build_tiny_model(predictor, store, name, seed=seed)
    yield store
    predictor.load_version(TEST_VERSION)
    store.set_current(TEST_VERSION)
    for name in (GOOD, BAD):
        shutil.rmtree(store.path(name), ignore_errors=True)


def corrupt(path):
    """Flip bytes inside the tensor data, same size (what a bad disk or a tampered copy looks like)."""
    original = path.read_bytes()
    data = bytearray(original)
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))
    return original


def registry_current(engine) -> str:
    with Session(engine) as s:
        return repo.current_version(s).version


def test_load_refuses_weights_that_are_not_the_registrys(versions):
    weights = versions.path(BAD) / "weights.safetensors"
    expected = versions.weights_sha256(BAD)
    assert versions.load(BAD, expected_sha256=expected).version == BAD
    corrupt(weights)
    with pytest.raises(ModelIntegrityError, match="does not match the registry"):
        versions.load(BAD, expected_sha256=expected)


def test_at_start_a_corrupt_current_version_falls_back_to_the_last_good_one(predictor, versions, tmp_path):
    import app as webapp

    engine = make_engine(f"sqlite:///{tmp_path / 'start.db'}")
    init_db(engine)
    promote_version(engine, versions, version=GOOD, parent_version=None, metrics={}, manifest={})
    promote_version(engine, versions, version=BAD, parent_version=GOOD, metrics={}, manifest={})
    corrupt(versions.path(BAD) / "weights.safetensors")
    watcher = webapp.ModelWatcher(predictor, engine)
    assert watcher.serve_best() == GOOD and predictor.version == GOOD  # what build_serving does at start
    assert registry_current(engine) == BAD  # the registry still says what is current
    assert BAD in watcher.notice and "ModelIntegrityError" in watcher.notice
    engine.dispose()


def test_a_corrupt_version_is_refused_on_hot_reload_and_retried_once_fixed(predictor, versions, tmp_path):
    (tmp_path / "models").symlink_to(versions.root, target_is_directory=True)
    running = start_app(tmp_path, predictor)
    try:
        client = running.client()

        def served() -> str:
            time.sleep(0.3)  # the watcher polls the registry every 0.2 s in tests
            return client.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")[4]["model_version"]

        promote_version(running.engine, versions, version=GOOD, parent_version=None, metrics={}, manifest={})
        assert served() == GOOD
        promote_version(running.engine, versions, version=BAD, parent_version=GOOD, metrics={}, manifest={})
        weights = versions.path(BAD) / "weights.safetensors"
        original = corrupt(weights)
        assert served() == GOOD and served() == GOOD  # refused, and not re-read on every request
        assert registry_current(running.engine) == BAD
        operator = running.operator_client()
        version_line = operator.predict(api_name="/operator_refresh")[0]
        assert "Model fallback" in version_line and BAD in version_line and f"served:** `{GOOD}`" in version_line

        weights.write_bytes(original)  # the operator restores the file: picked up without a restart
        os.utime(weights, ns=(time.time_ns(), time.time_ns()))
        assert served() == BAD
        assert "Model fallback" not in operator.predict(api_name="/operator_refresh")[0]
    finally:
        running.demo.close()
        running.engine.dispose()
