"""The flywheel fine-tunes a generative captioner, on the shapes world, end to end through the app.

1. A tiny BLIP (``mmapp.data.shapes.train_tiny_captioner``) is pre-trained on shapes-world scenes with
   **no yellow thing in them**, and saved as a local folder (cached: retrained only when its recipe
   changes). It has never seen yellow; its tokenizer knows the word.
2. The real app (``app.build_app`` on a free port, in this process) runs the blip profile with that
   folder as ``model.captioner_path``. Logged in as the operator (a trusted account), a script uploads
   pictures of yellow scenes to ``/caption`` and corrects each caption through ``/rate_caption``.
3. One retrain (``retrain.job.run_retrain``): the captioner stage cleans, fine-tunes the text decoder
   with replay of pre-training pairs, and gates on CIDEr-D / BLEU-4 of held-out corrections and of
   old-concept (no yellow) guard pairs.
4. Held-out pictures the flywheel never saw: yellow scenes (the new concept) and no-yellow scenes (old
   concepts), captioned by the served model before and after, CIDEr-D / exact match with 95% bootstrap
   intervals; then a batch of poisoned corrections (captions of other scenes) and a second retrain.

    python benchmarks/shapes_captioner.py --work /tmp/shapes-cap          # prints JSON; ~3-5 min on 2 cores
    python benchmarks/shapes_captioner.py --work /tmp/shapes-cap --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmapp.data.shapes import (Scene, TinyCaptionerRecipe, all_scenes, render_scene, scenes_with_colour,  # noqa: E402
                               train_tiny_captioner, write_pairs)

REPO = Path(__file__).resolve().parent.parent
LEFT_OUT = "yellow"
RECIPE = TinyCaptionerRecipe()
OPERATOR = ("operator", "s3cret-pass")
N_TEACH, N_POISON, N_TEST = 80, 30, 60
# How the retrain tunes the tiny captioner. Its vision encoder never saw a yellow pixel (a real BLIP's
# has seen every colour), so here it is tuned too; with the decoder alone (the default) 80 corrections
# moved new-concept CIDEr-D from 3.19 to 3.75, intervals overlapping (docs/results.md).
TUNE = {"MMAPP__RETRAIN__CAPTIONER_TRAIN_VISION": "true", "MMAPP__RETRAIN__CAPTIONER_EPOCHS": "60",
        "MMAPP__RETRAIN__CAPTIONER_LR": "0.002", "MMAPP__RETRAIN__CAPTIONER_CLEAN_EPOCHS": "30"}
UPLOAD_SIZE = 64  # pixels per side of the uploaded pictures
TEST_VARIANT, GUARD_VARIANT, UPLOAD_VARIANT = 5, 4, 3  # position jitter of pictures no training saw


def world(seed: int = 0) -> dict[str, list[Scene]]:
    """Splits of the world's 1104 scenes: 612 without yellow (pre-training, guard, old-concept test) and
    492 with yellow (corrections to teach, poisoned corrections, new-concept test)."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    old = scenes_with_colour(scenes, LEFT_OUT, present=False)
    new = scenes_with_colour(scenes, LEFT_OUT)
    return {"pretrain": old[:-100], "guard": old[-100:-50], "test_old": old[-50:],
            "teach": new[:N_TEACH], "poison": new[N_TEACH:N_TEACH + N_POISON], "test_new": new[-N_TEST:]}


