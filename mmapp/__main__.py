"""Command line: thin layer over mmapp.pipeline and mmapp.predictor (``python -m mmapp --help``)."""
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


def _config(args):
    from mmapp.config import load_config

    overrides = {"storage": {"home": args.home}} if getattr(args, "home", None) else {}
    return load_config(args.profile, **overrides)


def _predictor(config, version=None, with_bank=True):
    from mmapp.pipeline import bank_from_items
    from mmapp.predictor import Predictor

    return Predictor.from_config(config, version=version, caption_bank=bank_from_items(config) if with_bank else ())


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj, default=str) if getattr(args, "json", False) else human)


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
    if not args.path:
        raise SystemExit("import pairs needs a FILE or folder")
    pairs = read_pairs(Path(args.path), fmt=args.format)
    out = Path(args.out or Path(args.path).with_suffix(".pairs.tsv"))
    write_pairs_tsv(pairs, out)
    _emit(args, {"pairs": len(pairs), "images": len({p.group for p in pairs}), "out": str(out)},
          f"{len(pairs)} pairs ({len({p.group for p in pairs})} images) -> {out}")
    return 0


def cmd_embed(args) -> int:
    from mmapp.pipeline import embed_pairs_file

    config = _config(args)
    predictor = _predictor(config, with_bank=False)
    start = time.perf_counter()
    emb = embed_pairs_file(predictor.embedder, Path(args.pairs), progress=not args.json)
    secs = time.perf_counter() - start
    obj = {"pairs": len(emb.captions), "images": len(emb.image_paths), "seconds": round(secs, 2),
           "encoders": predictor.embedder.identity}
    _emit(args, obj, f"embedded {obj['images']} images and {obj['pairs']} captions in {secs:.1f} s (cached)")
    return 0


def cmd_train_alignment(args) -> int:
    from mmapp.device import seed_everything
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import (PHOTOS_TSV, caption_temperature, code_version, dataset_dir, embed_pairs_file,
                                evaluate_retrieval, train_joint_space)

    config = _config(args)
    seed_everything(config.train.seed)
    predictor = _predictor(config, with_bank=False)
    ds = dataset_dir(config)
    train_path = Path(args.train or ds / "train.tsv")
    val_path = Path(args.val or ds / "val.tsv")
    progress = not args.json
    train = embed_pairs_file(predictor.embedder, train_path, progress=progress).features
    val = embed_pairs_file(predictor.embedder, val_path, progress=progress).features
    guard = None if args.no_guard else embed_pairs_file(predictor.embedder, Path(args.guard or PHOTOS_TSV)).features
    space, info = train_joint_space(predictor, train, val, config=config, guard=guard,
                                    epochs=args.epochs, progress=progress)
    store = ModelStore(config.storage.home / "models")
    current = store.current()
    base = store.load(current) if current else None
    version = args.version or time.strftime("align-%Y%m%d-%H%M%S")
    meta = {"labels": list(base.labels) if base else [], "encoders": predictor.embedder.identity,
            "caption_temperature": caption_temperature(space, val), "parent": current,
            "train": {k: v for k, v in info.items() if k != "history"}, "history": info["history"],
            "metrics": {"retrieval": {"val": evaluate_retrieval(space, val, n_bootstrap=200)}},
            "data": {"train": str(train_path), "val": str(val_path)}, "code_version": code_version()}
    store.save(version, space, meta=meta, fusion_head=base.fusion_head if base else None,
               fusion_config=base.fusion_config if base else None,
               fusion_name=(base.meta.get("fusion") or {}).get("name") if base else None)
    if args.make_current:
        store.set_current(version)
    _emit(args, {"version": version, "mix": info["mix"], "best_epoch": info["best_epoch"],
                 "val": meta["metrics"]["retrieval"]["val"]},
          f"saved {version}: mix={info['mix']:.1f}, best epoch {info['best_epoch']}, "
          f"val R@1 i2t={meta['metrics']['retrieval']['val']['image_to_text']['R@1']:.3f} "
          f"t2i={meta['metrics']['retrieval']['val']['text_to_image']['R@1']:.3f}")
    return 0


def cmd_eval_retrieval(args) -> int:
    from mmapp.pipeline import embed_pairs_file, evaluate_retrieval, resolve_space

    config = _config(args)
    predictor = _predictor(config, with_bank=False)
    version, space = resolve_space(predictor, args.model)
    feats = embed_pairs_file(predictor.embedder, Path(args.pairs), progress=not args.json).features
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
    from mmapp.model_store import BRIDGE, ModelStore
    from mmapp.pipeline import build_bootstrap

    config = _config(args)
    store = ModelStore(config.storage.home / "models")
    if store.exists(args.version) and not args.force:
        _emit(args, {"version": args.version, "built": False}, f"{args.version} exists (use --force to rebuild)")
        if store.current() is None:
            store.set_current(args.version)
        return 0
    if args.force and store.exists(args.version):
        import shutil

        shutil.rmtree(store.path(args.version))
    predictor = _predictor(config, version=BRIDGE, with_bank=False)
    version, meta = build_bootstrap(config, predictor, version=args.version, progress=not args.json)
    _emit(args, {"version": version, "metrics": meta["metrics"]}, f"built {version}")
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
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}, default=str))
    else:
        for r in results:
            flag = "  (low confidence)" if r["low_confidence"] else ""
            print(f"{r['image']}: {r['caption']}  [{r['confidence']:.2f}]{flag}")
            for alt, conf in r["alternatives"]:
                print(f"    {alt}  [{conf:.2f}]")
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
    parser.add_argument("--profile", default=None, help="config profile (offline | clip); env MMAPP_PROFILE")
    parser.add_argument("--home", default=None, help="data folder (default var/; env MMAPP_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(fn=fn)
        return p

    add("list-encoders", cmd_list_encoders, "list encoders and fusion heads")
    p = add("import", cmd_import, "import the bootstrap corpus or your own pairs")
    p.add_argument("source", choices=["openclipart", "pairs"])
    p.add_argument("path", nargs="?", help="pairs: a TSV/CSV/JSONL/COCO JSON file or a folder")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl", "coco", "folder"], default=None)
    p.add_argument("--out", help="pairs: output TSV (image_path<TAB>caption)")
    p = add("embed", cmd_embed, "embed image-caption pairs into the cache")
    p.add_argument("--pairs", required=True, help="TSV: image_path<TAB>caption, paths relative to the file")
    p = add("train-alignment", cmd_train_alignment, "train the projections with InfoNCE")
    p.add_argument("--train"), p.add_argument("--val")
    p.add_argument("--guard", help="real-photo pairs the mix must not get worse on (default tests/data/photos)")
    p.add_argument("--no-guard", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--version")
    p.add_argument("--make-current", action="store_true")
    p = add("eval-retrieval", cmd_eval_retrieval, "cross-modal retrieval R@1/5/10 with 95% intervals")
    p.add_argument("--pairs", required=True)
    p.add_argument("--model", default="current", help="current | bridge | VERSION")
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
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
