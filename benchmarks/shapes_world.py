"""The clip profile on the shapes world, end to end: a tiny open_clip model pre-trained on part of the
world, then ``python -m mmapp build-bootstrap`` with it as a ``local-dir:`` checkpoint on another part.

Served retrieval on held-out scenes is compared with the towers' native zero-shot cosine (the
baseline of pre-aligned towers) and with the previous design for towers without an ImageNet head:
projections from random initialisation, served alone (``native=False``, no baseline, mix 0).

    python benchmarks/shapes_world.py --work /tmp/shapes            # prints JSON; ~5-10 min on 2 CPU cores
    python benchmarks/shapes_world.py --work /tmp/shapes --json out.json

The tiny model is trained once into ``WORK/tiny-clip`` (reused when its recipe file matches).
Splits of the world's 1104 scenes (seed 0): pre-train 60 %, bootstrap train 10 %, val 10 %, test 20 %;
the guard set is 48 pre-training scenes drawn anew (``WORK/home`` is rebuilt on every run).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmapp.data.shapes import (TinyClipRecipe, split_scenes, tiny_clip_config, train_tiny_clip,  # noqa: E402
                               write_bootstrap_dataset, write_pairs)

REPO = Path(__file__).resolve().parent.parent
FRACTIONS = {"pretrain": 0.6, "train": 0.1, "val": 0.1, "test": 0.2}
GUARD_SCENES = 48
TRAIN_VARIANTS = 1  # pictures per bootstrap training caption (see docs/results.md for 4)


def ensure_tiny_clip(work: Path, *, recipe: TinyClipRecipe = TinyClipRecipe(epochs=20), threads: int = 1) -> Path:
    """The tiny open_clip checkpoint under ``work/tiny-clip``, trained unless one with this recipe exists."""
    directory = work / "tiny-clip"
    scenes = split_scenes(FRACTIONS, seed=0)
    stamp = json.dumps({"recipe": dataclasses.asdict(recipe), "model_cfg": tiny_clip_config(),
                        "pretrain": hashlib.sha256("\n".join(s.key for s in scenes["pretrain"]).encode()).hexdigest()},
                       sort_keys=True)
    if (directory / "recipe.json").is_file() and (directory / "recipe.json").read_text() == stamp:
        return directory
    train_tiny_clip(scenes["pretrain"], directory, recipe=recipe, threads=threads)
    (directory / "recipe.json").write_text(stamp)
    return directory


def clip_env(home: Path, checkpoint: Path) -> dict[str, str]:
    """The clip profile on the tiny checkpoint; the guard set is ``home/guard/pairs.tsv`` (see :func:`run`)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MMAPP_PROFILE": "clip", "MMAPP_HOME": str(home),
            "MMAPP__MODEL__CLIP_PRETRAINED": f"local-dir:{checkpoint}", "MMAPP__MODEL__DEVICE": "cpu",
            "MMAPP__DATA__GUARD_PHOTOS": str(home / "guard" / "pairs.tsv"), "PYTHONPATH": str(REPO)}


def cli(env: dict[str, str], *args: str, timeout: int = 1200) -> dict:
    out = subprocess.run([sys.executable, "-m", "mmapp", *args, "--json"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"python -m mmapp {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def projections_only(home: Path, checkpoint: Path) -> dict:
    """The previous design on the same data: projections from random init, no baseline, served alone."""
    from mmapp.config import load_config
    from mmapp.device import seed_everything
    from mmapp.pipeline import embed_pairs_file, evaluate_retrieval
    from mmapp.towers import Towers
    from mmapp.training import SpaceData, fit_space

    config = load_config("clip", env=clip_env(home, checkpoint))
    seed_everything(config.train.seed)
    towers = Towers.from_config(config)
    ds = config.paths.dataset()
    feats = {s: embed_pairs_file(towers.embedder, ds / f"{s}.tsv").features for s in ("train", "val", "test")}
    fitted = fit_space(SpaceData(fit=feats["train"], early_stop=feats["val"], heldout=[("val", feats["val"])],
                                 guard=None), config=config.train, joint_dim=config.model.joint_dim, native=False)
    assert not fitted.space.has_bridge  # no baseline view: the projections alone are served
    return evaluate_retrieval(fitted.space, feats["test"])


def run(work: Path, *, threads: int = 1, train_variants: int = TRAIN_VARIANTS) -> dict:
    work = Path(work)
    checkpoint = ensure_tiny_clip(work, threads=threads)
    home = work / "home"
    if home.exists():
        shutil.rmtree(home)  # a fresh scratch home each run: build-bootstrap makes its version current
    scenes = split_scenes(FRACTIONS, seed=0)
    write_bootstrap_dataset({s: scenes[s] for s in ("train", "val", "test")}, home / "datasets" / "openclipart",
                            train_variants=train_variants)
    # The guard (what no mix may make worse than the baseline): the shipped real photos mean nothing
    # to towers that only ever saw shapes, so here it is what these towers already know, 48 of their
    # pre-training scenes in new pictures (position jitter variant 7).
    write_pairs(scenes["pretrain"][:GUARD_SCENES], home / "guard", variants=(7,))
    env = clip_env(home, checkpoint)
    built = cli(env, "build-bootstrap")
    test_tsv = str(home / "datasets" / "openclipart" / "test.tsv")
    native = cli(env, "eval-retrieval", "--pairs", test_tsv, "--model", "native")
    served = cli(env, "eval-retrieval", "--pairs", test_tsv, "--model", "current")
    meta = json.loads((home / "models" / built["version"] / "meta.json").read_text())
    return {"checkpoint": str(checkpoint), "home": str(home), "version": built["version"],
            "train_variants": train_variants,
            "mix": meta["training"]["mix"], "baseline": meta["metrics"]["retrieval"]["baseline"],
            "native": native, "served": served, "projections_only": projections_only(home, checkpoint),
            "bootstrap_metrics": meta["metrics"]["retrieval"]}


def summary(result: dict) -> dict:
    """R@1 with 95% intervals, both directions, for the three rows."""
    out = {}
    for row in ("native", "served", "projections_only"):
        r = result[row]
        out[row] = {d: {"R@1": round(r[d]["R@1"], 3), "ci": [round(x, 3) for x in r[d]["R@1_ci"]]}
                    for d in ("image_to_text", "text_to_image")}
    out["mix"] = result["mix"]
    out["n_candidates"] = result["native"]["image_to_text"]["n_candidates"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (the tiny checkpoint is kept here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-variants", type=int, default=TRAIN_VARIANTS,
                    help="pictures per bootstrap training caption (position jitter)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = run(args.work, threads=args.threads, train_variants=args.train_variants)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
