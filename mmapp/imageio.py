"""Safe decoding of untrusted image uploads into fully loaded RGB ``PIL.Image`` objects.

Every upload path goes through ``load_image``: size limits are checked before the bytes are read
and before pixels are decoded, the format comes from the content (never the file name), and every
refusal is an ``ImageDecodeError`` naming the upload and the offending value. No Gradio, no DB, and
no change to Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) here.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DecodedImage",
    "ImageDecodeError",
    "ImageLimits",
    "describe_content",
    "load_image",
    "sha256_bytes",
    "strip_metadata",
]


class ImageDecodeError(ValueError):
    """An upload that is not an acceptable image; the message is safe to show to the user."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # refused before the file is read in full
    max_pixels: int = 40_000_000  # width*height from the header, checked before decoding
    min_side: int = 1
    max_aspect: float = 1000.0  # long/short side; an 8000x8 strip (1000:1) is still accepted
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow format ids

    def __post_init__(self) -> None:
        for knob in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{knob} must be a positive int, got {value!r}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"ImageLimits.max_aspect must be >= 1.0, got {self.max_aspect!r}")
        if isinstance(self.formats, str) or not self.formats:
            raise ValueError(
                f"ImageLimits.formats must be a non-empty sequence of names, got {self.formats!r}"
            )
        object.__setattr__(self, "formats", tuple(str(f).upper() for f in self.formats))


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True, eq=False)
class DecodedImage:
    image: Image.Image  # mode "RGB", loaded, EXIF orientation applied, first frame only
    sha256: str  # hex digest of `data` (the stripped bytes when decoded with strip_metadata=True)
    data: bytes = field(repr=False)  # the upload bytes; without metadata when decoded with strip_metadata=True
    format: str  # Pillow format id of `data`, e.g. "PNG" (a stripped WebP/GIF/TIFF is stored as PNG)
    original_size: tuple[int, int]  # (width, height) as stored in the file, before EXIF rotation
    original_mode: str  # Pillow mode as stored, e.g. "I;16", "CMYK", "P"
    n_frames: int  # 1 for still images


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    limits: ImageLimits = DEFAULT_LIMITS,
    name: str | None = None,
    strip_metadata: bool = False,
) -> DecodedImage:
    """Read, validate and decode one upload; raises ``ImageDecodeError`` for any bad upload.

    ``source`` is the raw file content (bytes) or a path to it (str / PathLike); ``name`` is what
    error messages call the upload (defaults to the path). ``strip_metadata``: ``data``/``sha256``
    are the bytes to store, without EXIF/XMP/GPS/IPTC/comments and with the EXIF orientation applied
    to the pixels (see :func:`strip_metadata`); stripping stripped bytes returns them unchanged.
    """
    if not isinstance(limits, ImageLimits):
        raise TypeError(f"limits must be an ImageLimits, got {type(limits).__name__}")
    if name is None and isinstance(source, (str, os.PathLike)):
        name = os.fsdecode(source)
    where = f"upload {name!r}" if name is not None else "upload"
    _check_formats_known(limits)

    data = _read_limited(source, limits, where)
    if not data:
        raise ImageDecodeError(f"{where}: file is empty (0 bytes)")
    sniffed = describe_content(data)

    try:
        # Image.open parses the header only; pixels are decoded by load() below.
        with Image.open(io.BytesIO(data), formats=limits.formats) as im:
            fmt = _canonical_format(im.format)
            width, height = im.size
            _check_geometry(width, height, limits, where)
            original_mode = im.mode
            n_frames = _count_frames(im, fmt, data)
            try:
                im.load()  # first frame only, for animated GIF / WebP / PNG / multi-page TIFF
            except MemoryError:  # the server's problem, not a corrupt file
                raise
            except Exception as exc:  # corrupt data may raise anything; the upload is at fault
                raise ImageDecodeError(
                    f"{where}: cannot decode {width}x{height} {fmt} image, "
                    f"the file is truncated or corrupt ({type(exc).__name__}: {exc})"
                ) from exc
            # Some formats (GIF) learn their true canvas only while decoding.
            _check_geometry(*im.size, limits, where)
            rgb = _to_rgb(_apply_exif_orientation(im), where)
            rgb.info = {}  # pixels only: no EXIF/comment/XMP rides along into a preview or a re-encode
            if strip_metadata:
                data, fmt = _without_metadata(data, fmt, _orientation(im), rgb)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside Image.open, before we see the size; its message
        # carries the pixel count.
        raise ImageDecodeError(f"{where}: {_bomb_message(exc, limits)}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified_message(sniffed, limits, where)) from exc
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:  # header parsing of hostile files fails in many ways
        raise ImageDecodeError(
            f"{where}: cannot read {sniffed} data, the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc

    return DecodedImage(
        image=rgb,
        sha256=sha256_bytes(data),
        data=data,
        format=fmt,
        original_size=(width, height),
        original_mode=original_mode,
        n_frames=n_frames,
    )


# --- reading -----------------------------------------------------------------------------------


def _read_limited(
    source: bytes | bytearray | memoryview | str | os.PathLike, limits: ImageLimits, where: str
) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise ImageDecodeError(f"{where}: {_too_many_bytes(len(data), limits)}")
        return data
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{where}: source must be bytes or a path (str / os.PathLike), "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limits.max_bytes:
                raise ImageDecodeError(f"{where}: {_too_many_bytes(size, limits)}")
            # Read one byte past the limit: a file that grew (or lies about its size) is caught
            # without reading it all.
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError(
            f"{where}: cannot read {os.fsdecode(path)!r}: {exc.strerror or exc}"
        ) from exc
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{where}: more than {limits.max_bytes:,} bytes, the size limit")
    return data


def _too_many_bytes(n_bytes: int, limits: ImageLimits) -> str:
    return (
        f"{n_bytes:,} bytes ({n_bytes / 2**20:.1f} MiB) exceeds the limit of "
        f"{limits.max_bytes:,} bytes ({limits.max_bytes / 2**20:.1f} MiB)"
    )


# --- format detection --------------------------------------------------------------------------

# Signatures of formats users actually upload by mistake, so a refusal can say what the file is.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
)
_ISO_BMFF_BRANDS = {
    b"avif": "AVIF", b"avis": "AVIF",
    b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF",
    b"msf1": "HEIF", b"qt  ": "QuickTime video",
}
_ALIASES = {"MPO": "JPEG"}  # Pillow reports multi-picture JPEGs (phone cameras) as MPO


def describe_content(data: bytes) -> str:
    """Name the type of ``data`` from its first bytes (``"PNG"``, ``"SVG"``, ``"HTML"``, ...)."""
    head = data[:512]
    text = _as_text(head)
    for magic, label in _MAGIC:
        # Two-byte signatures ("BM", "MZ") also start ordinary words; text wins over them.
        if head.startswith(magic) and (len(magic) > 2 or text is None):
            return label
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] == b"RIFF":
        return "RIFF (" + head[8:12].decode("latin-1").strip() + ")"
    if head[4:8] == b"ftyp":
        return _ISO_BMFF_BRANDS.get(head[8:12], "MP4/ISO media")
    if text is not None:
        lowered = text.lstrip().lower()
        if "<svg" in lowered:
            return "SVG"
        if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered[:200]:
            return "HTML"
        if lowered.startswith("<?xml") or lowered.startswith("<"):
            return "XML"
        if lowered.startswith(("{", "[")):
            return "JSON/text"
        return "text"
    return f"unknown (starts with {head[:8].hex(' ')})"


