"""Flywheel simulation: does the product get better by being used, and does it resist poisoning?

1. A separate home (default ``var/flywheel_sim``) whose bootstrap model is trained WITHOUT a few
   Open Clip Art categories (flags, road signs, music, map symbols, weather, computer, office).
   Their items are split by a hash into "feed" (become users' corrections) and "eval" (never seen
   by anyone; measures the gain).
2. Feed: the real app (``app.build_app``, launched in this process on a free port, sharing its
   predictor with the retrain job as ``python app.py`` would) is driven through ``gradio_client``:
   25 simulated users (one client = one anonymous session each) upload a feed image
   (``/caption``: blob store, decode, prediction, which caches the image features) and correct the
   caption to the item's real one (``/rate_caption``).
3. Retrain (``retrain.job.run_retrain``, the same call as ``python -m retrain run --now``); compare
   R@1 with 95% bootstrap intervals on the eval items and on the bootstrap test split.
4. Poison: as many corrections with captions copied from random other items; retrain again: the
   cleaning should reject most of them and the gate should refuse the candidate.
5. Timing: a retrain on 1,000 new corrections on this machine (features cached at prediction time).

``--direct`` skips the web layer and calls the same feedback_db repository functions the app's
handlers call (faster; for when the app cannot start). Prints the numbers; writes them to
``<home>/flywheel_sim.json`` and copies the honest and the poisoned retrain's reports to
``docs/flywheel_sample/``.

6. ``--scenario trusted|anonymous|sybil|all`` (issue 10; instead of 2-5), each on its own database in
   the sim home over the same bootstrap, under the default cleaning rules, through the app's API:
   one logged-in trusted annotator correcting 300 feed pictures; ten anonymous sessions correcting
   300 (then the same database copied and retrained with ``anonymous_rule=quorum``); 100 anonymous
   sessions pushing one wrong caption in ten wordings onto 30 pictures of one bootstrap category plus
   one wrong label onto one meme (default rules, then quorum): what reached training, the caption
   bank and the served output; ``trusted3``: three trusted annotators, 100 pictures each; ``mixed``:
   a trusted annotator (200 pictures) and ten anonymous sessions agreeing with them on 100 of those.
   ``--set retrain.KEY=VALUE`` overrides a knob in every scenario (``--label`` keeps such variants
   apart in the JSON). Held-out and real-photo report-set R@1 before/after, the bridge's
   beside them. Writes ``<home>/flywheel_trust.json`` (and ``<sample-report>/flywheel_trust.json``).

    python benchmarks/flywheel_sim.py [--home DIR] [--feed 500] [--timing 1000] [--fresh] [--direct]
                                      [--categories a/b,c] [--scenario flywheel|trusted|anonymous|anonymous3|sybil|trusted3|mixed|all]
                                      [--set retrain.KEY=VALUE] [--label SUFFIX]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Clip-art kinds the ImageNet bridge barely knows. Seven categories, 848 items, so that ~480 can be
# fed and ~360 evaluated: with flags, road signs and music alone (488 items, 208 evaluated) the
# intervals were too wide to separate. Other sets, with their results: docs/flywheel.md.
HELDOUT_CATEGORIES = ("signs_and_symbols/flags", "transportation/roadsigns", "recreation/music",
                      "signs_and_symbols/map_symbols", "signs_and_symbols/weather", "computer", "office")
N_USERS = 25


def in_heldout(category: str, heldout: tuple[str, ...] = HELDOUT_CATEGORIES) -> bool:
    # Pirate flags stay in: the meme set uses them as "grim" pictures.
    if category.startswith("signs_and_symbols/flags/historic/pirates"):
        return False
    return any(category == c or category.startswith(c + "/") for c in heldout)


def _bucket(key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"flywheel-sim:{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def prepare_home(source_home: Path, home: Path, *, fresh: bool,
                 heldout: tuple[str, ...] = HELDOUT_CATEGORIES) -> dict:
    """Sim home: bootstrap TSVs without the held-out categories; items.jsonl kept whole (the meme set
    renders pictures only, never their captions); embedding cache hard-linked from the main home."""
    from mmapp.data.pairs import Pair, read_pairs, write_pairs_tsv

    if fresh and home.exists():
        shutil.rmtree(home)
    src = source_home / "datasets" / "openclipart"
    if not (src / "items.jsonl").is_file():
        raise SystemExit(f"no bootstrap corpus under {src}: run `python -m mmapp import openclipart` first")
    dst = home / "datasets" / "openclipart"
    marker = home / "heldout_categories.json"
    if marker.is_file() and json.loads(marker.read_text()) != list(heldout):
        raise SystemExit(f"{home} was built holding out {json.loads(marker.read_text())}, not {list(heldout)}: "
                         "pass --fresh or another --home")
    dst.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(list(heldout)))
    items = [json.loads(line) for line in (src / "items.jsonl").read_text().splitlines() if line.strip()]
    category = {str(Path(i["png_path"]).resolve()): i["category"] for i in items}
    heldout_items = [i for i in items if in_heldout(i["category"], heldout)]
    if not (dst / "train.tsv").is_file():
        for split in ("train", "val", "test"):
            pairs = [p for p in read_pairs(src / f"{split}.tsv")
                     if not in_heldout(category.get(str(Path(p.image_path).resolve()), ""), heldout)]
            write_pairs_tsv(pairs, dst / f"{split}.tsv")
        shutil.copy2(src / "items.jsonl", dst / "items.jsonl")
        for name in ("memes",):
            if (source_home / "datasets" / name).is_dir() and not (home / "datasets" / name).exists():
                _link_tree(source_home / "datasets" / name, home / "datasets" / name)
        if (source_home / "cache").is_dir() and not (home / "cache").exists():
            _link_tree(source_home / "cache", home / "cache")
        if (source_home / "corpus").is_dir() and not (home / "corpus").exists():
            (home / "corpus").symlink_to((source_home / "corpus").resolve())
    feed = [Pair(Path(i["png_path"]), i["caption"], i["item_id"], "heldout") for i in heldout_items
            if _bucket(i["item_id"]) < 0.62]
    evaluation = [Pair(Path(i["png_path"]), i["caption"], i["item_id"], "heldout") for i in heldout_items
                  if _bucket(i["item_id"]) >= 0.62]
    return {"feed": feed, "eval": evaluation, "n_heldout_items": len(heldout_items)}


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link copy (cheap; the cache replaces files atomically, so the originals never change)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


class DirectFeedback:
    """What the app's /caption and /rate_caption handlers store, without the web layer (``--direct``)."""

    def __init__(self, home: Path, engine, predictor):
        from feedback_db.blobstore import BlobStore

        self.blobs = BlobStore(home / "uploads")
        self.engine, self.predictor = engine, predictor
        self.n = 0

    def caption_and_correct(self, image_path: Path, corrected: str, user: int, tag: str,
                            rater: "Rater | None" = None) -> str:
        from sqlalchemy.orm import Session

        from feedback_db import repository as repo
        from feedback_db.engine import retry_on_busy
        from mmapp.imageio import load_image

        data = Path(image_path).read_bytes()
        start = time.perf_counter()
        decoded = load_image(data, name=str(image_path))
        sha, relpath = self.blobs.put(data, decoded.format.lower())
        result = self.predictor.caption(decoded)  # encodes the image once; the cache keeps its features
        latency = (time.perf_counter() - start) * 1e3
        self.n += 1

        def store() -> None:
            with Session(self.engine) as s, s.begin():
                repo.record_upload(s, sha256=sha, relpath=relpath, format=decoded.format.lower(),
                                   width=decoded.original_size[0], height=decoded.original_size[1], n_bytes=len(data))
                p = repo.record_prediction(s, request_id=f"pred-{tag}-{self.n}", kind="caption", image_sha256=sha,
                                           model_version=result.model_version,
                                           outputs={"caption": result.caption, "confidence": result.confidence},
                                           latency_ms=latency, embedding_ref=result.embedding_ref,
                                           session_id=f"sim-{user}")
                if rater is not None:
                    repo.record_rating(s, request_id=f"rate-{tag}-{self.n}", prediction_id=p.id,
                                       session_id=f"sim-{user}", **rater.scores(result.caption, corrected, user))
                if corrected != result.caption:
                    repo.record_correction(s, request_id=f"corr-{tag}-{self.n}", prediction_id=p.id,
                                           field="caption", value=corrected, session_id=f"sim-{user}")
        retry_on_busy(store)
        return result.caption

    def close(self) -> None:
        pass


