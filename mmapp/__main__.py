"""Command line: thin layer over mmapp.pipeline, mmapp.training and mmapp.predictor (``python -m mmapp --help``).

An entry point, like ``app.py``: it composes the library with the registry. The commands that
change which version is current (``build-bootstrap``, ``train-alignment --make-current``) go
through ``retrain.promotion`` — the same path a retrain takes — so the database registry stays the
one authority. No other module under ``mmapp/`` imports ``retrain`` or ``feedback_db``.
With ``--json`` a command prints one JSON document on stdout and nothing else: anything libraries
print while it runs goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub by the offline stack
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_STDOUT = sys.stdout  # where results go; with --json, everything else printed goes to stderr


def _config(args):
    from mmapp.config import load_config

    overrides = {"storage": {"home": args.home}} if getattr(args, "home", None) else {}
    return load_config(args.profile, **overrides)


def _towers(config):
    from mmapp.towers import Towers

    return Towers.from_config(config)


def _predictor(config, version=None, with_bank=True):
    from mmapp.pipeline import bank_from_items
    from mmapp.predictor import Predictor

    return Predictor.from_config(config, version=version, caption_bank=bank_from_items(config) if with_bank else ())


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj, default=str) if getattr(args, "json", False) else human, file=_STDOUT, flush=True)


def _make_current(config, version: str, reason: str) -> str:
    """Register ``version`` and make it current through the registry (what a retrain's promotion does)."""
    from retrain.promotion import promote_saved_version

    return promote_saved_version(config, version, reason=reason)


def cmd_config(args) -> int:
    import yaml

    from mmapp.config import redacted

    config = _config(args)
    data = redacted(config)
    _emit(args, data, yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


def cmd_list_encoders(args) -> int:
    from mmapp.encoders import list_encoders
    from mmapp.fusion import list_fusion_heads

    obj = {kind: list_encoders(kind) for kind in ("image", "text", "ocr")} | {"fusion": list_fusion_heads()}
    _emit(args, obj, "\n".join(f"{k}: {', '.join(v)}" for k, v in obj.items()))
    return 0


def cmd_import(args) -> int:
    from mmapp.data.pairs import read_pairs, write_pairs_tsv
    from mmapp.pipeline import import_openclipart

    config = _config(args)
    if args.source == "openclipart":
        paths = import_openclipart(config, progress=not args.json)
        report = json.loads((paths["items"].parent / "filter_report.json").read_text())
        _emit(args, {"paths": {k: str(v) for k, v in paths.items()}, **report},
              f"kept {report['kept']} pairs {report['splits']}; dropped {report['dropped']}\n"
              + "\n".join(f"  {k}: {v}" for k, v in paths.items()))
        return 0
    if args.source == "memes":
        return _import_memes(args, config)
    if not args.path:
        raise SystemExit("import pairs needs a FILE or folder")
    pairs = read_pairs(Path(args.path), fmt=args.format)
    out = Path(args.out or Path(args.path).with_suffix(".pairs.tsv"))
    write_pairs_tsv(pairs, out)
    _emit(args, {"pairs": len(pairs), "images": len({p.group for p in pairs}), "out": str(out)},
          f"{len(pairs)} pairs ({len({p.group for p in pairs})} images) -> {out}")
    return 0


def _import_memes(args, config) -> int:
    from mmapp.data.meme_import import read_memes, write_normalised

    if not args.path:
        raise SystemExit("import memes needs a FILE (Hateful Memes jsonl, Memotion csv, or image/text/label table)")
    fmt = {"jsonl": None, "csv": None, "tsv": None}.get(args.format, args.format) if args.format else None
    memes, report = read_memes(Path(args.path), fmt=fmt, label_map=args.label_map,
                               labels=config.model.meme_labels, images=args.images)
    if not memes:
        raise ValueError(f"no memes imported from {args.path}: skipped {dict(report.skipped)}")
    out = write_normalised(memes, Path(args.out) if args.out else config.paths.dataset("user_memes"),
                           replace=args.replace)
    obj = {"read": report.read, "imported": report.imported, "labels": dict(report.labels),
           "skipped": dict(report.skipped), "out": str(out)}
    _emit(args, obj, f"imported {report.imported} of {report.read} memes {dict(report.labels)} -> {out}"
          + (f"\n  skipped: {dict(report.skipped)}" if report.skipped else "")
          + "\n  used by build-bootstrap and the retrain as extra meme training data")
    return 0


def cmd_embed(args) -> int:
    from mmapp.pipeline import embed_pairs_file

    config = _config(args)
    towers = _towers(config)
    start = time.perf_counter()
    emb = embed_pairs_file(towers.embedder, Path(args.pairs), progress=not args.json)
    secs = time.perf_counter() - start
    obj = {"pairs": len(emb.captions), "images": len(emb.image_paths), "seconds": round(secs, 2),
           "encoders": towers.identity}
    _emit(args, obj, f"embedded {obj['images']} images and {obj['pairs']} captions in {secs:.1f} s (cached)")
    return 0


def cmd_train_alignment(args) -> int:
    import dataclasses

    from mmapp.device import seed_everything
    from mmapp.model_store import ModelStore, VersionMeta
    from mmapp.pipeline import code_version, embed_pairs_file, evaluate_retrieval, fit_corpus_space, guard_pairs

    config = _config(args)
    if args.epochs is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=args.epochs))
    seed_everything(config.train.seed)
    towers = _towers(config)
    ds = config.paths.dataset()
    train_path = Path(args.train or ds / "train.tsv")
    val_path = Path(args.val or ds / "val.tsv")
    progress = not args.json
    train = embed_pairs_file(towers.embedder, train_path, progress=progress).features
    val = embed_pairs_file(towers.embedder, val_path, progress=progress).features
    guard = None if args.no_guard else guard_pairs(config, towers.embedder, path=args.guard)
    fitted = fit_corpus_space(towers, config, train, val, guard, progress=progress)
    store = ModelStore(config.paths.models)
    current = store.current()
    base = store.load(current) if current else None
    version = args.version or time.strftime("align-%Y%m%d-%H%M%S")
    metrics = {"retrieval": {"val": evaluate_retrieval(fitted.space, val, n_bootstrap=200)}}
    meta = VersionMeta(labels=base.labels if base else (), encoders=towers.identity,
                       caption_temperature=fitted.caption_temperature, parent=current, metrics=metrics,
                       training=fitted.info, history=fitted.history,
                       data={"train": str(train_path), "val": str(val_path)}, code_version=code_version(),
                       meme_text_features=base.meta.meme_text_features if base else "")
    store.save(version, fitted.space, meta=meta, fusion_head=base.fusion_head if base else None,
               fusion_config=base.fusion_config if base else None,
               fusion_name=base.meta.fusion_name if base else None)
    if args.make_current:
        _make_current(config, version, reason="train-alignment --make-current")
    val_r = metrics["retrieval"]["val"]
    _emit(args, {"version": version, "mix": fitted.info["mix"], "best_epoch": fitted.info["best_epoch"],
                 "val": val_r, "current": bool(args.make_current)},
          f"saved {version}: mix={fitted.info['mix']:.2f}, best epoch {fitted.info['best_epoch']}, "
          f"val R@1 i2t={val_r['image_to_text']['R@1']:.3f} t2i={val_r['text_to_image']['R@1']:.3f}"
          + (" (now current)" if args.make_current else ""))
    return 0


