"""Bounded decoding of high-depth TIFFs (issue 11, item 7): float32 no longer goes through float64."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from mmapp import imageio
from mmapp.imageio import ImageLimits, load_image


def float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, "TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def reference_gray(values: np.ndarray) -> np.ndarray:
    """The naive float64 mapping the bounded code must reproduce (stretch of the finite range)."""
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    lo, hi = v[finite].min(), v[finite].max()
    return np.clip(np.rint(np.where(finite, (v - lo) * (255.0 / (hi - lo)), 0.0)), 0, 255).astype(np.uint8)


def test_float_tiff_matches_the_naive_reference_across_strips(monkeypatch):
    monkeypatch.setattr(imageio, "HIGH_DEPTH_CHUNK_ROWS_PIXELS", 97 * 5)  # many strips, a ragged last one
    rng = np.random.default_rng(0)
    values = rng.normal(0, 300, size=(53, 97)).astype(np.float32)
    values[3, 4], values[40, 90], values[7, 7] = np.nan, np.inf, -np.inf
    gray = np.asarray(load_image(float_tiff(values)).image)[..., 0]
    assert np.abs(gray.astype(int) - reference_gray(values).astype(int)).max() <= 1


@pytest.mark.parametrize("scale", [1.0, 255.0])  # [0, 1] floats and already-8-bit floats
def test_float_tiff_in_known_ranges(scale):
    values = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1)) * scale
    gray = np.asarray(load_image(float_tiff(values)).image)[..., 0]
    assert gray[0, 0] == 0 and gray[0, -1] == 255


def test_numpy_temporaries_are_one_byte_per_pixel_plus_a_strip():
    width, height = 2000, 1500
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    data = float_tiff(np.sin(x / 40) * np.cos(y / 60) * 1000)
    limits = ImageLimits(max_bytes=1 << 30)
    tracemalloc.start()
    load_image(data, limits=limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    strip = 5 * 4 * imageio.HIGH_DEPTH_CHUNK_ROWS_PIXELS  # float32 strips: crop, copy, finite values, allocator slack
    # was ~34 bytes/pixel (~100 MB here) through float64 (benchmarks/tiff_memory.py)
    assert peak < 2 * width * height + strip, f"{peak / (width * height):.1f} bytes/pixel"
