"""Metadata stripping on store (issue 11, item 5): no EXIF/XMP/GPS/text left, orientation applied first,
lossless where nothing rotates, and idempotent so the stored bytes' sha256 is stable."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mmapp.imageio import load_image, strip_metadata


def phone_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "PhoneCo"
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    return exif.tobytes()


def gradient(w=40, h=20) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (h, 1))] * 3, axis=-1))


def encode(fmt: str, orientation: int = 1, **extra) -> bytes:
    buf = io.BytesIO()
    gradient().save(buf, fmt, exif=phone_exif(orientation), **extra)
    return buf.getvalue()


def metadata_left(data: bytes) -> list[str]:
    with Image.open(io.BytesIO(data)) as im:
        found = [k for k in ("exif", "xmp", "XML:com.adobe.xmp", "comment", "GPS") if k in im.info]
        return found + (["EXIF tags"] if im.getexif() else [])


def test_jpeg_without_rotation_is_stripped_losslessly():
    data = encode("JPEG", 1, xmp=b"<x:xmpmeta>here</x:xmpmeta>", comment=b"a comment")
    clean, fmt = strip_metadata(data)
    assert fmt == "JPEG" and metadata_left(data) and metadata_left(clean) == []
    assert b"PhoneCo" not in clean and b"xmpmeta" not in clean and b"a comment" not in clean
    # the compressed image data is copied byte for byte: the same pixels decode
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(clean))), np.asarray(Image.open(io.BytesIO(data))))
    assert strip_metadata(clean) == (clean, "JPEG")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_rotation_is_applied_before_the_tag_goes(fmt):
    data = encode(fmt, 6)
    decoded = load_image(data, strip_metadata=True)
    with Image.open(io.BytesIO(decoded.data)) as im:
        assert im.size == (20, 40) and metadata_left(decoded.data) == []
    assert decoded.image.size == (20, 40)
    again = load_image(decoded.data, strip_metadata=True)
    assert again.data == decoded.data and again.sha256 == decoded.sha256  # idempotent: stable content key


def test_png_text_chunks_and_exif_are_dropped():
    info = PngInfo()
    info.add_text("Comment", "taken at home")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPS here</x:xmpmeta>")
    data = encode("PNG", 1, pnginfo=info)
    clean, fmt = strip_metadata(data)
    assert fmt == "PNG" and b"taken at home" not in clean and b"xmpmeta" not in clean and b"eXIf" not in clean
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(clean))), np.asarray(gradient()))


def test_without_strip_the_upload_bytes_are_kept():
    data = encode("JPEG", 1)
    assert load_image(data).data == data