def cmd_eval_retrieval(args) -> int:
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import embed_pairs_file, evaluate_retrieval, resolve_space

    config = _config(args)
    towers = _towers(config)
    version, space = resolve_space(towers, ModelStore(config.paths.models), args.model)
    feats = embed_pairs_file(towers.embedder, Path(args.pairs), progress=not args.json).features
    report = evaluate_retrieval(space, feats, max_images=args.max_images, n_bootstrap=args.bootstrap,
                                seed=args.seed)
    report = {"model": version, "pairs": str(args.pairs), **report}

    def line(name, d):
        ci = lambda k: f"[{d[k + '_ci'][0]:.3f}, {d[k + '_ci'][1]:.3f}]" if d.get(k + "_ci") else ""
        return (f"{name}: R@1 {d['R@1']:.3f} {ci('R@1')}  R@5 {d['R@5']:.3f} {ci('R@5')}  "
                f"R@10 {d['R@10']:.3f} {ci('R@10')}  median rank {d['median_rank']:.0f}  "
                f"(chance R@1 {d['chance_R@1']:.4f}, {d['n_queries']} queries, {d['n_candidates']} candidates)")
    _emit(args, report, f"model {version} on {args.pairs}\n" + line("image->text", report["image_to_text"])
          + "\n" + line("text->image", report["text_to_image"]))
    return 0


def cmd_build_bootstrap(args) -> int:
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import build_bootstrap

    config = _config(args)
    store = ModelStore(config.paths.models)
    if store.exists(args.version) and not args.force:
        current = _make_current(config, args.version, reason="build-bootstrap (adopted)") \
            if store.current() is None else store.current()
        _emit(args, {"version": args.version, "built": False, "current": current},
              f"{args.version} exists (use --force to rebuild)")
        return 0
    if args.force and store.exists(args.version):
        import shutil

        shutil.rmtree(store.path(args.version))
    version, meta = build_bootstrap(config, _towers(config), version=args.version, progress=not args.json)
    current = _make_current(config, version, reason="build-bootstrap")
    _emit(args, {"version": version, "built": True, "current": current, "metrics": meta.metrics},
          f"built {version}; current version: {current}")
    return 0


def _decode(path: str, config):
    from mmapp.imageio import ImageLimits, load_image

    limits = ImageLimits(max_bytes=config.app.max_upload_mb * 2**20, max_pixels=config.app.max_image_pixels)
    return load_image(Path(path), limits=limits, name=path)