def _as_text(head: bytes) -> str | None:
    boms = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
    for bom, codec in boms:
        if head.startswith(bom):
            head, encoding = head[len(bom):], codec
            break
    else:
        encoding = "utf-8"
    try:
        text = head.decode(encoding)
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte char cut at the 512-byte boundary is fine
            return None
        text = head[: exc.start].decode(encoding)
    if any(ch < " " and ch not in "\t\n\r\f" for ch in text):
        return None
    return text


def _canonical_format(pillow_format: str | None) -> str:
    fmt = pillow_format or "unknown"
    return _ALIASES.get(fmt, fmt)


def _check_formats_known(limits: ImageLimits) -> None:
    Image.init()  # registers every plugin once; cheap after the first call
    unknown = [f for f in limits.formats if f not in Image.OPEN]
    if unknown:
        raise ValueError(
            f"ImageLimits.formats has unknown Pillow format(s) {unknown}; "
            f"known: {sorted(Image.OPEN)}"
        )


def _unidentified_message(sniffed: str, limits: ImageLimits, where: str) -> str:
    accepted = ", ".join(limits.formats)
    if sniffed in limits.formats:
        return f"{where}: looks like {sniffed} but its header is truncated or corrupt"
    return f"{where}: {sniffed} is not an accepted image format (accepted: {accepted})"


