"""Embedding cache keyed by content hash and encoder identity; writes are atomic.

Layout: ``<root>/<encoder-identity>/<sha[:2]>/<sha>.npz``. An entry is written to a temporary file
in the same folder and renamed into place, so a crash leaves either no entry or a whole one; an
entry that cannot be read (disk trouble, manual edits) is treated as missing and recomputed.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _slug(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", identity)


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, identity: str, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{16,64}", key):
            raise ValueError(f"cache key must be a hex digest, got {key!r}")
        return self.root / _slug(identity) / key[:2] / f"{key}.npz"

    def ref(self, identity: str, key: str) -> str:
        """A short reference stored with predictions: '<identity>/<key>'."""
        return f"{_slug(identity)}/{key}"

    def get(self, identity: str, key: str) -> Arrays | None:
        path = self._path(identity, key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # unreadable entry: recompute and overwrite
            return None

    def forget(self, key: str) -> int:
        """Remove ``key``'s entries under every encoder identity (its embeddings, its OCR reads); the count."""
        removed = 0
        for folder in (self.root.iterdir() if self.root.is_dir() else ()):
            if folder.is_dir():
                try:
                    self._path(folder.name, key).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def put(self, identity: str, key: str, arrays: Arrays) -> None:
        path = self._path(identity, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            # No fsync: the rename already makes a crashed process leave no partial entry, and after a
            # power loss an unreadable entry is recomputed (get() treats it as missing). Saves ~10-40 ms
            # per upload on the request path.
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(self, identity: str, keys: Sequence[str],
                       compute: Callable[[list[int]], list[Arrays]]) -> tuple[list[Arrays], int]:
        """Entries for ``keys``; ``compute(missing_indices)`` fills the gaps, which are then stored.

        Returns (entries in key order, number computed). Duplicate keys are computed once.
        """
        found: dict[str, Arrays] = {}
        for key in dict.fromkeys(keys):
            entry = self.get(identity, key)
            if entry is not None:
                found[key] = entry
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in found:
                first_index.setdefault(key, i)
        missing = list(first_index.values())
        if missing:
            computed = compute(missing)
            if len(computed) != len(missing):
                raise RuntimeError(f"compute returned {len(computed)} entries for {len(missing)} keys")
            for i, entry in zip(missing, computed):
                self.put(identity, keys[i], entry)
                found[keys[i]] = entry
        return [found[k] for k in keys], len(missing)