def ensure_tiny_captioner(work: Path, *, recipe: TinyCaptionerRecipe = RECIPE, threads: int = 1) -> Path:
    """The tiny BLIP under ``work/tiny-captioner`` (trained unless one with this recipe and data exists),
    with ``work/replay.tsv`` (pre-training pairs to replay) and ``work/guard/pairs.tsv`` (old concepts)."""
    directory = work / "tiny-captioner"
    parts = world()
    stamp = json.dumps({"recipe": dataclasses.asdict(recipe), "left_out": LEFT_OUT,
                        "pretrain": hashlib.sha256("\n".join(s.key for s in parts["pretrain"]).encode()).hexdigest()},
                       sort_keys=True)
    if not ((work / "captioner-recipe.json").is_file() and (work / "captioner-recipe.json").read_text() == stamp
            and (directory / "config.json").is_file()):
        train_tiny_captioner(parts["pretrain"], directory, recipe=recipe, threads=threads)
        (work / "captioner-recipe.json").write_text(stamp)
    write_pairs(parts["pretrain"][:256], work / "replay", size=recipe.image_size, variants=(0,), name="pairs.tsv")
    write_pairs(parts["guard"], work / "guard", size=recipe.image_size, variants=(GUARD_VARIANT,), name="pairs.tsv")
    return directory


def blip_env(home: Path, work: Path) -> dict[str, str]:
    """The blip profile on the tiny captioner (what ``python app.py --profile blip`` reads)."""
    return {"MMAPP_HOME": str(home), "MMAPP__MODEL__CAPTIONER_PATH": str(work / "tiny-captioner"),
            "MMAPP__MODEL__CAPTIONER_MAX_NEW_TOKENS": "16", "MMAPP__MODEL__DEVICE": "cpu",
            "MMAPP__RETRAIN__CAPTIONER_REPLAY_PAIRS": str(work / "replay" / "pairs.tsv"),
            "MMAPP__RETRAIN__CAPTIONER_GUARD_PAIRS": str(work / "guard" / "pairs.tsv"),
            "MMAPP__RETRAIN__RUNNER": "in-process", "MMAPP__APP__OPERATOR_USER": OPERATOR[0],
            "MMAPP__APP__OPERATOR_PASSWORD": OPERATOR[1], "HF_HUB_OFFLINE": "1", **TUNE}


def make_home(home: Path, embedding_cache: Path) -> Path:
    """A fresh home folder sharing an embedding cache (the model version is made in :func:`run`)."""
    if home.exists():
        shutil.rmtree(home)
    (home / "cache").mkdir(parents=True)
    embedding_cache.mkdir(parents=True, exist_ok=True)
    (home / "cache" / "embeddings").symlink_to(embedding_cache.resolve(), target_is_directory=True)
    return home


def score(captioner, parts: dict[str, list[Scene]], *, variant: int = TEST_VARIANT) -> dict:
    """Greedy captions of the new-concept and old-concept test scenes, scored together (CIDEr-D's document
    frequencies over both sets' references, as COCO's evaluation takes them over its test set)."""
    from mmapp.caption_metrics import score_caption_sets

    texts, refs = {}, {}
    for name, key in (("new", "test_new"), ("old", "test_old")):
        pictures = [render_scene(s, size=UPLOAD_SIZE, variant=variant) for s in parts[key]]
        texts[name] = [g.text for g in captioner.generate(pictures)]
        refs[name] = [[s.caption] for s in parts[key]]
    scored = score_caption_sets({k: (texts[k], refs[k]) for k in texts}, n_bootstrap=2000)
    return {k: {**scored[k].summary(), "example": {"truth": refs[k][0][0], "said": texts[k][0]}} for k in texts}