# --- size checks -------------------------------------------------------------------------------


def _check_geometry(width: int, height: int, limits: ImageLimits, where: str) -> None:
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(
            f"{where}: {width}x{height} has a side below the minimum of {limits.min_side} px"
        )
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageDecodeError(
            f"{where}: {width}x{height} = {pixels / 1e6:.1f} MP exceeds the "
            f"{limits.max_pixels / 1e6:.1f} MP limit"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise ImageDecodeError(
            f"{where}: {width}x{height} has aspect ratio {aspect:.0f}:1, "
            f"above the {limits.max_aspect:g}:1 limit"
        )


def _bomb_message(exc: Exception, limits: ImageLimits) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"declared image size exceeds the {limits.max_pixels / 1e6:.1f} MP limit ({exc})"
    pixels = int(found.group(1))
    if pixels > limits.max_pixels:
        limit = f"the {limits.max_pixels / 1e6:.1f} MP limit"
    else:  # limits.max_pixels was raised above what Pillow's process-wide guard allows
        limit = "Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)"
    return f"declared size of {pixels / 1e6:.1f} MP exceeds {limit} (possible decompression bomb)"


# --- frames ------------------------------------------------------------------------------------


def _count_frames(im: Image.Image, fmt: str, data: bytes) -> int:
    if fmt == "GIF":
        # Pillow's GifImageFile.n_frames decodes every frame to count them: a CPU bomb for a
        # GIF of many large, highly compressible frames. Walking the block structure is free.
        return _count_gif_frames(data)
    return int(getattr(im, "n_frames", 1))


def _count_gif_frames(data: bytes) -> int:
    """Count image descriptors in a GIF stream without decoding any LZW data."""
    if len(data) < 13:
        return 1
    pos = 13  # header (6) + logical screen descriptor (7)
    flags = data[10]
    if flags & 0x80:
        pos += 3 * (2 << (flags & 0x07))  # global colour table
    frames = 0
    while pos < len(data):
        block = data[pos]
        if block == 0x2C:  # image descriptor: 10 bytes, optional local colour table, LZW data
            frames += 1
            if pos + 10 > len(data):
                break
            flags = data[pos + 9]
            pos += 10
            if flags & 0x80:
                pos += 3 * (2 << (flags & 0x07))
            pos = _skip_gif_sub_blocks(data, pos + 1)  # +1: LZW minimum code size
        elif block == 0x21:  # extension: introducer, label, sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 2)
        else:  # 0x3B trailer, or garbage after the last frame
            break
    return max(frames, 1)


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data):
        length = data[pos]
        pos += 1 + length
        if length == 0:
            break
    return pos


# --- metadata --------------------------------------------------------------------------------
#
# What is stored and exported carries pixels only. JPEG and PNG without a rotation are stripped
# losslessly (segments / chunks dropped, the compressed image data copied byte for byte); a rotated
# JPEG is re-encoded (quality 95) with the rotation applied, a rotated PNG re-encoded losslessly;
# WebP, GIF and TIFF (which keep metadata in many places) are stored as lossless PNG of the decoded
# first frame; BMP has no metadata. Transparency is flattened on white, as the model sees it.

_JPEG_KEEP_APP = {0xE0, 0xEE}  # APP0 JFIF, APP14 Adobe (colour transform); APP2 only as ICC profile
_PNG_DROP = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}  # XMP lives in iTXt


def strip_metadata(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[bytes, str]:
    """``(bytes without metadata, Pillow format)`` of an image file; raises ``ImageDecodeError``."""
    decoded = load_image(data, limits=limits, strip_metadata=True)
    return decoded.data, decoded.format


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF: _apply_exif_orientation left the pixels as they are
        return 1


def _without_metadata(data: bytes, fmt: str, orientation: int, rgb: Image.Image) -> tuple[bytes, str]:
    rotated = orientation not in (0, 1)
    try:
        if fmt == "JPEG" and not rotated:
            return _strip_jpeg(data), "JPEG"
        if fmt == "PNG" and not rotated:
            return _strip_png(data), "PNG"
    except ValueError:  # a structure we do not walk (decodable by Pillow all the same): re-encode
        pass
    if fmt == "BMP":
        return data, "BMP"
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, "JPEG", quality=95)
        return buf.getvalue(), "JPEG"
    rgb.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue(), "PNG"


