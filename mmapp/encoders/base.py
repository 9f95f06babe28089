"""What every encoder returns and how its identity (name + weights hash) is computed."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ImageFeatures:
    features: torch.Tensor  # (B, D_img) float32 on CPU, pooled tower output
    class_probs: torch.Tensor | None  # (B, 1000) ImageNet probabilities, None for towers without a classifier


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def tree_sha256(root: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pth", "*.onnx")) -> str:
    """Combined sha256 of the weight files below ``root`` (sorted by relative path)."""
    root = Path(root)
    digest = hashlib.sha256()
    files = sorted({p for pat in patterns for p in root.rglob(pat)})
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(patterns)}) under {root}")
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def package_version(dist: str) -> str:
    """The installed version of ``dist`` ("unknown" if it is not installed): part of cache keys."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def quiet_session_options(threads: int):
    """onnxruntime session options for serving beside other requests: ``threads`` intra-op threads, one
    inter-op thread, and no busy-waiting between calls (spinning idle threads burn the cores that
    concurrent requests need). Used by the image tower's sessions and by OCR's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