def sim_app_config(config):
    """The app's config for a sim server: a free local port, and the per-client limits lifted, since
    every simulated user comes from 127.0.0.1 (docs/security.md)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return dataclasses.replace(config, app=dataclasses.replace(
        config.app, port=port, uploads_per_minute=1e6, upload_burst=10**6, uploads_per_day=0,
        events_per_minute=1e6, event_burst=10**6))


class AppFeedback:
    """The real app, launched in this process, driven through gradio_client by N_USERS clients."""

    def __init__(self, home: Path, engine, predictor, config):
        import app as webapp
        from feedback_db.blobstore import BlobStore
        from gradio_client import Client

        app_config = sim_app_config(config)
        watcher = webapp.ModelWatcher(predictor, engine, interval_s=1.0)
        self.demo = webapp.build_app(app_config, predictor, engine, BlobStore(home / "uploads"), watcher=watcher)
        self.demo.launch(**{**webapp.launch_options(app_config), "prevent_thread_lock": True, "quiet": True})
        self.clients = [Client(self.demo.local_url, verbose=False, download_files=False, analytics_enabled=False)
                        for _ in range(N_USERS)]

    def caption_and_correct(self, image_path: Path, corrected: str, user: int, tag: str,
                            rater: "Rater | None" = None) -> str:
        from gradio_client import handle_file

        client = self.clients[user % N_USERS]
        caption = client.predict(handle_file(str(image_path)), "", api_name="/caption")[1]
        scores = rater.scores(caption, corrected, user) if rater is not None else {}
        client.predict(scores.get("coherence", 0), scores.get("relevance", 0), scores.get("detail", 0), corrected, "",
                       "", api_name="/rate_caption")
        return caption

    def close(self) -> None:
        self.demo.close()


class Rater:
    """A simulated human rater: relevance follows how close the model's caption is to the truth
    (cosine of their text embeddings), plus per-rater bias and noise; coherence is high for the
    fluent bank captions; detail tracks relevance."""

    def __init__(self, embedder, seed: int = 0):
        import numpy as np

        self.embedder, self.rng = embedder, np.random.default_rng(seed)
        self.bias = self.rng.normal(0, 0.3, size=N_USERS)

    def scores(self, caption: str, truth: str, user: int) -> dict[str, int]:
        import numpy as np

        e = self.embedder.texts([caption, truth])
        cos = float(e[0] @ e[1])
        b = self.bias[user % N_USERS]
        clip = lambda x: int(np.clip(round(x), 1, 5))
        relevance = 1 + 4 * min(1.0, max(0.0, (cos - 0.1) / 0.6)) + b + self.rng.normal(0, 0.5)
        return {"coherence": clip(4.2 + b + self.rng.normal(0, 0.6)), "relevance": clip(relevance),
                "detail": clip(relevance - 0.7 + self.rng.normal(0, 0.6))}


def paired_r1_gain(before, after, feats, *, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """R@1 gain of ``after`` over ``before`` on the same queries, with a paired bootstrap 95% interval
    (resampling queries once for both models: the right test for "did this model get better")."""
    import numpy as np

    out = {}
    rng = np.random.default_rng(seed)
    hits = {}
    for name, space in (("before", before), ("after", after)):
        sim = space.similarity(space.image_views(feats.image_features, feats.class_probs),
                               space.text_views(feats.text)).numpy()  # (N_img, N_txt)
        t2i = sim.argmax(0) == feats.text_to_image  # (N_txt,)
        best_txt = sim.argmax(1)  # (N_img,)
        i2t = feats.text_to_image[best_txt] == np.arange(sim.shape[0])
        hits[name] = {"t2i": t2i.astype(float), "i2t": i2t.astype(float)}
    for d in ("t2i", "i2t"):
        diff = hits["after"][d] - hits["before"][d]
        idx = rng.integers(0, len(diff), size=(n_bootstrap, len(diff)))
        lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
        out[d] = {"gain": float(diff.mean()), "ci": [float(lo), float(hi)]}
    return out


def r1(report: dict) -> dict:
    out = {}
    for d, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
        out[short] = {"R@1": report[d]["R@1"], "ci": report[d]["R@1_ci"], "R@5": report[d]["R@5"],
                      "R@5_ci": report[d]["R@5_ci"], "R@10": report[d]["R@10"], "R@10_ci": report[d]["R@10_ci"]}
    out["n_images"] = report["text_to_image"]["n_candidates"]
    return out


def fmt(m: dict, d: str) -> str:
    return f"{m[d]['R@1']:.3f} [{m[d]['ci'][0]:.3f}, {m[d]['ci'][1]:.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=str(REPO / "var" / "flywheel_sim"))
    parser.add_argument("--source-home", default=None, help="home with the imported corpus (default: config home)")
    parser.add_argument("--feed", type=int, default=500, help="honest corrections (capped by the held-out items)")
    parser.add_argument("--timing", type=int, default=1000, help="corrections for the timing run (0 = skip)")
    parser.add_argument("--fresh", action="store_true", help="delete the sim home first")
    parser.add_argument("--sample-report", default=str(REPO / "docs" / "flywheel_sample"))
    parser.add_argument("--categories", default=",".join(HELDOUT_CATEGORIES),
                        help="comma-separated Open Clip Art categories to hold out of the bootstrap (with subcategories)")
    parser.add_argument("--direct", action="store_true", help="store feedback with repository calls, not the web app")
    parser.add_argument("--set", action="append", default=[], metavar="retrain.KEY=VALUE",
                        help="trust scenarios: override a retrain knob in every scenario's config (repeatable)")
    parser.add_argument("--label", default="", help="trust scenarios: suffix of the result keys (variants side by side)")
    parser.add_argument("--scenario", default="flywheel", choices=("flywheel", "all") + TRUST_SCENARIOS,
                        help="flywheel: honest anonymous raters + poison + timing (rules opened); trusted | "
                             "anonymous | sybil | all: issue 10's trust scenarios under the default rules")
    args = parser.parse_args(argv)

    import numpy as np

    from feedback_db.engine import init_db, make_engine
    from mmapp.config import load_config
    from mmapp.device import seed_everything
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import build_bootstrap, embed_pairs, evaluate_retrieval
    from mmapp.predictor import Predictor
    from mmapp.towers import Towers
    from retrain.features import TowerFeatureSource
    from retrain.job import run_retrain
    from retrain.promotion import promote_saved_version

    home = Path(args.home).resolve()
    source_home = Path(args.source_home) if args.source_home else load_config().storage.home
    t0 = time.monotonic()
    heldout = tuple(c.strip().strip("/") for c in args.categories.split(",") if c.strip())
    split = prepare_home(source_home, home, fresh=args.fresh, heldout=heldout)
    # The simulated raters are anonymous sessions. Since accounts exist, anonymous corrections need a
    # trusted rater's agreement by default (retrain.anonymous_rule); this sim measures learning from
    # honest anonymous raters as before, so it opens that rule. The trust scenarios (--scenario) keep
    # the default rules: run_trust_scenarios builds its own configs.
    config = load_config(storage={"home": str(home)}, retrain={"anonymous_rule": "open"})
    seed_everything(config.train.seed)
    say = lambda msg: print(f"[sim {time.monotonic() - t0:6.0f}s] {msg}", flush=True)
    say(f"held out {split['n_heldout_items']} items of {heldout}: "
        f"{len(split['feed'])} to feed, {len(split['eval'])} to evaluate")

    towers = Towers.from_config(config)
    store = ModelStore(config.paths.models)
    if not store.exists("bootstrap"):
        say("training the sim's bootstrap model without the held-out categories")
        build_bootstrap(config, towers, version="bootstrap", progress=False)
    if args.scenario != "flywheel":
        if args.direct:
            raise SystemExit("the trust scenarios run through the app's API only: drop --direct")
        run_trust_scenarios(args, home=home, split=split, heldout=heldout, towers=towers, store=store, say=say)
        say("trust scenarios done")
        return 0
    engine = make_engine(config.storage.resolved_database_url)
    init_db(engine)
    promote_saved_version(config, "bootstrap", reason="flywheel sim bootstrap", engine=engine)
    predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
    features = TowerFeatureSource(towers, config)
    results: dict = {}
    app = DirectFeedback(home, engine, predictor) if args.direct else AppFeedback(home, engine, predictor, config)
    results["via"] = "repository functions" if args.direct else "app.py through gradio_client"
    eval_feats = embed_pairs(predictor.embedder, split["eval"]).features
    test_feats = features.corpus("test")
    rng = np.random.default_rng(0)

    def measure(version: str) -> dict:
        space = store.load(version).space
        return {"heldout_categories": r1(evaluate_retrieval(space, eval_feats)),
                "bootstrap_test": r1(evaluate_retrieval(space, test_feats))}

    results.update({"heldout_categories": list(heldout), "n_feed": 0, "n_eval": len(split["eval"])})
    results["before"] = measure("bootstrap")

    # --- honest corrections -------------------------------------------------------------------
    feed = split["feed"][: args.feed]
    rater = Rater(predictor.embedder)
    start = time.monotonic()
    for j, pair in enumerate(feed):
        app.caption_and_correct(pair.image_path, pair.caption, j, "honest", rater=rater)
    for j, pair in enumerate(feed[:40]):  # a second user uploads the same picture: inter-rater agreement,
        app.caption_and_correct(pair.image_path, pair.caption, j + 7, "second", rater=rater)  # exact duplicates
    results["n_feed"] = len(feed)
    results["feed_seconds"] = round(time.monotonic() - start, 1)
    say(f"fed {len(feed)} honest corrections (+40 second opinions) via {results['via']} "
        f"in {results['feed_seconds']} s")
    first = run_retrain(config, engine, trigger="cli", features=features)
    say(f"retrain 1: {first.status} in {first.seconds:.1f} s: {first.message}")
    results["retrain_honest"] = _outcome(first)
    results["after"] = measure(first.current_version)
    results["heldout_categories_paired_gain"] = paired_r1_gain(store.load("bootstrap").space,
                                                               store.load(first.current_version).space, eval_feats)

    # --- poisoned corrections -----------------------------------------------------------------
    from mmapp.data.pairs import read_pairs

    train_list = read_pairs(config.paths.dataset() / "train.tsv")
    n_poison = len(feed)
    poison_captions = set()
    for j, i in enumerate(rng.choice(len(train_list), size=n_poison, replace=False)):
        k = int((i + 1 + rng.integers(0, len(train_list) - 1)) % len(train_list))  # any other item
        app.caption_and_correct(train_list[int(i)].image_path, train_list[k].caption, j, "poison", rater=rater)
        poison_captions.add((_sha(train_list[int(i)].image_path, as_app_stores=not args.direct),
                             " ".join(train_list[k].caption.split())))
    say(f"fed {n_poison} poisoned corrections (captions of random other items)")
    second = run_retrain(config, engine, trigger="cli", features=features)
    say(f"retrain 2: {second.status} in {second.seconds:.1f} s: {second.message}")
    results["retrain_poison"] = _outcome(second)
    results["poison_rejected"] = _rejected_share(engine, poison_captions)
    results["after_poison"] = measure(second.current_version)

    # --- timing: 1,000 corrections ------------------------------------------------------------
    if args.timing:
        # Every number above is measured already; if train + val hold fewer pictures than asked
        # for (seven categories are held out), test pictures make up the rest of this timing batch.
        pool = train_list + read_pairs(config.paths.dataset() / "val.tsv")
        if len(pool) < args.timing:
            pool += read_pairs(config.paths.dataset() / "test.tsv")
        pick = rng.choice(len(pool), size=min(args.timing, len(pool)), replace=False)
        for j, i in enumerate(pick):
            app.caption_and_correct(pool[int(i)].image_path, pool[int(i)].caption, j, "timing")
        third = run_retrain(config, engine, trigger="cli", features=features)
        say(f"retrain 3 ({len(pick)} new corrections): {third.status} in {third.seconds:.1f} s")
        results["retrain_timing"] = _outcome(third) | {"n_corrections": int(len(pick)),
                                                       "encoded_on_cache_miss": features.encoded_on_miss}

    app.close()
    results["total_seconds"] = round(time.monotonic() - t0, 1)
    (home / "flywheel_sim.json").write_text(json.dumps(results, indent=2, default=str))
    if args.sample_report:
        out = Path(args.sample_report)
        out.mkdir(parents=True, exist_ok=True)
        for outcome, stem in ((first, "report"), (second, "report_poisoned_refused")):
            for kind in ("html", "json"):
                if outcome.report and kind in outcome.report:
                    shutil.copy2(outcome.report[kind], out / f"{stem}.{kind}")
        (out / "flywheel_sim.json").write_text(json.dumps(results, indent=2, default=str))
    print_summary(results)
    return 0


def _outcome(o) -> dict:
    return {"status": o.status, "message": o.message, "version": o.version, "seconds": o.seconds,
            "cleaning": o.stats.get("cleaning"), "stage_seconds": o.stats.get("stage_seconds"),
            "score_mix": {k: v for k, v in ((o.stats.get("training") or {}).get("alignment") or {}).items()
                          if k in ("mix", "local_mix", "caption_memory")},
            "gate_metrics": o.metrics}


def _sha(path: Path, *, as_app_stores: bool = True) -> str:
    """The sha256 the feedback database holds for an upload of ``path``: the app strips metadata on
    upload (``load_image(strip_metadata=True)``), so for most clip-art PNGs it is not the file's;
    ``--direct`` stores the file's bytes as they are (``as_app_stores=False``)."""
    if not as_app_stores:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    from mmapp.imageio import load_image

    return load_image(Path(path), strip_metadata=True).sha256