def _strip_jpeg(data: bytes) -> bytes:
    """SOI, the segments that decoding needs, the scans, EOI; APP1 (EXIF, XMP), APP13 (IPTC), COM, the
    other APPn and anything after EOI (MPO's second image with its own EXIF) are dropped."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG SOI")
    out, pos, n = [b"\xff\xd8"], 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            out.append(data[pos:pos + 2])
            pos += 2
            continue
        if pos + 4 > n:
            raise ValueError("truncated JPEG segment")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos:end]
        is_app = 0xE0 <= marker <= 0xEF or marker == 0xFE
        if not is_app or marker in _JPEG_KEEP_APP or (marker == 0xE2 and segment[4:16] == b"ICC_PROFILE\0"):
            out.append(segment)
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not RSTn or a stuffed 0xFF00
            scan = pos
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    raise ValueError("JPEG scan without end")
                follower = data[pos + 1]
                if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                    pos += 2
                    continue
                break
            out.append(data[scan:pos])
    raise ValueError("JPEG without EOI")


def _strip_png(data: bytes) -> bytes:
    """Signature and every chunk but text (EXIF-in-text, XMP), eXIf and tIME; nothing after IEND."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("no PNG signature")
    out, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        if kind not in _PNG_DROP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    raise ValueError("PNG without IEND")


# --- orientation and colour --------------------------------------------------------------------


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    if _orientation(im) in (0, 1):
        return im  # no copy: a 40 MP float TIFF is 160 MB already
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # Malformed EXIF is metadata damage, not a reason to refuse a decodable photo.
        return im.copy()


def _to_rgb(im: Image.Image, where: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_gray_to_rgb(im).convert("RGB")
    try:
        # 1, L, P, CMYK (Adobe-inverted JPEG CMYK is undone by the JPEG plugin), YCbCr, RGBX, ...
        return flatten_on_white(im)
    except ValueError as exc:  # e.g. LAB: Pillow has no direct conversion
        raise ImageDecodeError(f"{where}: cannot convert {mode} image to RGB ({exc})") from exc


def flatten_on_white(im: Image.Image) -> Image.Image:
    """RGB copy with any transparency (alpha band, tRNS, RGBA palette) composited on white."""
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


HIGH_DEPTH_CHUNK_ROWS_PIXELS = 1 << 20  # pixels converted per strip of rows: bounds the temporaries


def _high_depth_gray_to_rgb(im: Image.Image) -> Image.Image:
    """Map 16-bit / 32-bit / float grayscale to 8-bit "L" by value range, not by clipping.

    Pillow's own ``convert("L")`` clips values above 255, which turns a 16-bit image white. Works in
    strips of rows in float32, so memory is the decoded image plus one byte per pixel plus one strip
    (not a float64 copy and its temporaries: ~34 bytes/pixel measured before, benchmarks/tiff_memory.py).
    """
    width, height = im.size
    rows = max(1, HIGH_DEPTH_CHUNK_ROWS_PIXELS // max(width, 1))
    strips = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(im.crop((0, top, width, bottom)))  # (rows, W), uint16 / int32 / float32

    gray = np.empty((height, width), dtype=np.uint8)  # (H, W)
    if im.mode.startswith("I;16"):
        for top, bottom in strips:
            gray[top:bottom] = (strip(top, bottom).astype(np.uint32) + 128) // 257  # 0..65535 -> 0..255, rounded
        return Image.fromarray(gray)
    lo, hi = np.inf, -np.inf  # first pass: the finite value range
    for top, bottom in strips:
        values = strip(top, bottom)
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:  # nothing finite
        lo = hi = 0.0
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0  # float images in [0, 1]
    elif lo >= 0.0 and hi <= (255.0 if im.mode == "F" else 65535.0):
        # "I" mostly carries 16-bit PGM/TIFF samples; floats in [0, 255] are already 8-bit.
        scale, offset = (1.0 if im.mode == "F" else 1.0 / 257.0), 0.0
    else:  # arbitrary range: stretch what is there
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    for top, bottom in strips:
        values = strip(top, bottom).astype(np.float32)
        values -= np.float32(offset)
        values *= np.float32(scale)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite -> 0, as before
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        gray[top:bottom] = values
    return Image.fromarray(gray)  # (H, W) uint8 -> "L"
