"""Images/s and captions/s through the frozen towers, batched vs one at a time (ratio in one process).

    python benchmarks/embed.py [--device cpu|cuda] [--n-images 64] [--n-captions 512]

Uses real photos from mmapp/assets/photos (resized copies cycle to n) and their captions; the
embedding cache is bypassed so the towers really run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmapp.device import resolve_placement  # noqa: E402
from mmapp.encoders import EncoderOptions, create_encoder  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent / "mmapp" / "assets" / "photos"


def rate(fn, items, batch: int) -> float:
    fn(items[:batch])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(0, len(items), batch):
        fn(items[s:s + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--n-captions", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-text", action="store_true", help="image tower only (e.g. where MiniLM is not installed)")
    args = ap.parse_args()
    placement = resolve_placement(args.device)
    opts = EncoderOptions(placement=placement, cache_dir=Path("/tmp/mmapp-bench"))
    image_enc = create_encoder("efficientnet-lite0", opts, kind="image")
    text_enc = None if args.skip_text else create_encoder("minilm", opts, kind="text")
    lines = [l.split("\t") for l in (PHOTOS / "captions.tsv").read_text().splitlines() if l and not l.startswith("#")]
    photos = [Image.open(PHOTOS / name).convert("RGB") for name, _ in lines]
    images = [photos[i % len(photos)] for i in range(args.n_images)]
    captions = [f"{lines[i % len(lines)][1]} ({i})" for i in range(args.n_captions)]
    image_enc.batch_size = args.batch
    results = {
        "device": str(placement), "gpu": torch.cuda.get_device_name() if placement.device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "images_per_s_single": rate(image_enc.encode, images, 1),
        "images_per_s_batched": rate(image_enc.encode, images, args.batch),
    }
    results["image_batch_speedup"] = results["images_per_s_batched"] / results["images_per_s_single"]
    if text_enc is not None:
        text_enc.batch_size = args.batch
        results["captions_per_s_single"] = rate(text_enc.encode, captions, 1)
        results["captions_per_s_batched"] = rate(text_enc.encode, captions, args.batch)
        results["caption_batch_speedup"] = results["captions_per_s_batched"] / results["captions_per_s_single"]
    for k, v in results.items():
        print(f"{k:>24}: {v:.1f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
