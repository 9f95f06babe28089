"""The load tests must measure what they say and leave nothing behind: a repeated "new photo" is answered from
the embedding cache and flatters every figure (benchmarks/latency.py ``unique_variant``), and a run must not
grow the built home's cache (benchmarks/replicas.py ``forget_load_test_images``)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # latency.py, replicas.py
from latency import photo_paths, unique_variant  # noqa: E402


def test_photo_variants_never_repeat_in_a_long_load_test(tmp_path):
    photos = photo_paths()
    # consecutive numbers (JPEG must keep one-bit differences apart) and the old formula's periods 256 and 768
    numbers = list(range(0, 300)) + [256 * k + 5 for k in range(1, 40)] + [768 * k for k in range(1, 40)]
    digests = {hashlib.sha256(unique_variant(photos[n % len(photos)], n, tmp_path).read_bytes()).hexdigest()
               for n in numbers}
    assert len(digests) == len(set(numbers))
    with pytest.raises(ValueError, match="variant number"):
        unique_variant(photos[0], 2**24, tmp_path)


def test_a_load_test_takes_back_its_photos_cache_entries_and_uploads(tmp_path):
    """The load-test home links the embedding cache to the built one (var/): after a phase, the entries of the
    photos it uploaded go, under every encoder's folder, and nothing else does."""
    from sqlalchemy.orm import Session

    from feedback_db import repository as repo
    from feedback_db.engine import init_db, make_engine
    from replicas import forget_load_test_images

    home, url = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'mmapp.db'}"
    (home / "uploads" / "ab").mkdir(parents=True)
    engine = make_engine(url)
    init_db(engine)
    sent, kept = hashlib.sha256(b"load-test photo").hexdigest(), hashlib.sha256(b"someone's photo").hexdigest()
    with Session(engine) as s, s.begin():
        repo.record_upload(s, sha256=sent, relpath=f"{sent[:2]}/{sent}.jpg", format="jpg", width=1, height=1, n_bytes=1)
    engine.dispose()
    entries = {}
    for identity in ("efficientnet-lite0@0123", "rapidocr-x_first8words"):
        for sha in (sent, kept):
            entries[identity, sha] = home / "cache" / "embeddings" / identity / sha[:2] / f"{sha}.npz"
            entries[identity, sha].parent.mkdir(parents=True, exist_ok=True)
            entries[identity, sha].write_bytes(b"npz")
    assert forget_load_test_images(home, url) == 2
    assert {key for key, path in entries.items() if path.exists()} == {(i, kept) for i, _ in entries}
    assert not (home / "uploads").exists()
