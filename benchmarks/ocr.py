"""OCR speed and word accuracy on rendered memes: RapidOCR defaults vs RapidOCRReader at several det_side.

    python benchmarks/ocr.py [--n 20] [--size 512] [--sides 320,384,448,512,640] [--clipart DIR]

All readers run in one process and take turns on each meme, so background load hits them alike.
Pictures are scikit-image sample photos (plus clip-art PNGs from --clipart, if given); captions come
from the synthetic meme phrase pools. Word accuracy = 1 - word edit distance / reference words,
case-insensitive, line breaks ignored.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from mmapp.data.memes import GRIM_PHRASES, UPBEAT_PHRASES, compose_caption, meme_text, render_meme
from mmapp.encoders.ocr import OCRConfig, RapidOCRReader
from mmapp.evaluation import word_accuracy


def sample_pictures(clipart: Path | None, limit: int = 12) -> list[Image.Image]:
    import skimage.data

    pictures = [Image.fromarray(load()) for load in (skimage.data.chelsea, skimage.data.astronaut,
                                                     skimage.data.coffee, skimage.data.rocket,
                                                     skimage.data.camera, skimage.data.hubble_deep_field)]
    if clipart is not None:
        for path in sorted(clipart.rglob("*.png"))[:limit]:
            with Image.open(path) as im:
                im.thumbnail((1024, 1024))
                pictures.append(im.copy())
    return pictures


def sample_memes(n: int, size: int, seed: int, clipart: Path | None) -> list[tuple[Image.Image, str]]:
    rng = random.Random(seed)
    pictures = sample_pictures(clipart)
    phrases = list(UPBEAT_PHRASES + GRIM_PHRASES)
    memes = []
    for _ in range(n):
        top, bottom = compose_caption(rng.choice(phrases), rng)
        memes.append((render_meme(rng.choice(pictures), top, bottom, size=size), meme_text(top, bottom)))
    return memes


def rapidocr_defaults() -> Callable[[Image.Image], str]:
    """RapidOCR exactly as packaged (angle classifier on, detector min side 736, no space restoration)."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(image: Image.Image) -> str:
        result, _ = engine(image)
        return " ".join(line[1] for line in result or [])

    return read


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="memes")
    parser.add_argument("--size", type=int, default=512, help="meme side in pixels")
    parser.add_argument("--sides", default="320,384,448,512,640", help="det_side values to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clipart", type=Path, default=None, help="folder of clip-art PNGs to add as pictures")
    args = parser.parse_args(argv)

    memes = sample_memes(args.n, args.size, args.seed, args.clipart)
    readers: dict[str, Callable[[Image.Image], str]] = {"rapidocr-defaults": rapidocr_defaults()}
    for side in (int(s) for s in args.sides.split(",")):
        reader = RapidOCRReader(OCRConfig(det_side=side))
        readers[f"det_side={side}"] = lambda im, r=reader: r.read(im).text
    for read in readers.values():  # warm-up: model load and first-call allocations
        read(memes[0][0])

    seconds: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}  # process CPU time: robust to other load
    accuracy: dict[str, list[float]] = {name: [] for name in readers}
    for image, reference in memes:
        for name, read in readers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            text = read(image)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            accuracy[name].append(word_accuracy(reference, text))

    base = statistics.mean(seconds["rapidocr-defaults"])
    print(f"{args.n} memes of {args.size}px, seed {args.seed}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'reader':<20} {'s/meme':>8} {'median':>8} {'cpu s':>8} {'speed-up':>9} {'word acc':>9}")
    for name in readers:
        mean = statistics.mean(seconds[name])
        print(f"{name:<20} {mean:8.3f} {statistics.median(seconds[name]):8.3f} {statistics.mean(cpu[name]):8.3f}"
              f" {base / mean:8.2f}x {statistics.mean(accuracy[name]):9.3f}")


if __name__ == "__main__":
    main()
