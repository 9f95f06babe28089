"""Peak memory of decoding a 32-bit float TIFF upload: the old float64 path against the bounded one.

    python benchmarks/tiff_memory.py                 # 6000x4000 (24 MP) float32 TIFF, deflate-compressed
    python benchmarks/tiff_memory.py --mp 40 --json  # at the 40 MP upload limit

Each variant runs ``mmapp.imageio.load_image`` on the same file in a fresh subprocess and reports
its peak RSS above the RSS just before decoding (``ru_maxrss``, so Pillow's own buffers count) and the
tracemalloc peak (numpy's temporaries), in bytes per pixel. "before" is the code this change replaced
(a verbatim copy below: float64 copy, mask, scaled copy, where, rint); "after" is the library as it is.
Both outputs are compared pixel by pixel (the baseline beside the result, same run, same file).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def before_high_depth_gray_to_rgb(im):
    """The conversion as it was before issue 11 item 7 (kept here as the baseline)."""
    from PIL import Image

    values = np.asarray(im)
    if im.mode.startswith("I;16"):
        gray = (values.astype(np.uint32) + 128) // 257
    else:
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        lo = float(values[finite].min()) if finite.any() else 0.0
        hi = float(values[finite].max()) if finite.any() else 0.0
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        elif lo >= 0.0 and hi <= (255.0 if im.mode == "F" else 65535.0):
            scaled = values if im.mode == "F" else values / 257.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        gray = np.rint(np.where(finite, scaled, 0.0))
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))


def before_apply_exif_orientation(im):
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im.copy()


def child(variant: str, path: str, out: str) -> None:
    import resource
    import tracemalloc

    from mmapp import imageio

    if variant == "before":
        imageio._high_depth_gray_to_rgb = before_high_depth_gray_to_rgb
        imageio._apply_exif_orientation = before_apply_exif_orientation
    data = Path(path).read_bytes()
    limits = imageio.ImageLimits(max_bytes=1 << 30, max_pixels=50_000_000)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the benchmark sizes its own file; load_image checks max_pixels
    rss_before = _rss_now()
    tracemalloc.start()
    decoded = imageio.load_image(data, limits=limits)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    gray = np.asarray(decoded.image)[..., 0]
    np.save(out + ".npy", gray)
    Path(out).write_text(json.dumps({"peak_rss_above_start": peak - rss_before, "tracemalloc_peak": traced_peak}))


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_tiff(path: Path, width: int, height: int) -> int:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    values = (np.sin(x / 50.0) * np.cos(y / 70.0) * 1000.0).astype(np.float32)  # outside [0, 255]: stretched
    values[::997, ::991] = np.nan  # a few non-finite samples
    Image.fromarray(values, mode="F").save(path, "TIFF", compression="tiff_adobe_deflate")
    return path.stat().st_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mp", type=float, default=24.0, help="megapixels (3:2)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    height = int((args.mp * 1e6 / 1.5) ** 0.5)
    width = int(height * 1.5)
    pixels = width * height
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.tif"
        size = make_tiff(path, width, height)
        outputs = {}
        for variant in ("before", "after"):
            out = str(Path(tmp) / f"{variant}.json")
            subprocess.run([sys.executable, __file__, "--child", variant, str(path), out], check=True)
            results[variant] = json.loads(Path(out).read_text())
            outputs[variant] = np.load(out + ".npy")
        max_diff = int(np.abs(outputs["before"].astype(int) - outputs["after"].astype(int)).max())
    report = {"width": width, "height": height, "file_bytes": size, "max_pixel_difference": max_diff,
              **{v: {"peak_rss_bytes_per_pixel": round(r["peak_rss_above_start"] / pixels, 2),
                     "tracemalloc_bytes_per_pixel": round(r["tracemalloc_peak"] / pixels, 2),
                     "peak_rss_mb": round(r["peak_rss_above_start"] / 2**20)} for v, r in results.items()}}
    report["rss_ratio_before_over_after"] = round(report["before"]["peak_rss_bytes_per_pixel"]
                                                  / report["after"]["peak_rss_bytes_per_pixel"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"float32 TIFF {width}x{height} ({pixels / 1e6:.1f} MP), file {size / 2**20:.1f} MiB; "
          f"outputs differ by at most {max_diff} grey level(s)")
    print(f"{'variant':>7} | peak RSS above start | B/px (RSS) | B/px (tracemalloc, numpy)")
    for v in ("before", "after"):
        r = report[v]
        print(f"{v:>7} | {r['peak_rss_mb']:>15} MB | {r['peak_rss_bytes_per_pixel']:>10} | "
              f"{r['tracemalloc_bytes_per_pixel']:>10}")
    print(f"before/after (RSS): {report['rss_ratio_before_over_after']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
