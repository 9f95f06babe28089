"""Served caption latency, before/after a wording change, in one run: the same server captions every
guard photo under each policy in turn (interleaved, so load changes hit both alike).

    HF_HUB_OFFLINE=1 python benchmarks/caption_latency.py [--rounds 3] [--before mbr_temperature=0] [--after mbr_temperature=1]

Prints the median and p90 of ``Predictor.caption`` wall time per policy (image features come from the
embedding cache after the first round, as for a photo seen before; the halves of the picture and the
wording are computed every time). The MBR phrase table is built before timing (once per server).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_quality import parse_policy, read_references  # noqa: E402
from mmapp.captioning import GUARD_EXTRA_PHOTOS_TSV, GUARD_PHOTOS_TSV, CaptionPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", action="append", default=["mbr_temperature=0"], metavar="FIELD=VALUE",
                    help="the 'before' policy: CaptionPolicy() with these fields (default: MBR off)")
    ap.add_argument("--after", action="append", default=[], metavar="FIELD=VALUE",
                    help="the 'after' policy: CaptionPolicy() with these fields (default: the defaults)")
    args = ap.parse_args()

    from mmapp.config import load_config
    from mmapp.imageio import load_image
    from mmapp.pipeline import bank_from_items
    from mmapp.predictor import Predictor

    config = load_config()
    predictor = Predictor.from_config(config, caption_bank=bank_from_items(config))
    predictor.phrase_space()
    images = [load_image(p) for p in read_references(GUARD_PHOTOS_TSV, GUARD_EXTRA_PHOTOS_TSV)]
    policies = {"before": parse_policy(args.before), "after": parse_policy(args.after)}
    for im in images:  # warm: image features into the cache, OCR read once
        predictor.caption(im)
    times: dict[str, list[float]] = {k: [] for k in policies}
    for _ in range(args.rounds):
        for im in images:
            for name, policy in policies.items():
                predictor.caption_policy = policy
                t0 = time.perf_counter()
                predictor.caption(im)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name, ms in times.items():
        diff = {k: v for k, v in dataclasses.asdict(policies[name]).items() if v != getattr(CaptionPolicy(), k)}
        print(f"{name:18} median {np.median(ms):6.1f} ms  p90 {np.percentile(ms, 90):6.1f} ms  "
              f"(n={len(ms)}; {diff or 'defaults'})")


if __name__ == "__main__":
    main()
