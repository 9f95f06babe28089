"""Retrieval report: bridge vs trained projections vs the served mix, on the Open Clip Art test split
and on the hand-captioned real photos, with bootstrap 95% intervals.

    python benchmarks/retrieval_report.py [--version bootstrap] [--out docs/retrieval_report]

Writes ``<out>.json`` and ``<out>.md``; needs the bootstrap model (python -m mmapp build-bootstrap).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmapp.config import load_config  # noqa: E402
from mmapp.pipeline import embed_pairs_file, evaluate_retrieval  # noqa: E402
from mmapp.predictor import Predictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default=None, help="model version (default: current)")
    ap.add_argument("--out", default="docs/retrieval_report")
    args = ap.parse_args()
    config = load_config()
    predictor = Predictor.from_config(config, version=args.version)
    served = predictor.space
    sets = {"openclipart_test": config.paths.dataset() / "test.tsv", "real_photos": config.data.guard_photos,
            "real_photos_report": config.data.report_photos}  # the guard chose the mix; the report set chose nothing
    spaces = {
        "chance": None,
        "bridge (ConSE, no training)": predictor.towers.bridge_space(),
        "projections only (mix 0)": served,
        f"served (mix {served.mix:.2f})": served,
    }
    results: dict = {"version": predictor.version, "mix": served.mix, "sets": {}}
    for set_name, path in sets.items():
        feats = embed_pairs_file(predictor.embedder, path).features
        rows = {}
        for name, space in spaces.items():
            if space is None:
                continue
            mix = 0.0 if name.startswith("projections") else None  # explicit: no local mix either
            rows[name] = evaluate_retrieval(space, feats, mix=mix)
        results["sets"][set_name] = {"pairs": str(path), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Retrieval report — model `{results['version']}` (served mix {served.mix:.2f})", "",
             "R@K as fractions with bootstrap 95% intervals (1000 resamples of the queries); candidates: "
             "at most 1000 images. Reproduce: `python benchmarks/retrieval_report.py` after "
             "`python -m mmapp build-bootstrap`.", ""]
    for set_name, data in results["sets"].items():
        any_row = next(iter(data["rows"].values()))
        lines += [f"## {set_name} ({any_row['image_to_text']['n_queries']} images, "
                  f"{any_row['text_to_image']['n_queries']} captions, "
                  f"{any_row['image_to_text']['n_candidates']} text / {any_row['text_to_image']['n_candidates']} image candidates)", "",
                  "| model | i→t R@1 | i→t R@5 | i→t R@10 | t→i R@1 | t→i R@5 | t→i R@10 | t→i median rank |",
                  "|---|---|---|---|---|---|---|---|"]
        chance = any_row
        fmt = lambda d, k: f"{d[f'R@{k}']:.3f} [{d[f'R@{k}_ci'][0]:.3f}, {d[f'R@{k}_ci'][1]:.3f}]"
        lines.append("| chance | " + " | ".join(f"{chance[d][f'chance_R@{k}']:.3f}" for d in ("image_to_text", "text_to_image")
                                                for k in (1, 5, 10)) + " | - |")
        for name, r in data["rows"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(r["image_to_text"], k) for k in (1, 5, 10)) + " | "
                         + " | ".join(fmt(r["text_to_image"], k) for k in (1, 5, 10))
                         + f" | {r['text_to_image']['median_rank']:.0f} |")
        lines.append("")
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
