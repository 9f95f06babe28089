"""A corpus of awkward and hostile uploads, written to a directory in well under a second.

Imported by tests of every upload path (``from tests.bad_uploads import make_bad_upload_corpus``).
Generation is deterministic: no randomness beyond a fixed seed, no network, no fixtures.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image

# Colours the content checks in the tests look for.
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

DEFAULT_MAX_BYTES = 20 * 2**20  # mirrors mmapp.imageio.ImageLimits.max_bytes


@dataclass(frozen=True)
class BadUpload:
    name: str
    path: Path
    expect: Literal["ok", "error"]  # under the default ImageLimits
    expect_size: tuple[int, int] | None = None  # (width, height) after decoding, when "ok"
    why: str = ""  # what the file exercises


def make_bad_upload_corpus(directory: Path) -> list[BadUpload]:
    """Write every corpus file into ``directory`` (created if missing) and describe them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = []
    for name, build, expect, expect_size, why in _CASES:
        path = directory / name
        content = build()
        if content is not None:  # builders returning None write the file themselves
            path.write_bytes(content)
        else:
            _write_huge_sparse(path)
        corpus.append(BadUpload(name, path, expect, expect_size, why))
    return corpus


# --- builders ----------------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _noise_rgb(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _truncated_jpeg() -> bytes:
    data = _save(_noise_rgb(96, 64), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]  # keeps the header, cuts the entropy-coded scan


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _zlib_of_zeros(n_bytes: int, chunk: int) -> bytes:
    """zlib stream of ``n_bytes`` zero bytes, built from one compressed ``chunk``.

    After Z_FULL_FLUSH the compressor forgets its history, so identical input chunks compress to
    identical bytes and can be repeated: ~30 ms instead of deflating 100+ MB.
    """
    assert n_bytes % chunk == 0, (n_bytes, chunk)
    zeros = bytes(chunk)
    compressor = zlib.compressobj(9)
    header_and_block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat_block = header_and_block[2:]  # the same deflate block without the 2-byte zlib header
    adler = 1
    for _ in range(n_bytes // chunk):
        adler = zlib.adler32(zeros, adler)
    final_block = b"\x03\x00"  # empty final fixed-Huffman block
    return (
        header_and_block
        + repeat_block * (n_bytes // chunk - 1)
        + final_block
        + struct.pack(">I", adler)
    )


def black_bilevel_png(width: int, height: int, rows_per_chunk: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, all black, tiny on disk."""
    row_bytes = 1 + (width + 7) // 8  # filter byte (0 = None) + packed pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # depth 1, grayscale
    idat = _zlib_of_zeros(row_bytes * height, row_bytes * rows_per_chunk)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _bomb_png() -> bytes:
    # 30000x30000 = 900 MP declared, ~110 KB on disk; beyond even Pillow's own 179 MP guard.
    return black_bilevel_png(30000, 30000, rows_per_chunk=1000)


def _over_limit_png() -> bytes:
    # 8000x6000 = 48 MP: above our 40 MP limit but below Pillow's guard, so our check must act.
    return black_bilevel_png(8000, 6000, rows_per_chunk=1000)


def _svg_with_script() -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<script>alert(document.cookie)</script><rect width="64" height="64" fill="red"/></svg>\n'
    )


def _gray16_gradient() -> bytes:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)  # left black, right white
    return _save(Image.fromarray(np.tile(ramp, (32, 1))), "PNG")  # mode I;16, 16-bit PNG


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (40, 20), 0)
    im.putpalette([0, 0, 0, *BLUE] + [0] * (3 * 254))
    im.paste(1, (20, 0, 40, 20))  # right half blue, left half index 0 = transparent
    return _save(im, "PNG", transparency=0)


def _rgba_half_transparent() -> bytes:
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent *black*: must come out white
    im.paste((*GREEN, 255), (20, 0, 40, 20))
    return _save(im, "PNG")


def _gray_alpha() -> bytes:
    im = Image.new("LA", (20, 20), (0, 0))
    im.paste((0, 255), (10, 0, 20, 20))  # left transparent, right opaque black
    return _save(im, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 24), colour) for colour in (RED, GREEN, BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated_jpeg() -> bytes:
    im = Image.new("RGB", (60, 40), RED)
    im.paste(BLUE, (0, 20, 60, 40))  # stored: top red, bottom blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _save(im, "JPEG", quality=95, exif=exif.tobytes())  # displays 40x60, red on the right


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (48, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def _photo_webp() -> bytes:
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return _save(Image.fromarray(rgb), "WEBP", quality=80)


def _bilevel_png() -> bytes:
    im = Image.new("1", (16, 8), 0)
    im.paste(1, (8, 0, 16, 8))  # left black, right white
    return _save(im, "PNG")


def _float_tiff() -> bytes:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)
    return _save(Image.fromarray(np.tile(ramp, (16, 1))), "TIFF")  # mode F, values in [0, 1]


def _ico() -> bytes:
    return _save(Image.new("RGB", (32, 32), RED), "ICO")


def _write_huge_sparse(path: Path) -> None:
    # One byte over the default limit; sparse, so it costs no disk and no time.
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(DEFAULT_MAX_BYTES + 1)


_Builder = Callable[[], "bytes | None"]
_CASES: list[tuple[str, _Builder, str, tuple[int, int] | None, str]] = [
    ("empty.png", lambda: b"", "error", None, "zero bytes"),
    ("truncated.jpg", _truncated_jpeg, "error", None, "JPEG cut at 60%"),
    ("not_an_image.png", lambda: b"hello, this is plain text\n" * 4, "error", None, "text"),
    (
        "html_as_jpg.jpg",
        lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>\n",
        "error", None, "HTML with an image extension",
    ),
    ("bomb.png", _bomb_png, "error", None, "valid PNG declaring 30000x30000"),
    ("over_limit_48mp.png", _over_limit_png, "error", None, "8000x6000, under Pillow's guard"),
    ("huge_bytes.png", lambda: None, "error", None, "20 MiB + 1 byte"),
    ("svg_with_script.svg", _svg_with_script, "error", None, "SVG is not a raster format"),
    (
        "document.pdf",
        lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n",
        "error", None, "PDF",
    ),
    ("icon.ico", _ico, "error", None, "ICO decodes in Pillow but is not allowed"),
    ("one_by_one.png", lambda: _save(Image.new("RGB", (1, 1), RED), "PNG"), "ok", (1, 1), "1x1"),
    (
        "wide_8000x8.png",
        lambda: _save(Image.new("RGB", (8000, 8), GREEN), "PNG"),
        "ok", (8000, 8), "1000:1 strip",
    ),
    ("gray16.png", _gray16_gradient, "ok", (256, 32), "16-bit gradient"),
    ("cmyk.jpg", _cmyk_jpeg, "ok", (48, 32), "CMYK JPEG, red"),
    ("palette.png", _palette_with_transparency, "ok", (40, 20), "P + tRNS"),
    ("rgba.png", _rgba_half_transparent, "ok", (40, 20), "transparent black + green"),
    ("gray_alpha.png", _gray_alpha, "ok", (20, 20), "LA"),
    ("bilevel.png", _bilevel_png, "ok", (16, 8), "mode 1"),
    ("float.tif", _float_tiff, "ok", (64, 16), "mode F in [0, 1]"),
    ("animated.gif", _animated_gif, "ok", (32, 24), "3 frames red, green, blue"),
    ("exif_rotated.jpg", _exif_rotated_jpeg, "ok", (40, 60), "60x40 stored, Orientation=6"),
    ("photo.webp", _photo_webp, "ok", (64, 48), "lossy WebP"),
    (
        "png_named.jpg",
        lambda: _save(Image.new("RGB", (10, 10), BLUE), "PNG"),
        "ok", (10, 10), "PNG content, JPEG extension",
    ),
]
