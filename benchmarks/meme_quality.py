"""Meme labels on real photos, as a person labelled them: the served predictor against the simplest baselines.

Runs the served predictor (``Predictor.analyze_meme``, the text given as written so OCR is not what is
measured: OCR is measured by benchmarks/ocr.py) on the hand-labelled real-photo memes in
``tests/data/memes`` (never trained on; see its README) and prints, in one run, with bootstrap 95 %
intervals (the set is small):

* fused / image-only / text-only accuracy and macro-F1, and the fused confusion matrix;
* baselines: every constant label (the majority-class baseline: the training set is balanced, so
  each constant scores the share of that label), and a text-only VADER rule (compound >= 0.05 ->
  positive, <= -0.05 -> dark humor, otherwise sarcastic; and its best relabelling);
* optionally the same for a second version (``--compare``, e.g. an older model in another home);
* the synthetic test split's numbers recorded in the version's meta (``metrics.memes``).

    python benchmarks/meme_quality.py                      # current version under var/, the report part
    python benchmarks/meme_quality.py --home /tmp/h --part all --compare-home var --compare bootstrap
    python benchmarks/meme_quality.py --json > meme_quality.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SET_DIR = REPO / "tests" / "data" / "memes"


def read_set(part: str, folder: Path = SET_DIR) -> list[dict]:
    rows = []
    for line in (folder / "labels.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, photo, top, bottom, label, which, reason = line.split("\t")
        if part in ("all", which):
            rows.append({"file": name, "photo": photo, "top": top, "bottom": bottom, "label": label, "part": which,
                         "reason": reason})
    return rows


def vader_rule(text: str) -> str:
    from vader import polarity_scores

    c = polarity_scores(text.lower())["compound"]
    return "positive" if c >= 0.05 else "dark humor" if c <= -0.05 else "sarcastic"


def score(preds: list[str], truth: list[str], labels: list[str], n_bootstrap: int) -> dict:
    from mmapp.evaluation import classification_metrics

    onehot = np.eye(len(labels))[[labels.index(p) for p in preds]]
    m = classification_metrics(onehot, np.array([labels.index(t) for t in truth]), labels, n_bootstrap=n_bootstrap)
    return {"accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"], "macro_f1": m["macro_f1"],
            "macro_f1_ci": m["macro_f1_ci"], "confusion": m["confusion_matrix"], "correct": int(sum(p == t for p, t in zip(preds, truth))),
            "n": len(truth)}


def run_version(config, version: str, rows: list[dict], folder: Path) -> dict:
    from mmapp.data.memes import meme_text
    from mmapp.imageio import load_image
    from mmapp.predictor import Predictor

    predictor = Predictor.from_config(config, version=version)
    out = {"fused": [], "image_only": [], "text_only": [], "probs": []}
    for r in rows:
        res = predictor.analyze_meme(load_image(folder / r["file"]), meme_text(r["top"], r["bottom"]))
        for mode in ("fused", "image_only", "text_only"):
            d = getattr(res, mode)
            out[mode].append(max(d, key=d.get))
        out["probs"].append(res.fused)
    meta = predictor._model.meta
    return {"version": predictor.version, "labels": list(predictor.labels), "preds": out,
            "text_features": meta.meme_text_features, "synthetic": meta.metrics.get("memes"),
            "generator": meta.data.get("memes_generator", "v1")}


def main(argv=None) -> int:
    from mmapp.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=None, help="data folder of the served model (default var/)")
    ap.add_argument("--version", default=None, help="default: the current version")
    ap.add_argument("--compare-home", default=None)
    ap.add_argument("--compare", default=None, help="a second version to run beside it (in --compare-home)")
    ap.add_argument("--part", choices=["report", "guard", "all"], default="report")
    ap.add_argument("--set", default=str(SET_DIR), help="folder with labels.tsv and the rendered memes")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    saved, sys.stdout = sys.stdout, sys.stderr  # library chatter to stderr
    folder = Path(args.set)
    rows = read_set(args.part, folder)
    truth = [r["label"] for r in rows]
    config = load_config(**({"storage": {"home": args.home}} if args.home else {}))
    runs = [run_version(config, args.version, rows, folder)]
    if args.compare:
        cconf = load_config(**({"storage": {"home": args.compare_home}} if args.compare_home else {}))
        runs.append(run_version(cconf, args.compare, rows, folder))
    labels = runs[0]["labels"]
    report = {"set": str(folder), "part": args.part, "n": len(rows), "labels": labels,
              "label_counts": {l: truth.count(l) for l in labels}, "models": [], "baselines": {}}
    for run in runs:
        entry = {"version": run["version"], "text_features": run["text_features"] or "embedding only",
                 "generator": run["generator"], "synthetic_test": None}
        for mode in ("fused", "image_only", "text_only"):
            entry[mode] = score(run["preds"][mode], truth, labels, args.bootstrap)
        syn = run["synthetic"]
        if syn:
            entry["synthetic_test"] = {m: {"accuracy": syn[m].get("accuracy"), "macro_f1": syn[m]["macro_f1"],
                                           "macro_f1_ci": syn[m].get("macro_f1_ci")}
                                       for m in ("fused", "image_only", "text_only")} | {"n": syn.get("n")}
        entry["examples"] = [{"file": r["file"], "text": f"{r['top']} / {r['bottom']}", "label": r["label"],
                              "fused": p, "image_only": i, "text_only": t}
                             for r, p, i, t in zip(rows, run["preds"]["fused"], run["preds"]["image_only"],
                                                   run["preds"]["text_only"])]
        report["models"].append(entry)
    for label in labels:
        report["baselines"][f"constant {label!r}"] = score([label] * len(rows), truth, labels, args.bootstrap)
    vader = [vader_rule(f"{r['top']} {r['bottom']}") for r in rows]
    report["baselines"]["VADER rule (pos->positive, neg->dark, neutral->sarcastic)"] = score(vader, truth, labels,
                                                                                            args.bootstrap)
    # the VADER rule with its three outcomes mapped onto the labels in the best way *on this set* (an upper bound)
    best = max(itertools.permutations(labels), key=lambda perm: sum(
        dict(zip(("positive", "sarcastic", "dark humor"), perm))[v] == t for v, t in zip(vader, truth)))
    remap = dict(zip(("positive", "sarcastic", "dark humor"), best))
    report["baselines"]["VADER rule, best relabelling on this set"] = score([remap[v] for v in vader], truth, labels,
                                                                             args.bootstrap)
    sys.stdout = saved
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ci = lambda d, k: f"[{d[k + '_ci'][0]:.2f}, {d[k + '_ci'][1]:.2f}]"
    line = lambda name, d: (f"  {name:58s} acc {d['accuracy']:.3f} {ci(d, 'accuracy')} ({d['correct']}/{d['n']})  "
                            f"macro-F1 {d['macro_f1']:.3f} {ci(d, 'macro_f1')}")
    print(f"real-photo memes: {folder} part={args.part} n={len(rows)} {report['label_counts']}")
    print(f"bootstrap 95% intervals over {args.bootstrap} resamples; chance accuracy 0.333")
    for entry in report["models"]:
        print(f"\nmodel {entry['version']} (text features: {entry['text_features']}, synthetic set {entry['generator']})")
        for mode in ("fused", "image_only", "text_only"):
            print(line(mode, entry[mode]))
        print("  confusion (fused; rows = person's label, columns = predicted):")
        print("    " + " " * 12 + "".join(f"{l[:10]:>12s}" for l in labels))
        for l, row in zip(labels, entry["fused"]["confusion"]):
            print(f"    {l[:12]:12s}" + "".join(f"{v:12d}" for v in row))
        syn = entry["synthetic_test"]
        if syn:
            print(f"  synthetic test split (n={syn['n']}, from the version's meta): "
                  + ", ".join(f"{m} macro-F1 {syn[m]['macro_f1']:.3f}" for m in ("fused", "image_only", "text_only")))
    print("\nbaselines (same memes):")
    for name, d in report["baselines"].items():
        print(line(name, d))
    print("\nmisread by the first model (fused):")
    for e in report["models"][0]["examples"]:
        if e["fused"] != e["label"]:
            print(f"  {e['file']:10s} {e['label']:10s} -> {e['fused']:10s} {e['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
