"""Latency (batch 1) and throughput (batch 64) of a BLIP-base-sized captioner and of the ViT-B/32
open_clip towers, in fp16/bf16 on CUDA when present.

Weights are random (speed does not depend on them; nothing is downloaded): the captioner is
``BlipForConditionalGeneration(BlipConfig())`` (ViT-B/16 at 384 px + a BERT-base decoder, the
shapes of ``Salesforce/blip-image-captioning-base``), generating ``--max-new-tokens`` tokens
greedily with the KV cache (``min_new_tokens`` = ``max_new_tokens``, so every run decodes the same
length); the towers are ``open_clip.create_model('ViT-B-32')`` (image 224 px, text 77 tokens).

    python benchmarks/gpu_captioner.py                          # CUDA, fp16 and bf16
    python benchmarks/gpu_captioner.py --device cpu --quick     # CPU, small models and sizes (a smoke run)
    python benchmarks/gpu_captioner.py --json out.json

Times are medians over ``--repeats`` runs after ``--warmup`` runs, with ``torch.cuda.synchronize``
around each; throughput is images (or texts) per second at the large batch.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _timed(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> dict:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def blip_model(quick: bool):
    from transformers import BlipConfig, BlipForConditionalGeneration

    if quick:
        config = BlipConfig(
            vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 96, "patch_size": 16},
            text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "encoder_hidden_size": 64})
    else:
        config = BlipConfig()  # BLIP-base: ViT-B/16 384 px, BERT-base decoder, 30524 tokens
    torch.manual_seed(0)
    return BlipForConditionalGeneration(config).eval(), config.vision_config.image_size


def clip_model(quick: bool):
    import open_clip

    torch.manual_seed(0)
    if quick:
        cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                               "head_width": 32},
               "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
        return open_clip.CLIP(**cfg).eval(), 64, 24
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.eval(), 224, 77


def bench_captioner(*, device: torch.device, dtype: torch.dtype, quick: bool, batches: tuple[int, int],
                    max_new_tokens: int, warmup: int, repeats: int) -> dict:
    model, size = blip_model(quick)
    model = model.to(device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"model": "BlipForConditionalGeneration(BlipConfig())" + (" quick" if quick else ""),
           "params_millions": round(n_params / 1e6, 1), "image_size": size, "max_new_tokens": max_new_tokens}
    for batch in batches:
        px = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        gen = lambda: model.generate(pixel_values=px, max_new_tokens=max_new_tokens,  # noqa: E731
                                     min_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        t = _timed(gen, device=device, warmup=warmup, repeats=repeats)
        out[f"batch{batch}"] = {**t, "images_per_s": batch / (t["median_ms"] / 1e3)}
    return out


def bench_towers(*, device: torch.device, dtype: torch.dtype, quick: bool, batches: tuple[int, int],
                 warmup: int, repeats: int) -> dict:
    model, size, ctx = clip_model(quick)
    model = model.to(device, dtype)
    out = {"model": "open_clip ViT-B-32" + (" quick (tiny config)" if quick else ""), "image_size": size,
           "context_length": ctx}
    for batch in batches:
        px = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        tokens = torch.randint(1, 49000, (batch, ctx), device=device)
        ti = _timed(lambda: model.encode_image(px), device=device, warmup=warmup, repeats=repeats)
        tt = _timed(lambda: model.encode_text(tokens), device=device, warmup=warmup, repeats=repeats)
        out[f"image_batch{batch}"] = {**ti, "per_s": batch / (ti["median_ms"] / 1e3)}
        out[f"text_batch{batch}"] = {**tt, "per_s": batch / (tt["median_ms"] / 1e3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cuda | cpu")
    ap.add_argument("--dtypes", default=None,
                    help="comma list of fp16,bf16,fp32 (default: fp16,bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--quick", action="store_true", help="small models and batch sizes: a smoke run on CPU")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="caption length (default 20; quick 5)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    if device.type == "cpu" and not args.quick:
        print("on CPU the full-size run takes very long: pass --quick (small models and sizes)", file=sys.stderr)
        return 2
    dtypes = (args.dtypes or ("fp16,bf16" if device.type == "cuda" else "fp32")).split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; valid: {list(DTYPES)}", file=sys.stderr)
        return 2
    batches = (1, 4) if args.quick else (1, 64)
    max_new = args.max_new_tokens or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "quick": args.quick, "batches": list(batches), "results": {}}
    for name in dtypes:
        dtype = DTYPES[name]
        report["results"][name] = {
            "captioner": bench_captioner(device=device, dtype=dtype, quick=args.quick, batches=batches,
                                         max_new_tokens=max_new, warmup=warmup, repeats=repeats),
            "towers": bench_towers(device=device, dtype=dtype, quick=args.quick, batches=batches,
                                   warmup=warmup, repeats=repeats),
        }
        cap, tow = report["results"][name]["captioner"], report["results"][name]["towers"]
        b1, bn = batches
        print(f"[{name}] captioner ({cap['params_millions']} M params, {max_new} tokens): "
              f"batch {b1} {cap[f'batch{b1}']['median_ms']:.1f} ms, "
              f"batch {bn} {cap[f'batch{bn}']['images_per_s']:.1f} images/s")
        print(f"[{name}] towers: image batch {b1} {tow[f'image_batch{b1}']['median_ms']:.1f} ms, "
              f"batch {bn} {tow[f'image_batch{bn}']['per_s']:.0f} images/s; "
              f"text batch {b1} {tow[f'text_batch{b1}']['median_ms']:.1f} ms, "
              f"batch {bn} {tow[f'text_batch{bn}']['per_s']:.0f} texts/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
