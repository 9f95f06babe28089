"""Content-addressed file store for uploaded images: ``<root>/<sha[:2]>/<sha>.<ext>``.

Writes are atomic (temp file in the target folder, fsync, ``os.replace``) and idempotent, so a
crash never leaves a half-written blob under its final name. No database access here.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}  # Pillow id -> ext
_EXT = re.compile(r"[a-z0-9]{1,10}")
_RELPATH = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})\.([a-z0-9]{1,10})")


def normalize_ext(ext: str) -> str:
    """``".JPG"`` -> ``"jpg"``; raises on anything that could not be a plain file extension."""
    norm = ext.strip().lower().lstrip(".")
    if not _EXT.fullmatch(norm):
        raise ValueError(f"file extension must be 1-10 letters or digits, got {ext!r}")
    return norm


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def relpath_for(self, sha256: str, ext: str) -> str:
        return f"{sha256[:2]}/{sha256}.{normalize_ext(ext)}"

    def put(self, data: bytes, ext: str) -> tuple[str, str]:
        """Store ``data``; returns ``(sha256 hex, relpath)``. Storing the same bytes again is a no-op."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        sha256 = hashlib.sha256(data).hexdigest()
        relpath = self.relpath_for(sha256, ext)
        dest = self.path(relpath)
        if dest.is_file() and _sha256_of(dest) == sha256:
            return sha256, relpath  # already stored; a damaged copy falls through and is replaced
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{sha256[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, dest)  # atomic; a concurrent writer of the same bytes wins or loses harmlessly
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return sha256, relpath

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored blob; ``relpath`` must be one ``put`` returned (no escaping the root)."""
        if not _RELPATH.fullmatch(relpath) or relpath[:2] != relpath[3:5]:
            raise ValueError(f"not a blob store relpath (expected 'ab/ab…64 hex….ext'), got {relpath!r}")
        return self.root / relpath

    def open(self, relpath: str) -> BinaryIO:
        return self.path(relpath).open("rb")

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