def _rejected_share(engine, poison: set[tuple[str, str]]) -> dict:
    """What became of the poisoned corrections, found by (image sha256, caption)."""
    from collections import Counter

    from sqlalchemy.orm import Session

    from feedback_db import repository as repo

    with Session(engine) as s, s.begin():
        hits = [c for c in repo.corrections_since(s)
                if c["field"] == "caption" and (c["image_sha256"], c["value"]) in poison]
        reasons = [r.reason for r in repo.rejected_items(s, correction_ids=[c["correction_id"] for c in hits])]
        statuses = [c["status"] for c in hits]
    return {"n": len(hits), "rejected": statuses.count("rejected"), "used": statuses.count("used"),
            "share_rejected": statuses.count("rejected") / max(1, len(hits)), "reasons": dict(Counter(reasons))}


def print_summary(r: dict) -> None:
    print("\n=== flywheel simulation ===")
    print(f"held-out categories: {', '.join(r['heldout_categories'])}; {r['n_feed']} corrections fed, "
          f"{r['n_eval']} pairs evaluated (never fed)")
    for name in ("heldout_categories", "bootstrap_test"):
        for d in ("t2i", "i2t"):
            b, a = r["before"][name], r["after"][name]
            overlap = not (a[d]["ci"][0] > b[d]["ci"][1] or b[d]["ci"][0] > a[d]["ci"][1])
            print(f"  {name:<18} {d} R@1  before {fmt(b, d)}  after {fmt(a, d)}  "
                  f"{'intervals overlap' if overlap else 'intervals do not overlap'}  (n_images {a['n_images']})")
    g = r.get("heldout_categories_paired_gain")
    if g:
        print("  held-out categories R@1 gain, paired bootstrap over the same queries: "
              + ", ".join(f"{d} {g[d]['gain']:+.3f} [{g[d]['ci'][0]:+.3f}, {g[d]['ci'][1]:+.3f}]" for d in ("t2i", "i2t")))
        for d in ("t2i", "i2t"):
            b, a = r["before"]["heldout_categories"][d], r["after"]["heldout_categories"][d]
            ci = lambda m, k: f"{m[k]:.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]"
            print(f"  held-out categories {d} R@5 {ci(b, 'R@5')} -> {ci(a, 'R@5')}; "
                  f"R@10 {ci(b, 'R@10')} -> {ci(a, 'R@10')}")
    h = r["retrain_honest"]
    print(f"retrain on honest corrections: {h['status']} ({h['seconds']:.1f} s) — {h['message']}")
    print(f"  cleaning: {h['cleaning']}")
    print(f"  served score mix: {h.get('score_mix')}")
    p, pr = r["retrain_poison"], r["poison_rejected"]
    print(f"poisoned corrections: {pr['rejected']}/{pr['n']} rejected ({pr['share_rejected']:.0%}), "
          f"reasons {pr['reasons']}, {pr['used']} used")
    print(f"retrain on poison: {p['status']} ({p['seconds']:.1f} s) — {p['message']}")
    if "retrain_timing" in r:
        t = r["retrain_timing"]
        print(f"retrain time for {t['n_corrections']} new corrections on this machine: {t['seconds']:.1f} s "
              f"(stages {t['stage_seconds']}; images re-encoded on cache miss: {t['encoded_on_cache_miss']})")
    print(f"total {r['total_seconds']:.0f} s")