def cmd_caption(args) -> int:
    config = _config(args)
    predictor = _predictor(config)
    results = []
    for path in args.images:
        res = predictor.caption(_decode(path, config))
        results.append({"image": path, **asdict(res)})
    if args.json:
        _emit(args, results[0] if len(results) == 1 else {"results": results}, "")
    else:
        for r in results:
            flag = "  (low confidence)" if r["low_confidence"] else ""
            print(f"{r['image']}: {r['caption']}  [{r['confidence']:.2f}]{flag}", file=_STDOUT)
            for alt, conf in r["alternatives"]:
                print(f"    {alt}  [{conf:.2f}]", file=_STDOUT)
    return 0


def cmd_analyze_meme(args) -> int:
    config = _config(args)
    if args.text is not None and len(args.text) > config.app.max_text_chars:
        raise ValueError(f"--text is {len(args.text)} characters; the limit is {config.app.max_text_chars}")
    predictor = _predictor(config, with_bank=False)
    res = predictor.analyze_meme(_decode(args.image, config), args.text, ablate=args.ablate)
    fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items()) or "-"
    _emit(args, {"image": args.image, **asdict(res)},
          f"text: {res.text!r}\nlabel: {res.label}" + (f" (without {res.ablation})" if res.ablation else "")
          + f"\n  fused:      {fmt(res.fused)}\n  image only: {fmt(res.image_only)}\n  text only:  {fmt(res.text_only)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmapp", description=__doc__)
    parser.add_argument("--profile", default=None, help="config profile (offline | clip | blip); env MMAPP_PROFILE")
    parser.add_argument("--home", default=None, help="data folder (default var/; env MMAPP_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(fn=fn)
        return p

    add("list-encoders", cmd_list_encoders, "list encoders and fusion heads")
    add("config", cmd_config, "print the effective configuration (profile + environment), secrets redacted")
    p = add("import", cmd_import, "import the bootstrap corpus or your own pairs")
    p.add_argument("source", choices=["openclipart", "pairs", "memes"])
    p.add_argument("path", nargs="?", help="pairs: a TSV/CSV/JSONL/COCO JSON file or a folder; "
                                           "memes: a Hateful Memes jsonl, Memotion csv or image/text/label table")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl", "coco", "folder", "hateful", "memotion", "table"],
                   default=None, help="default: from the file (memes: hateful | memotion | table)")
    p.add_argument("--out", help="pairs: output TSV (image_path<TAB>caption); memes: output folder "
                                 "(default <home>/datasets/user_memes)")
    p.add_argument("--label-map", default=None,
                   help='memes: "[column:]value=label,..." onto our labels, first match wins '
                        '(e.g. Hateful Memes "0=positive,1=dark humor"); Memotion has a default')
    p.add_argument("--images", default=None, help="memes: folder holding the images (default: next to FILE)")
    p.add_argument("--replace", action="store_true", help="memes: replace the imported set instead of merging")
    p = add("embed", cmd_embed, "embed image-caption pairs into the cache")
    p.add_argument("--pairs", required=True, help="TSV: image_path<TAB>caption, paths relative to the file")
    p = add("train-alignment", cmd_train_alignment, "train the projections with InfoNCE")
    p.add_argument("--train"), p.add_argument("--val")
    p.add_argument("--guard", help="real-photo pairs the mix must not get worse on (default: data.guard_photos)")
    p.add_argument("--no-guard", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--version")
    p.add_argument("--make-current", action="store_true",
                   help="register it and make it current through the registry (a running app reloads it)")
    p = add("eval-retrieval", cmd_eval_retrieval, "cross-modal retrieval R@1/5/10 with 95% intervals")
    p.add_argument("--pairs", required=True)
    p.add_argument("--model", default="current",
                   help="current | bridge (the zero-training baseline) | native (pre-aligned towers' own cosine) | VERSION")
    p.add_argument("--max-images", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p = add("build-bootstrap", cmd_build_bootstrap, "build the bootstrap model (corpus, projections, meme head)")
    p.add_argument("--version", default="bootstrap")
    p.add_argument("--force", action="store_true")
    p = add("caption", cmd_caption, "caption images")
    p.add_argument("images", nargs="+")
    p = add("analyze-meme", cmd_analyze_meme, "OCR + fused meme label with modality ablation")
    p.add_argument("image")
    p.add_argument("--text", default=None, help="use this text instead of OCR")
    p.add_argument("--ablate", choices=["image", "text"], default=None, help="remove this modality")
    return parser


def main(argv: list[str] | None = None) -> int:
    global _STDOUT
    args = build_parser().parse_args(argv)
    _STDOUT, saved = sys.stdout, sys.stdout
    if getattr(args, "json", False):
        sys.stdout = sys.stderr  # library chatter ("Loaded pretrained weights ...") must not break `| jq`
    try:
        return args.fn(args)
    except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = saved


if __name__ == "__main__":
    sys.exit(main())
