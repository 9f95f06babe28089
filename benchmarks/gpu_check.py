"""GPU check: the image tower in the placement ``resolve_placement('auto')`` picks (CUDA, bf16/fp16)
agrees with CPU float32 on real photos. Prints top-3 classes per photo and the feature cosine.

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from mmapp.device import resolve_placement  # noqa: E402
from mmapp.encoders import EncoderOptions, create_encoder  # noqa: E402
from mmapp.encoders.image import imagenet_class_names  # noqa: E402

PHOTOS = Path(__file__).resolve().parent.parent / "mmapp" / "assets" / "photos"


def main() -> None:
    auto, cpu = resolve_placement("auto"), resolve_placement("cpu")
    print("auto placement:", auto, torch.cuda.get_device_name() if auto.device.type == "cuda" else "")
    names = imagenet_class_names()
    photos = sorted(PHOTOS.glob("*.jpg"))
    images = [Image.open(p).convert("RGB") for p in photos]
    outs = {}
    for placement in (auto, cpu):
        enc = create_encoder("efficientnet-lite0", EncoderOptions(placement=placement, cache_dir=Path("/tmp")), kind="image")
        outs[str(placement)] = enc.encode(images)
    a, c = outs[str(auto)], outs[str(cpu)]
    cos = F.cosine_similarity(a.features, c.features, dim=-1)
    agree = (a.class_probs.argmax(-1) == c.class_probs.argmax(-1)).float().mean()
    for p, pa, pc, cs in zip(photos, a.class_probs, c.class_probs, cos):
        print(f"{p.name:>20}: {names[int(pa.argmax())]:<24} cpu: {names[int(pc.argmax())]:<24} feature cos {cs:.4f}")
    print(f"top-1 agreement {float(agree):.3f}, min feature cosine {float(cos.min()):.4f}")


if __name__ == "__main__":
    main()