# --- trust scenarios (issue 10) -----------------------------------------------------------------

# anonymous3: 100 pictures x 3 of the 10 sessions; trusted3: three trusted annotators, 100 pictures each;
# mixed: one trusted annotator (200 pictures) and anonymous sessions agreeing with them on 100 of those
TRUST_SCENARIOS = ("trusted", "anonymous", "anonymous3", "sybil", "trusted3", "mixed")
_RETRAIN_EXTRA: dict = {}  # --set retrain.KEY=VALUE overrides, applied to every scenario's config
N_TRUST_FEED = 300  # corrections per scenario (issue 10: "after 300 corrections")
N_ANONYMOUS = 10
N_SYBILS = 100
N_SYBIL_PICTURES = 30
# One wrong caption in ten wordings (issue 10's sybil script).
SYBIL_WORDINGS = ("a garbage fire", "a dumpster fire", "a burning garbage heap", "a pile of burning trash",
                  "garbage on fire", "a trash fire", "a fire in a dumpster", "burning rubbish",
                  "a heap of garbage on fire", "a rubbish fire")
SIM_PASSWORD = "flywheel-sim-trusted-pw"


class TrustApp:
    """The real app on a free port, with one ``gradio_client`` client per session: anonymous, or
    logged in as an account (``POST /auth/login`` sets the ``mmapp_session`` cookie)."""

    def __init__(self, home: Path, engine, predictor, config):
        import app as webapp
        from feedback_db.blobstore import BlobStore

        app_config = sim_app_config(config)
        # as `python app.py` does: accepted caption corrections join the bank when a version is loaded
        watcher = webapp.ModelWatcher(predictor, engine, interval_s=0.5,
                                      on_reload=lambda v: predictor.add_to_caption_bank(
                                          webapp.accepted_caption_corrections(engine)))
        self.demo = webapp.build_app(app_config, predictor, engine, BlobStore(home / "uploads"), watcher=watcher)
        # with the demo: its login routes (/auth/...) are served
        self.demo.launch(**{**webapp.launch_options(app_config, self.demo), "prevent_thread_lock": True,
                            "quiet": True})
        self.url = self.demo.local_url

    def client(self, token: str | None = None):
        from gradio_client import Client

        from app import SESSION_COOKIE

        extra = {"httpx_kwargs": {"cookies": {SESSION_COOKIE: token}}} if token else {}
        return Client(self.url, verbose=False, download_files=False, analytics_enabled=False, **extra)

    def login(self, name: str, password: str) -> str:
        import httpx

        from app import SESSION_COOKIE

        response = httpx.post(f"{self.url.rstrip('/')}/auth/login", json={"user": name, "password": password},
                              timeout=30)
        if response.status_code != 200:
            raise SystemExit(f"login as {name!r} failed: {response.status_code} {response.text}")
        return response.cookies[SESSION_COOKIE]

    @staticmethod
    def caption(client, image_path: Path) -> str:
        from gradio_client import handle_file

        return client.predict(handle_file(str(image_path)), "", api_name="/caption")[1]

    def caption_and_correct(self, client, image_path: Path, corrected: str) -> str:
        caption = self.caption(client, image_path)
        client.predict(0, 0, 0, corrected, "", "", api_name="/rate_caption")
        return caption

    @staticmethod
    def meme_label(client, image_path: Path) -> str:
        """The served fused label of a meme picture (``/analyze_meme``, image and text on)."""
        from gradio_client import handle_file

        out = client.predict(handle_file(str(image_path)), True, True, "", api_name="/analyze_meme")
        fused = out[2]
        return fused.get("label") if isinstance(fused, dict) else str(fused)

    def correct_meme_label(self, client, image_path: Path, label: str) -> str:
        served = self.meme_label(client, image_path)
        client.predict(0, 0, 0, "", label, "", "", api_name="/rate_meme")
        return served

    def close(self) -> None:
        self.demo.close()


