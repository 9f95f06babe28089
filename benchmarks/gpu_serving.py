"""The serving path on the device it runs on: server-side caption and meme latency, concurrent caption
throughput with the micro-batcher off/on, and bulk embedding from JPEG files (PIL decode vs decode on
the device) beside the encoder-only figure, all in one process (issue 13 item 5).

    python benchmarks/gpu_serving.py [--home var] [--device auto] [--n 40] [--bulk 512] [--json out.json]
    python benchmarks/gpu_serving.py --device cpu --quick      # smoke run on CPU (numbers mean little)

* caption / meme: ``Predictor.caption`` / ``Predictor.analyze_meme`` on decoded uploads (what a request
  costs once the upload is decoded: towers, OCR, fusion, ranking); every picture is a fresh variant, so
  no cache answers. Meme pictures carry rendered top/bottom text, so OCR runs.
* concurrent captions: ``--threads`` callers at once, ``model.batch_images`` off vs on.
* bulk: ``Embedder.image_files`` without a cache on ``--bulk`` JPEG files, with ``decode_on_device``
  off (PIL) and on (``torchvision.io.decode_jpeg`` on the tower's device), beside the encoder alone on
  pixels already on the device (the ceiling). Targets on a GPU (issue 13): caption p50 <= 50 ms, meme
  p50 <= 250 ms, bulk >= 50 % of encoder-only.
The home (``--home``, default ``MMAPP_HOME`` / var) should hold a built model (``models/``); the
bridge is served otherwise and the meme rows are left out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.latency import percentile, photo_paths, unique_meme, unique_variant  # noqa: E402
from mmapp.config import load_config  # noqa: E402
from mmapp.embedder import Embedder  # noqa: E402
from mmapp.imageio import load_image  # noqa: E402
from mmapp.pipeline import bank_from_items  # noqa: E402
from mmapp.predictor import Predictor  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stats_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(statistics.median(values), 2), "p95_ms": round(percentile(values, 0.95), 2)}


def serial_latency(fn, inputs: list) -> dict:
    fn(inputs[0])  # warm-up: kernels, OCR models, lazy tables
    times = []
    for x in inputs[1:]:
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return stats_ms(times)


def concurrent_rate(fn, inputs: list, threads: int) -> dict:
    fn(inputs[0])
    queue, lock, lat = list(inputs[1:]), threading.Lock(), []

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                x = queue.pop()
            t0 = time.perf_counter()
            fn(x)
            with lock:
                lat.append((time.perf_counter() - t0) * 1e3)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    return {"per_s": round(len(lat) / elapsed, 2), **stats_ms(lat)}


def bulk_rates(embedder: Embedder, files: list[Path], batch: int) -> dict:
    enc = embedder.image_encoder
    out = {}
    for name, on_device in (("pil_decode", False), ("device_decode", True)):
        bulk = Embedder(image_encoder=enc, text_encoder=None, cache=None, decode_on_device=on_device)
        bulk.image_files(files[:batch], chunk=batch)  # warm-up
        sync()
        t0 = time.perf_counter()
        bulk.image_files(files, chunk=batch)
        sync()
        out[f"{name}_img_s"] = round(len(files) / (time.perf_counter() - t0), 1)
    pixels = enc.preprocess_jpegs([f.read_bytes() for f in files[:batch]])  # on the device already
    with torch.inference_mode():
        enc.forward_pixels(pixels)
        sync()
        rounds = max(1, len(files) // batch)
        t0 = time.perf_counter()
        for _ in range(rounds):
            enc.forward_pixels(pixels)
        sync()
    out["encoder_only_img_s"] = round(rounds * batch / (time.perf_counter() - t0), 1)
    for name in ("pil_decode", "device_decode"):
        out[f"{name}_vs_encoder"] = round(out[f"{name}_img_s"] / out["encoder_only_img_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=None, help="MMAPP_HOME with a built model (default: the config's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=40, help="requests per latency row")
    ap.add_argument("--threads", type=int, default=16, help="concurrent callers for the throughput rows")
    ap.add_argument("--bulk", type=int, default=512, help="JPEG files for the bulk rows")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a few items per row: a smoke run")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.threads, args.bulk, args.batch = 6, 2, 16, 8
    config = load_config(model={"device": args.device, "batch_images": "off"},
                         **({"storage": {"home": args.home}} if args.home else {}))
    predictor = Predictor.from_config(config, caption_bank=bank_from_items(config))
    enc = predictor.embedder.image_encoder
    report = {"device": str(enc.placement), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "python": platform.python_version(), "model_version": predictor.version,
              "caption_bank_entries": len(predictor._pending_bank) + len(predictor._bank_texts)}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        photos = photo_paths()
        variants = [load_image(unique_variant(photos[i % len(photos)], i, work))
                    for i in range(args.n + 1)]
        report["caption"] = serial_latency(predictor.caption, variants)
        if predictor.labels:
            memes = [load_image(unique_meme(photos[i % len(photos)], i, work)) for i in range(args.n + 1)]
            report["meme"] = serial_latency(lambda im: predictor.analyze_meme(im), memes)
        fresh = [load_image(unique_variant(photos[i % len(photos)], 10_000 + i, work))
                 for i in range(max(args.n, 4 * args.threads) + 1)]
        report["caption_concurrent_unbatched"] = concurrent_rate(predictor.caption, fresh, args.threads)
        predictor.enable_batching(max_size=config.model.batch_max_size, max_wait_ms=config.model.batch_max_wait_ms)
        fresh = [load_image(unique_variant(photos[i % len(photos)], 20_000 + i, work))
                 for i in range(max(args.n, 4 * args.threads) + 1)]
        report["caption_concurrent_batched"] = concurrent_rate(predictor.caption, fresh, args.threads)
        files = [unique_variant(photos[i % len(photos)], 30_000 + i, work) for i in range(args.bulk)]
        report["bulk"] = bulk_rates(predictor.embedder, files, args.batch)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
