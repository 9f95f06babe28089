"""The load tests' "new photo" must be new: a repeat is answered from the embedding cache and flatters
every throughput and latency figure (benchmarks/latency.py ``unique_variant``)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
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
