"""Server-side cost of one caption (wall and CPU), eager-torch image tower against onnxruntime, in one run.

Both predictors caption the same fresh photos (pixels nudged, so nothing comes from the embedding or
OCR caches), interleaved so machine load hits both alike; one intra-op thread each, as a request runs
under load (``model.image_runtime_serving_threads``).

    HF_HUB_OFFLINE=1 python benchmarks/caption_cost.py [--photos 48]

Prints per runtime: mean wall and CPU ms per caption, the mean of each stage the predictor times
(``encode_image``, ``rank``, ``compose``: halves of the picture and OCR), and the CPU ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import photo_paths, unique_variant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=48)
    args = ap.parse_args()

    import torch

    from mmapp.config import load_config
    from mmapp.imageio import load_image
    from mmapp.pipeline import bank_from_items
    from mmapp.predictor import Predictor

    torch.set_num_threads(1)
    predictors = {}
    for runtime in ("torch", "onnx"):
        config = load_config(model={"image_runtime": runtime})
        predictors[runtime] = Predictor.from_config(config, caption_bank=bank_from_items(config))
    work = Path(tempfile.mkdtemp(prefix="caption-cost-"))
    photos = photo_paths()
    images = {name: [load_image(unique_variant(photos[n % len(photos)], 20_000 + 2 * n + i, work))
                     for n in range(args.photos + 1)]
              for i, name in enumerate(predictors)}  # a different nudge per runtime: no shared cache entries
    stats = {name: {"wall": [], "cpu": [], "stages": {}} for name in predictors}
    for name, predictor in predictors.items():
        predictor.caption(images[name][0])  # warm: OCR and phrase tables load on first use
    for n in range(1, args.photos + 1):
        for name, predictor in predictors.items():
            wall, cpu = time.perf_counter(), time.process_time()
            result = predictor.caption(images[name][n])
            stats[name]["wall"].append((time.perf_counter() - wall) * 1e3)
            stats[name]["cpu"].append((time.process_time() - cpu) * 1e3)
            for stage, ms in result.timings_ms.items():
                stats[name]["stages"].setdefault(stage, []).append(ms)
    for name, st in stats.items():
        stages = ", ".join(f"{k} {np.mean(v):.1f}" for k, v in st["stages"].items())
        print(f"{name:6s} wall {np.mean(st['wall']):6.1f} ms  cpu {np.mean(st['cpu']):6.1f} ms per caption "
              f"(n={len(st['wall'])}; stages, mean ms: {stages})")
    ratio = np.mean(stats["torch"]["cpu"]) / np.mean(stats["onnx"]["cpu"])
    print(f"CPU per caption, torch / onnx: {ratio:.2f}x")


if __name__ == "__main__":
    main()