def _trust_config(home: Path, database_url: str, **retrain):
    from mmapp.config import load_config

    return load_config(storage={"home": str(home), "database_url": database_url},
                       retrain={**_RETRAIN_EXTRA, **retrain})


def _sqlite_copy(src_url: str, dst: Path) -> str:
    """A consistent copy of a SQLite database (WAL included) through sqlite3's backup API."""
    import sqlite3

    src = src_url.removeprefix("sqlite:///")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


def _fate(engine, *, field: str, match) -> dict:
    """What became of the corrections of ``field`` whose (image sha256, value) satisfy ``match``."""
    from collections import Counter

    from sqlalchemy.orm import Session

    from feedback_db import repository as repo

    with Session(engine) as s, s.begin():
        hits = [c for c in repo.corrections_since(s) if c["field"] == field and match(c["image_sha256"], c["value"])]
        rejected = [(r.correction_id, r.reason)
                    for r in repo.rejected_items(s, correction_ids=[c["correction_id"] for c in hits])]
        statuses = Counter(c["status"] for c in hits)
    # accepted by cleaning = no rejection row: these were in the candidate's training data, promoted or not
    return {"n": len(hits), "statuses": dict(statuses), "used": statuses.get("used", 0),
            "accepted_by_cleaning": len(hits) - len({cid for cid, _ in rejected}),
            "rejected_reasons": dict(Counter(reason for _, reason in rejected))}


