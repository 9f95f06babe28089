from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from feedback_db.blobstore import BlobStore

DATA = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10


def _all_files(store: BlobStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_put_is_content_addressed(store):
    sha, relpath = store.put(DATA, ".PNG")
    assert sha == hashlib.sha256(DATA).hexdigest()
    assert relpath == f"{sha[:2]}/{sha}.png"
    assert store.path(relpath).read_bytes() == DATA
    with store.open(relpath) as f:
        assert f.read() == DATA
    assert store.exists(relpath)


def test_put_same_bytes_again_is_a_no_op(store):
    sha, relpath = store.put(DATA, "png")
    before = os.stat(store.path(relpath))
    assert store.put(DATA, "png") == (sha, relpath)
    after = os.stat(store.path(relpath))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert _all_files(store) == [relpath]


def test_damaged_blob_is_rewritten(store):
    _, relpath = store.put(DATA, "png")
    store.path(relpath).write_bytes(b"x" * len(DATA))
    store.put(DATA, "png")
    assert store.path(relpath).read_bytes() == DATA


def test_failed_write_leaves_neither_blob_nor_temp_file(store, monkeypatch):
    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put(DATA, "png")
    assert _all_files(store) == []


def test_concurrent_puts_of_the_same_image(store):
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = set(pool.map(lambda _: store.put(DATA, "png"), range(16)))
    [(_, relpath)] = results
    assert _all_files(store) == [relpath]
    assert store.path(relpath).read_bytes() == DATA


@pytest.mark.parametrize("ext", ["", "../png", "p/n", "jpeg!", "x" * 11])
def test_bad_extensions_are_refused(store, ext):
    with pytest.raises(ValueError, match="extension"):
        store.put(DATA, ext)


@pytest.mark.parametrize("relpath", ["../etc/passwd", "/abs/path.png", "ab/" + "c" * 64 + ".png", "x.png"])
def test_paths_outside_the_store_are_refused(store, relpath):
    with pytest.raises(ValueError, match="relpath"):
        store.path(relpath)


def test_put_requires_bytes(store):
    with pytest.raises(TypeError, match="str"):
        store.put("not bytes", "png")
