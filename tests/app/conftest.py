"""Fixtures for the app tests: one predictor per test session, one running app per module.

The app runs in-process (``build_app`` + ``launch(prevent_thread_lock=True)``) on a free port, with
its home, database and upload store in temporary folders. The model it serves is a tiny one
built here in seconds: the ConSE bridge for captions and a fusion head trained for a few steps
on random tensors for memes, so no test waits for the bootstrap corpus. Text embeddings of the
1000 ImageNet prompts are cached across test runs (they take a minute to compute on 2 cores).
"""
from __future__ import annotations

import csv
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "mmapp" / "assets" / "photos"
TEST_VERSION = "test-tiny-v1"
LABELS = ("positive", "sarcastic", "dark humor")
OPERATOR = ("operator", "s3cret-pass")
SESSION_COOKIE = "mmapp_session"  # app.SESSION_COOKIE (not imported here: importing app loads Gradio)


def wait_until_served(server, url: str, log: Path, *, timeout_s: float = 180) -> float:
    """Wait until a ``python app.py`` subprocess answers at ``url``; fail with its log if it exits or
    never does. Returns the deadline it waited against (``time.monotonic()`` clock)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return deadline
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("server did not start:\n" + log.read_text()[-3000:])


def caption_with_app_py(profile: str, env: dict, picture: Path, tmp_path: Path, *,
                        timeout_s: float = 180) -> tuple[dict, str]:
    """Start ``python app.py --profile PROFILE`` with ``env``, caption ``picture`` through the page's
    ``/caption`` API, stop it; returns the caption details and the server's log."""
    import subprocess
    import sys

    from gradio_client import Client, handle_file

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--profile", profile, "--port", str(port)], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(server, url, log, timeout_s=timeout_s)
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        details = client.predict(handle_file(str(picture)), "", api_name="/caption")[4]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0, log.read_text()[-3000:]
    return details, log.read_text()


WORKER_STARTED = re.compile(r"started the retrain worker \(pid (\d+)\)")  # app.py's log line