def _paired(before_space, after_space, feats) -> dict:
    return paired_r1_gain(before_space, after_space, feats)


def run_trust_scenarios(args, *, home: Path, split: dict, heldout: tuple[str, ...], towers, store, say) -> dict:
    """Issue 10's scenarios through the app's API, each on its own database (``scenario_<name>.db`` in
    the sim home) over the same bootstrap model; default cleaning rules unless a variant says otherwise."""
    from feedback_db.accounts import Accounts
    from feedback_db.engine import init_db, make_engine
    from mmapp.config import load_config
    from mmapp.pipeline import embed_pairs, evaluate_retrieval, report_pairs
    from mmapp.predictor import Predictor
    from retrain.features import TowerFeatureSource
    from retrain.job import run_retrain
    from retrain.promotion import promote_saved_version

    wanted = TRUST_SCENARIOS if args.scenario == "all" else (args.scenario,)
    for item in args.set:
        key, _, value = item.partition("=")
        if not key.startswith("retrain.") or not value:
            raise SystemExit(f"--set wants retrain.KEY=VALUE, got {item!r}")
        try:
            _RETRAIN_EXTRA[key.removeprefix("retrain.")] = json.loads(value)
        except json.JSONDecodeError:
            _RETRAIN_EXTRA[key.removeprefix("retrain.")] = value
    base = load_config(storage={"home": str(home)})
    features = TowerFeatureSource(towers, base)
    eval_feats = embed_pairs(towers.embedder, split["eval"]).features
    photo_feats = report_pairs(base, towers.embedder)
    boot = store.load("bootstrap").space

    def metrics(space, *, mix=None) -> dict:
        out = {"heldout": r1(evaluate_retrieval(space, eval_feats, mix=mix))}
        if photo_feats is not None:
            out["report_photos"] = r1(evaluate_retrieval(space, photo_feats, mix=mix))
        return out

    shared = {"before": metrics(boot), "bridge": metrics(boot, mix=1.0), "n_eval": len(split["eval"]),
              "n_feed_available": len(split["feed"]), "report_photos": str(base.data.report_photos),
              "n_report_photos": None if photo_feats is None else int(photo_feats.image_features.shape[0])}
    say(f"bootstrap held-out R@1 t2i {fmt(shared['before']['heldout'], 't2i')}, bridge alone "
        f"{fmt(shared['bridge']['heldout'], 't2i')}")

    def fresh_db(name: str, **retrain) -> tuple:
        db = home / f"scenario_{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        config = _trust_config(home, f"sqlite:///{db}", **retrain)
        engine = make_engine(config.storage.resolved_database_url)
        init_db(engine)
        promote_saved_version(config, "bootstrap", reason=f"flywheel trust scenario {name}", engine=engine)
        return config, engine

    def retrain(label: str, config, engine) -> tuple[dict, object]:
        outcome = run_retrain(config, engine, trigger="cli", features=features)
        say(f"{label}: retrain {outcome.status} in {outcome.seconds:.1f} s: {outcome.message}; "
            f"cleaning {outcome.stats.get('cleaning')}")
        after = store.load(outcome.current_version).space
        res = _outcome(outcome) | {"current_version": outcome.current_version, "after": metrics(after),
                                   "heldout_paired_gain": _paired(boot, after, eval_feats)}
        return res, outcome

    feed = split["feed"][:N_TRUST_FEED]
    results: dict = {"shared": shared, "n_feed": len(feed)}
    for name in wanted:
        t_start = time.monotonic()
        if name == "trusted":
            config, engine = fresh_db("trusted")
            Accounts(engine).create("sim-annotator", "trusted", SIM_PASSWORD)
            predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
            app = TrustApp(home, engine, predictor, config)
            client = app.client(app.login("sim-annotator", SIM_PASSWORD))
            for pair in feed:
                app.caption_and_correct(client, pair.image_path, pair.caption)
            say(f"trusted: one logged-in trusted annotator corrected {len(feed)} pictures")
            res, _ = retrain("trusted (default rules)", config, engine)
            app.close()
            results["trusted"] = {"raters": "1 account, role trusted", "n_corrections": len(feed),
                                  "default_rules": res}
        elif name == "anonymous":
            config, engine = fresh_db("anonymous")
            predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
            app = TrustApp(home, engine, predictor, config)
            clients = [app.client() for _ in range(N_ANONYMOUS)]
            for j, pair in enumerate(feed):  # 30 distinct pictures each, as in the "ten people"
                app.caption_and_correct(clients[j % N_ANONYMOUS], pair.image_path, pair.caption)
            app.close()
            say(f"anonymous: {N_ANONYMOUS} anonymous sessions corrected {len(feed)} pictures")
            quorum_url = _sqlite_copy(config.storage.resolved_database_url, home / "scenario_anonymous_quorum.db")
            res_default, _ = retrain("anonymous (default trusted_agreement)", config, engine)
            qconfig = _trust_config(home, quorum_url, anonymous_rule="quorum")
            res_quorum, _ = retrain("anonymous (quorum)", qconfig, make_engine(quorum_url))
            results["anonymous"] = {"raters": f"{N_ANONYMOUS} anonymous sessions, distinct pictures",
                                    "n_corrections": len(feed), "default_rules": res_default,
                                    "quorum": res_quorum}
        elif name == "anonymous3":  # the quorum needs 3 sessions per picture: 100 pictures, 3 of the 10 each
            config, engine = fresh_db("anonymous3")
            predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
            app = TrustApp(home, engine, predictor, config)
            clients = [app.client() for _ in range(N_ANONYMOUS)]
            pictures = feed[: len(feed) // 3]
            for j, pair in enumerate(pictures):
                for k in range(3):
                    app.caption_and_correct(clients[(j + 3 * k) % N_ANONYMOUS], pair.image_path, pair.caption)
            app.close()
            say(f"anonymous3: {N_ANONYMOUS} anonymous sessions, {len(pictures)} pictures corrected by 3 each")
            quorum_url = _sqlite_copy(config.storage.resolved_database_url, home / "scenario_anonymous3_quorum.db")
            res_default, _ = retrain("anonymous3 (default trusted_agreement)", config, engine)
            qconfig = _trust_config(home, quorum_url, anonymous_rule="quorum")
            res_quorum, _ = retrain("anonymous3 (quorum)", qconfig, make_engine(quorum_url))
            results["anonymous3"] = {"raters": f"{N_ANONYMOUS} anonymous sessions, {len(pictures)} pictures x 3",
                                     "n_corrections": 3 * len(pictures), "default_rules": res_default,
                                     "quorum": res_quorum}
        elif name == "trusted3":  # three trusted annotators, 100 distinct pictures each
            config, engine = fresh_db("trusted3")
            predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
            app = TrustApp(home, engine, predictor, config)
            clients = []
            for k in range(3):
                Accounts(engine).create(f"sim-annotator{k}", "trusted", SIM_PASSWORD)
                clients.append(app.client(app.login(f"sim-annotator{k}", SIM_PASSWORD)))
            for j, pair in enumerate(feed):
                app.caption_and_correct(clients[j * 3 // len(feed)], pair.image_path, pair.caption)
            app.close()
            say(f"trusted3: three trusted annotators corrected {len(feed)} pictures, {len(feed) // 3} each")
            res, _ = retrain("trusted3 (default rules)", config, engine)
            results["trusted3"] = {"raters": "3 accounts, role trusted, 100 pictures each",
                                   "n_corrections": len(feed), "default_rules": res}
        elif name == "mixed":  # a trusted annotator; anonymous sessions agree with them on half their pictures
            config, engine = fresh_db("mixed")
            Accounts(engine).create("sim-annotator", "trusted", SIM_PASSWORD)
            predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
            app = TrustApp(home, engine, predictor, config)
            mine = app.client(app.login("sim-annotator", SIM_PASSWORD))
            clients = [app.client() for _ in range(N_ANONYMOUS)]
            n_trusted = 2 * len(feed) // 3
            for pair in feed[:n_trusted]:
                app.caption_and_correct(mine, pair.image_path, pair.caption)
            for j, pair in enumerate(feed[: len(feed) - n_trusted]):  # the same caption, in another session
                app.caption_and_correct(clients[j % N_ANONYMOUS], pair.image_path, pair.caption)
            app.close()
            say(f"mixed: a trusted annotator corrected {n_trusted} pictures, {N_ANONYMOUS} anonymous sessions "
                f"agreed on {len(feed) - n_trusted} of them")
            res, _ = retrain("mixed (default rules)", config, engine)
            results["mixed"] = {"raters": f"1 trusted account ({n_trusted} pictures) + {N_ANONYMOUS} anonymous "
                                          f"sessions agreeing on {len(feed) - n_trusted} of them",
                                "n_corrections": len(feed), "n_pictures": n_trusted, "default_rules": res}
        elif name == "sybil":
            results["sybil"] = _sybil(home, towers, store, fresh_db, retrain, say)
        results[name]["scenario_seconds"] = round(time.monotonic() - t_start, 1)
        results[name]["retrain_overrides"] = dict(_RETRAIN_EXTRA)
        if args.label:
            results[name + args.label] = results.pop(name)
            name = name + args.label
        out = home / "flywheel_trust.json"
        previous = json.loads(out.read_text()) if out.is_file() else {}
        previous.update({k: v for k, v in results.items()})
        out.write_text(json.dumps(previous, indent=2, default=str))
        if args.sample_report:
            Path(args.sample_report).mkdir(parents=True, exist_ok=True)
            (Path(args.sample_report) / "flywheel_trust.json").write_text(json.dumps(previous, indent=2, default=str))
        print_trust(name, results[name], shared)
    return results


def _sybil(home: Path, towers, store, fresh_db, retrain, say) -> dict:
    """100 anonymous sessions: one wrong caption in ten wordings on 30 pictures of one bootstrap
    category (300 corrections), and one wrong label on one meme picture (100 corrections)."""
    from collections import defaultdict

    from mmapp.predictor import Predictor

    config, engine = fresh_db("sybil")
    items = [json.loads(line) for line in
             (config.paths.dataset() / "items.jsonl").read_text().splitlines() if line.strip()]
    heldout = tuple(json.loads((home / "heldout_categories.json").read_text()))
    by_category = defaultdict(list)
    for i in items:
        if not in_heldout(i["category"], heldout) and Path(i["png_path"]).is_file():
            by_category[i["category"]].append(i)
    kind, members = max(by_category.items(), key=lambda kv: (len(kv[1]), kv[0]))
    pictures = [Path(i["png_path"]) for i in sorted(members, key=lambda i: _bucket(i["item_id"]))[:N_SYBIL_PICTURES]]
    memes = sorted((config.paths.dataset("memes")).glob("*.png"))
    meme = memes[0] if memes else None

    predictor = Predictor.from_config(config, version="bootstrap", towers=towers)
    app = TrustApp(home, engine, predictor, config)
    probe = app.client()
    served_before = {str(p): app.caption(probe, p) for p in pictures}
    label_before = app.meme_label(probe, meme) if meme else None
    wrong_label = None
    if meme is not None:
        wrong_label = next(l for l in predictor.labels if l != label_before)
    for s in range(N_SYBILS):
        client = app.client()  # a new anonymous session each
        for k in range(3):
            picture = pictures[(3 * s + k) % len(pictures)]
            app.caption_and_correct(client, picture, SYBIL_WORDINGS[(s + k) % len(SYBIL_WORDINGS)])
        if meme is not None:
            app.correct_meme_label(client, meme, wrong_label)
    say(f"sybil: {N_SYBILS} sessions, {3 * N_SYBILS} wrong captions on {len(pictures)} pictures of {kind!r}, "
        f"{N_SYBILS if meme else 0} votes for label {wrong_label!r} on {meme.name if meme else '-'}")
    app.close()
    quorum_url = _sqlite_copy(config.storage.resolved_database_url, home / "scenario_sybil_quorum.db")
    wordings = {" ".join(w.split()) for w in SYBIL_WORDINGS}
    meme_sha = _sha(meme) if meme else None
    out = {"raters": f"{N_SYBILS} anonymous sessions", "picture_kind": kind, "n_pictures": len(pictures),
           "n_caption_corrections": 3 * N_SYBILS, "meme": meme.name if meme else None,
           "meme_label_before": label_before, "wrong_label": wrong_label,
           "n_label_corrections": N_SYBILS if meme else 0}
    variants = [("default_rules", config, engine)]
    qconfig = _trust_config(home, quorum_url, anonymous_rule="quorum")
    from feedback_db.engine import make_engine
    variants.append(("quorum", qconfig, make_engine(quorum_url)))
    for variant, cfg, eng in variants:
        res, outcome = retrain(f"sybil ({variant})", cfg, eng)
        # by wording alone: only the sybils wrote these (the stored upload sha256 is not the file's for
        # these clip-art PNGs, so matching on the file's sha256 found nothing)
        captions = _fate(eng, field="caption", match=lambda sha, v: " ".join(v.split()) in wordings)
        labels = _fate(eng, field="label", match=lambda sha, v: sha == meme_sha and v == wrong_label)
        # what the app serves now: a fresh app on this database loads the current version and the bank
        from app import accepted_caption_corrections

        predictor = Predictor.from_config(cfg, version="bootstrap", towers=towers)
        predictor.add_to_caption_bank(accepted_caption_corrections(eng))  # as `python app.py` does at start
        app = TrustApp(home, eng, predictor, cfg)
        probe = app.client()
        app.caption(probe, pictures[0])  # first request: the watcher loads the current version and the bank
        time.sleep(1.0)
        served = {str(p): app.caption(probe, p) for p in pictures}
        served_label = app.meme_label(probe, meme) if meme else None
        bank = [t for t in predictor._bank_texts if " ".join(t.split()) in wordings]  # noqa: SLF001 (benchmark probe)
        app.close()
        out[variant] = res | {
            "wrong_captions": captions, "wrong_labels": labels,
            "reached_training": captions["used"] + labels["used"],
            "in_candidate_training_data": captions["accepted_by_cleaning"] + labels["accepted_by_cleaning"],
            "wordings_in_caption_bank": len(bank),
            "served_wrong_captions": sum(1 for c in served.values() if " ".join(c.split()) in wordings),
            "served_caption_examples": list(served.values())[:3],
            "served_model_version": getattr(predictor, "version", None),
            "served_meme_label": served_label, "served_wrong_label": int(served_label == wrong_label)}
        say(f"sybil ({variant}): {out[variant]['reached_training']} reached training, "
            f"{len(bank)} wordings in the bank, {out[variant]['served_wrong_captions']} wrong captions served, "
            f"label served {served_label!r}")
    out["served_before"] = list(served_before.values())[:3]
    return out


def print_trust(name: str, r: dict, shared: dict) -> None:
    print(f"\n=== trust scenario: {name} ({r.get('raters')}) ===")
    variants = [k for k in ("default_rules", "quorum") if k in r]
    for v in variants:
        x = r[v]
        print(f"  [{v}] {x['status']} ({x['seconds']:.1f} s): {x['message']}")
        print(f"    cleaning: {x['cleaning']}")
        for part in ("heldout", "report_photos"):
            if part not in x["after"]:
                continue
            for d in ("t2i", "i2t"):
                print(f"    {part:<13} {d} R@1 before {fmt(shared['before'][part], d)} after {fmt(x['after'][part], d)}"
                      f"  bridge {fmt(shared['bridge'][part], d)}")
        g = x["heldout_paired_gain"]
        print("    held-out paired gain: " + ", ".join(
            f"{d} {g[d]['gain']:+.3f} [{g[d]['ci'][0]:+.3f}, {g[d]['ci'][1]:+.3f}]" for d in ("t2i", "i2t")))
        if "reached_training" in x:
            print(f"    sybil: in the candidate's training data {x['in_candidate_training_data']}; "
                  f"reached the served model {x['reached_training']} (captions {x['wrong_captions']}, "
                  f"labels {x['wrong_labels']}); in bank {x['wordings_in_caption_bank']}; served wrong captions "
                  f"{x['served_wrong_captions']}; served label {x['served_meme_label']!r} (wrong {x['served_wrong_label']})")


if __name__ == "__main__":
    sys.exit(main())
