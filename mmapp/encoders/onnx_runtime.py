"""A frozen image tower exported once to ONNX and run by onnxruntime on CPU (about 4x less CPU per
picture than eager torch for EfficientNet-Lite0 here: benchmarks/caption_cost.py).

The export is cached under the weights folder, keyed by the tower's weights hash and the torch,
onnx and onnxruntime versions; it is written to a temporary file and renamed, so replicas sharing
one home never read a half-written file. No network, no database.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmapp.encoders.base import package_version, quiet_session_options
from mmapp.filelock import exclusive_file_lock

log = logging.getLogger(__name__)

IMAGE_RUNTIMES = ("auto", "torch", "onnx")
SERVING_BATCH = 4  # a served picture and its halves (mmapp.captioning.picture_halves) are at most this many
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


@dataclass(frozen=True)
class ImageRuntimeConfig:
    runtime: str = "auto"  # auto (onnx for a float32 CPU tower when onnx + onnxruntime import, else torch) | torch | onnx
    threads: int = 0  # onnxruntime intra-op threads for bulk calls (build, import, retrain); 0 = torch's thread count
    serving_threads: int = 1  # ... for calls of at most SERVING_BATCH pictures (a request): parallel requests fill the cores

    def __post_init__(self):
        if self.runtime not in IMAGE_RUNTIMES:
            raise ValueError(f"model.image_runtime must be one of {IMAGE_RUNTIMES}, got {self.runtime!r}")


def onnx_available() -> bool:
    """onnxruntime runs the graph; the onnx package is what ``torch.onnx.export`` needs to write it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _PooledTower(torch.nn.Module):
    """What the ONNX graph computes: pooled features (B, D) and ImageNet logits (B, 1000)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor):  # (B, 3, S, S)
        x = self.model.extract_features(pixels)  # (B, D, h, w)
        pooled = x.mean(dim=(2, 3))  # (B, D)
        return pooled, self.model._fc(pooled)


class OnnxImageTower:
    """``run(pixels) -> (features, logits)`` through onnxruntime; the session is built on first use.

    Thread-safe: onnxruntime sessions take concurrent ``run`` calls."""

    def __init__(self, model: torch.nn.Module, *, image_size: int, cache_dir: Path, key: str, threads: int = 0,
                 serving_threads: int = 1):
        self.model = model
        self.image_size = image_size
        self.cache_dir = Path(cache_dir)
        self.key = key  # tower name + weights hash: a different tower never reads this export
        self.threads = threads
        self.serving_threads = serving_threads
        self._sessions: dict[int, object] = {}  # intra-op threads -> session on the one exported graph
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        versions = f"torch{torch.__version__.split('+')[0]}-onnx{package_version('onnx')}-ort{package_version('onnxruntime')}"
        return self.cache_dir / "onnx" / f"{self.key}-{versions}.onnx"

    def export(self) -> Path:
        """Write the ONNX graph (dynamic batch) unless it is there; returns its path. One export at a
        time across threads and processes (replicas on one home); the file appears whole or not at all."""
        path = self.path
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _EXPORT_LOCK, exclusive_file_lock(path.parent / f".{path.name}.lock"):
            if not path.exists():  # another thread or replica may have written it while we waited
                self._write(path)
        return path

    def _write(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            wrapped = _PooledTower(self.model).eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's constant-folding notes
                torch.onnx.export(wrapped, (dummy,), tmp, dynamo=False, input_names=["pixels"],
                                  output_names=["features", "logits"], dynamic_axes={"pixels": {0: "batch"}},
                                  opset_version=17)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("image tower exported to ONNX: %s", path)

    def session(self, threads: int):
        """The session with ``threads`` intra-op threads (built once each)."""
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                self._sessions[threads] = ort.InferenceSession(str(self.export()), quiet_session_options(threads),
                                                               providers=["CPUExecutionProvider"])
            return self._sessions[threads]

    def threads_for(self, batch: int) -> int:
        """A request's few pictures run on ``serving_threads`` (requests in parallel share the cores better
        than threads inside one call: benchmarks/throughput.py); bulk batches on ``threads``."""
        if batch <= SERVING_BATCH and self.serving_threads > 0:
            return self.serving_threads
        return self.threads or torch.get_num_threads()

    def run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())  # (B, 3, S, S)
        features, logits = self.session(self.threads_for(len(x))).run(None, {"pixels": x})
        return torch.from_numpy(features), torch.from_numpy(logits)  # (B, D), (B, 1000)