def worker_pids(log: Path) -> list[int]:
    """Pids of the retrain workers a ``python app.py`` has started so far, in order, from its log."""
    return [int(pid) for pid in WORKER_STARTED.findall(log.read_text())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_model(predictor, store, version: str = TEST_VERSION, *, seed: int = 0) -> str:
    """Save a model version made of the bridge space and a concat fusion head fitted to random tensors."""
    import torch

    from mmapp.fusion import FusionConfig, create_fusion_head
    from mmapp.model_store import VersionMeta

    if store.exists(version):
        return version
    gen = torch.Generator().manual_seed(seed)
    image_dim = predictor.embedder.image_encoder.dim
    text_dim = predictor.embedder.text_encoder.dim
    config = FusionConfig(image_dim=image_dim, text_dim=text_dim, num_labels=len(LABELS), hidden_dim=32)
    head = create_fusion_head("concat", config)
    image, text = torch.randn(64, image_dim, generator=gen), torch.randn(64, text_dim, generator=gen)
    labels = torch.randint(0, len(LABELS), (64,), generator=gen)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(head(image, text).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    store.save(version, predictor.towers.bridge_space(), fusion_head=head, fusion_config=config, fusion_name="concat",
               meta=VersionMeta(labels=LABELS, encoders=predictor.embedder.identity, caption_temperature=0.05))
    return version


def photo_captions() -> list[tuple[str, str]]:
    with open(PHOTOS / "captions.tsv", newline="") as fh:
        return [(row[1], "bank") for row in csv.reader(fh, delimiter="\t") if len(row) >= 2 and row[1]]


@pytest.fixture(scope="session")
def embedding_cache_dir(request) -> Path:
    """Shared across runs: the bootstrap build's cache when there is one, else pytest's cache folder."""
    built = REPO / "var" / "cache" / "embeddings"
    return built if built.is_dir() else Path(request.config.cache.mkdir("mmapp-embeddings"))


@pytest.fixture(scope="session")
def app_home(tmp_path_factory, embedding_cache_dir) -> Path:
    home = tmp_path_factory.mktemp("mmapp-home")
    (home / "cache").mkdir()
    (home / "cache" / "embeddings").symlink_to(embedding_cache_dir, target_is_directory=True)
    return home


def make_config(home: Path, **app):
    from mmapp.config import load_config

    return load_config("offline", env={}, storage={"home": str(home)}, retrain={"runner": "in-process"},
                       app={"operator_user": OPERATOR[0], "operator_password": OPERATOR[1], **app})


@pytest.fixture(scope="session")
def predictor(app_home):
    from mmapp.model_store import ModelStore
    from mmapp.predictor import Predictor

    config = make_config(app_home)
    predictor = Predictor.from_config(config, caption_bank=photo_captions())
    store = ModelStore(app_home / "models")
    store.set_current(build_tiny_model(predictor, store))
    predictor.load_version(TEST_VERSION)
    return predictor


@dataclass
class RunningApp:
    url: str
    demo: object
    engine: object
    config: object
    home: Path
    blobstore: object

    def client(self, token: str | None = None):
        """A ``gradio_client`` client; with ``token`` it sends that login cookie on every request."""
        from gradio_client import Client

        extra = {"httpx_kwargs": {"cookies": {SESSION_COOKIE: token}}} if token else {}
        return Client(self.url, verbose=False, download_files=False, analytics_enabled=False, **extra)

    def login(self, user: str = OPERATOR[0], password: str = OPERATOR[1]):
        """``POST /auth/login`` as a script would; returns the httpx response (the cookie is in it on success)."""
        import httpx

        return httpx.post(f"{self.url.rstrip('/')}/auth/login", json={"user": user, "password": password}, timeout=30)

    def operator_client(self, user: str = OPERATOR[0], password: str = OPERATOR[1]):
        response = self.login(user, password)
        assert response.status_code == 200, response.text
        return self.client(response.cookies[SESSION_COOKIE])


def start_app(home: Path, predictor, *, build_options: dict | None = None, **app_overrides) -> RunningApp:
    """``build_options``: extra keyword arguments of ``build_app`` (a scheduler, a retrain feature source)."""
    import app as webapp
    from feedback_db.blobstore import BlobStore
    from feedback_db.engine import init_db, make_engine

    config = make_config(home, port=free_port(), **app_overrides)
    engine = make_engine(f"sqlite:///{home / 'app.db'}")
    init_db(engine)
    blobstore = BlobStore(home / "uploads")
    watcher = webapp.ModelWatcher(predictor, engine, interval_s=0.2)
    demo = webapp.build_app(config, predictor, engine, blobstore, watcher=watcher, **(build_options or {}))
    demo.launch(**{**webapp.launch_options(config, demo), "prevent_thread_lock": True, "quiet": True})
    return RunningApp(demo.local_url, demo, engine, config, home, blobstore)


def module_home(app_home: Path, tmp_path_factory) -> Path:
    """A fresh home folder (database, uploads, reports) that shares the session's models and caches."""
    home = tmp_path_factory.mktemp("app")
    for shared in ("models", "cache"):
        (home / shared).symlink_to(app_home / shared, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def running_app(predictor, app_home, tmp_path_factory):
    """The app on a free port with its own database and upload store (shared model caches)."""
    running = start_app(module_home(app_home, tmp_path_factory), predictor)
    yield running
    running.demo.close()
    running.engine.dispose()


@pytest.fixture(scope="session")
def meme_path(tmp_path_factory) -> Path:
    """A classic meme (white captions with a black outline) rendered on a real photo."""
    from PIL import Image

    from mmapp.data.memes import render_meme

    path = tmp_path_factory.mktemp("memes") / "cat_meme.png"
    with Image.open(PHOTOS / "chelsea.jpg") as photo:
        render_meme(photo, "when the tests pass", "on the first try", size=384).save(path)
    return path