class App:
    """The real app, launched in this process on a free port, driven through ``gradio_client``."""

    def __init__(self, config, predictor, engine):
        import socket

        import app as webapp
        from feedback_db.blobstore import BlobStore

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # one script uploads everything from 127.0.0.1: the per-client limits are lifted (docs/security.md)
        config = dataclasses.replace(config, app=dataclasses.replace(
            config.app, port=port, uploads_per_minute=1e6, upload_burst=10**6, uploads_per_day=0,
            events_per_minute=1e6, event_burst=10**6))
        self.watcher = webapp.ModelWatcher(predictor, engine, interval_s=0.2)
        self.demo = webapp.build_app(config, predictor, engine, BlobStore(config.paths.uploads), watcher=self.watcher)
        self.demo.launch(**{**webapp.launch_options(config, self.demo), "prevent_thread_lock": True, "quiet": True})
        self.url = self.demo.local_url

    def operator_client(self):
        import httpx
        from gradio_client import Client

        response = httpx.post(f"{self.url.rstrip('/')}/auth/login", json={"user": OPERATOR[0], "password": OPERATOR[1]},
                              timeout=30)
        response.raise_for_status()
        return Client(self.url, verbose=False, download_files=False, analytics_enabled=False,
                      httpx_kwargs={"cookies": dict(response.cookies)})

    def correct(self, client, picture: Path, caption: str) -> dict:
        """Upload a picture to /caption, then correct its caption through /rate_caption (as a person would)."""
        from gradio_client import handle_file

        details = client.predict(handle_file(str(picture)), "", api_name="/caption")[4]
        client.predict(0, 0, 0, caption, "", "", api_name="/rate_caption")
        return details

    def close(self) -> None:
        self.demo.close()


def run(work: Path, *, home: Path | None = None, threads: int = 1, embedding_cache: Path | None = None,
        say=print) -> dict:
    """Everything above; returns the numbers (see :func:`summary`). ``work`` keeps the tiny captioner between
    runs; ``home`` (default ``work/home``) is rebuilt: its model version is the offline towers' zero-training
    bridge and it has no retrieval corpus, so the retrieval part of each retrain stops at its features and
    the captioner part decides alone."""
    import torch

    from feedback_db.engine import init_db, make_engine
    from mmapp.config import load_config
    from mmapp.model_store import ModelStore, VersionMeta
    from mmapp.predictor import Predictor, generative_captioner
    from mmapp.towers import Towers
    from retrain.job import run_retrain
    from retrain.features import TowerFeatureSource
    from retrain.promotion import adopt_store_current

    torch.set_num_threads(threads)
    work = Path(work)
    started = time.monotonic()
    checkpoint = ensure_tiny_captioner(work, threads=threads)
    pretrain_s = round(time.monotonic() - started, 1)
    say(f"tiny captioner ready in {pretrain_s} s: {checkpoint}")
    shared = REPO / "var" / "cache" / "embeddings"  # the bootstrap build's text embeddings, when there is one
    cache = embedding_cache or (shared if shared.is_dir() else work / "embeddings")
    home = make_home(Path(home or work / "home"), cache)
    env = blip_env(home, work)
    config = load_config("blip", env=env)
    parts = world()

    towers = Towers.from_config(config)
    store = ModelStore(config.paths.models)
    store.save("shapes-base", towers.bridge_space(), meta=VersionMeta(encoders=towers.identity))
    store.set_current("shapes-base")
    predictor = Predictor(towers=towers, store=store, captioner=generative_captioner(config))
    predictor.load_version("shapes-base")
    engine = make_engine(config.storage.resolved_database_url)
    init_db(engine)
    adopt_store_current(engine, store)
    app = App(config, predictor, engine)
    result: dict = {"checkpoint": str(checkpoint), "home": str(home), "pretrain_s": pretrain_s, "left_out": LEFT_OUT,
                    "n_teach": N_TEACH, "n_poison": N_POISON}
    try:
        before = score(predictor.captioner, parts)
        result["before"] = before
        say(f"before: new CIDEr-D {before['new']['cider_d']:.3f} exact {before['new']['exact']:.3f}; "
            f"old CIDEr-D {before['old']['cider_d']:.3f} exact {before['old']['exact']:.3f}")
        client = app.operator_client()
        uploads = work / "uploads-src"
        uploads.mkdir(exist_ok=True)
        t0 = time.monotonic()
        served = []
        for scene in parts["teach"]:
            picture = uploads / f"{scene.key}.png"
            render_scene(scene, size=UPLOAD_SIZE, variant=UPLOAD_VARIANT).save(picture)
            served.append(app.correct(client, picture, scene.caption)["caption"])
        result["teach_s"] = round(time.monotonic() - t0, 1)
        result["served_before_example"] = {"truth": parts["teach"][0].caption, "said": served[0]}
        features = TowerFeatureSource(towers, config)
        t0 = time.monotonic()
        first = run_retrain(config, engine, trigger="cli", features=features)
        result["retrain_s"] = round(time.monotonic() - t0, 1)
        result["first"] = _outcome(first)
        say(f"retrain 1: {first.status}: {first.message[:300]}")
        app.watcher.maybe_reload()
        deadline = time.monotonic() + 30
        while predictor.version != first.current_version and time.monotonic() < deadline:
            time.sleep(0.2)
            app.watcher.maybe_reload()
        result["served_version"] = predictor.version
        after = score(predictor.captioner, parts)
        result["after"] = after
        say(f"after: new CIDEr-D {after['new']['cider_d']:.3f} exact {after['new']['exact']:.3f}; "
            f"old CIDEr-D {after['old']['cider_d']:.3f} exact {after['old']['exact']:.3f}")
        # poisoned corrections: each picture gets the caption of another scene (a wrong caption)
        rng = random.Random(1)
        wrong = [rng.choice([s for s in parts["pretrain"] + parts["teach"] if s != scene]) for scene in parts["poison"]]
        for scene, lie in zip(parts["poison"], wrong):
            picture = uploads / f"{scene.key}.png"
            render_scene(scene, size=UPLOAD_SIZE, variant=UPLOAD_VARIANT).save(picture)
            app.correct(client, picture, lie.caption)
        second = run_retrain(config, engine, trigger="cli", features=features)
        result["poison"] = _outcome(second)
        say(f"retrain 2 (poison): {second.status}: {second.message[:300]}")
        app.watcher.maybe_reload()
        result["served_version_after_poison"] = predictor.version
        result["after_poison"] = score(predictor.captioner, parts)
    finally:
        app.close()
        engine.dispose()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _outcome(o) -> dict:
    cap = o.stats.get("captioner") or {}
    return {"status": o.status, "message": o.message, "version": o.version, "current_version": o.current_version,
            "captioner_status": cap.get("status"), "captioner_message": cap.get("message"),
            "cleaning": (cap.get("stats") or {}).get("cleaning"), "training": (cap.get("stats") or {}).get("training"),
            "gate": cap.get("gate"), "metrics": cap.get("metrics"), "report": o.report}


def summary(r: dict) -> dict:
    row = lambda s: {k: s[k] for k in ("n", "cider_d", "cider_d_ci", "bleu4", "exact", "exact_ci")}  # noqa: E731
    out = {"left_out": r["left_out"], "corrections": r["n_teach"], "pretrain_s": r["pretrain_s"],
           "retrain_s": r.get("retrain_s"), "first_retrain": r["first"]["status"],
           "new_concept": {"before": row(r["before"]["new"]), "after": row(r["after"]["new"])},
           "old_concepts": {"before": row(r["before"]["old"]), "after": row(r["after"]["old"])},
           "cleaning_first": r["first"]["cleaning"] and {k: r["first"]["cleaning"][k]
                                                         for k in ("accepted", "rejected_low_agreement")}}
    if "poison" in r:
        c = r["poison"]["cleaning"] or {}
        out["poison"] = {"status": r["poison"]["status"], "captioner": r["poison"]["captioner_status"],
                         "message": r["poison"]["captioner_message"],
                         "accepted": c.get("accepted"), "rejected": c.get("rejected_low_agreement"),
                         "served_after": r["served_version_after_poison"],
                         "new_after_poison": row(r["after_poison"]["new"])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (the tiny captioner is kept here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    result = run(args.work, threads=args.threads, say=lambda m: print(m, file=sys.stderr))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
