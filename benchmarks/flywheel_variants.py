"""Fine-tune variants of the trusted-annotator scenario, offline, on one captured retrain (issue 10).

Step 1 runs ``flywheel_sim.py --scenario trusted`` once and saves the retrain's ``TrainingSet`` (the
bootstrap replay, the bootstrap val split, the guard photos, users' fit and tune pairs) as it reaches
``retrain.train.fine_tune``::

    python benchmarks/flywheel_variants.py capture --home /tmp/fsim-t2 --out /tmp/t2/trainingset.pt

Step 2 fine-tunes the same bootstrap on that set with ``config.finetune`` overrides (and, for the
caption memory's and local mix's searches, other widths / k / objectives) and prints, per variant:
the retrain's own validation (users' tune pairs and the bootstrap val split: what a choice may use;
memory off, since the memory is chosen on them, plus the memory search's own objective) and, measured
only, the sim's held-out pictures and the report photos::

    python benchmarks/flywheel_variants.py run --home /tmp/fsim-t2 --data /tmp/t2/trainingset.pt \\
        base: ep40:epochs=40 lr2:lr_scale=2.0 share75:user_share_of_batch=0.75,max_repeat=32
    python benchmarks/flywheel_variants.py run ... --memory-k 10 k10:
    python benchmarks/flywheel_variants.py run ... --choose-on-tune both pertune:

Results are appended to ``<data dir>/variants.jsonl``. Numbers: docs/results.md, issue 10, "Second pass".
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def capture(args) -> int:
    import torch

    import flywheel_sim
    import retrain.job as job

    original = job.fine_tune

    def fine_tune(current, data, config):
        torch.save({"data": data, "current": current.version}, args.out)
        print(f"[variants] saved the retrain's TrainingSet to {args.out}", flush=True)
        return original(current, data, config)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    job.fine_tune = fine_tune
    return flywheel_sim.main(["--home", args.home, "--scenario", "trusted", "--label", args.label,
                              "--sample-report", ""])


def run(args) -> int:
    import torch

    import flywheel_sim as fs
    import mmapp.training as training
    from mmapp.config import load_config
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import embed_pairs, evaluate_retrieval, report_pairs
    from mmapp.towers import Towers
    from retrain.train import fine_tune

    if args.memory_width is not None or args.memory_k is not None:
        kw = {k: v for k, v in (("width", args.memory_width), ("k", args.memory_k)) if v is not None}
        training.choose_memory = functools.partial(training.choose_memory, **kw)
    if args.choose_on_tune != "none":
        def on_tune(fn, at: int):
            def wrapped(space, *a, **kw):
                a = list(a)
                a[at] = [(n, f) for n, f in a[at] if n == "users_tune"] or a[at]
                return fn(space, *a, **kw)
            return wrapped
        if args.choose_on_tune in ("memory", "both"):
            training.choose_memory = on_tune(training.choose_memory, 2)
        if args.choose_on_tune in ("local", "both"):
            training.choose_local_mix = on_tune(training.choose_local_mix, 1)

    home = Path(args.home)
    captured = torch.load(args.data, weights_only=False)
    data = captured["data"]
    base = load_config(storage={"home": str(home)})
    towers = Towers.from_config(base)
    current = ModelStore(base.paths.models).load(captured["current"])
    cache = Path(args.data).with_name("evalfeats.pt")
    if cache.is_file():
        eval_feats, photo_feats = torch.load(cache, weights_only=False)
    else:
        split = fs.prepare_home(load_config().storage.home, home, fresh=False)
        eval_feats = embed_pairs(towers.embedder, split["eval"]).features
        photo_feats = report_pairs(base, towers.embedder)
        torch.save((eval_feats, photo_feats), cache)

    def own(space, feats) -> dict:
        memory, space.memory = space.memory, None  # chosen on these pairs: judge the rest
        sim = space.similarity(space.image_views(feats.image_features, feats.class_probs), space.text_views(feats.text))
        space.memory = memory
        return {"mean_r1": round(training.mean_r1(sim, feats.text_to_image), 4),
                "mrr": round(training.mean_mrr(sim, feats.text_to_image), 4)}

    def memory_objective(m: dict) -> dict | None:
        table = m.get("table") or []
        if not table:
            return None
        chosen = [r for r in table[1:] if r.get("weight") == m.get("weight") and r.get("lo") == m.get("lo")]
        return {"baseline": round(table[0]["baseline_objective"], 4),
                "chosen": round(chosen[0]["objective"], 4) if chosen else None}

    print(f"fit pairs {len(data.user_pairs.text_to_image)}, tune pairs {len(data.tune_pairs.text_to_image)}, "
          f"replay pairs {len(data.replay.text_to_image)}", flush=True)
    for spec in args.variants:
        name, _, kv = spec.partition(":")
        ft = {}
        for item in filter(None, kv.split(",")):
            key, _, value = item.partition("=")
            ft[key] = json.loads(value)
        torch.manual_seed(0)
        started = time.monotonic()
        cand = fine_tune(current, data, load_config(storage={"home": str(home)}, finetune=ft))
        space, al = cand.space, cand.info["alignment"]
        out = {"name": name, "finetune": ft, "memory_width": args.memory_width, "memory_k": args.memory_k,
               "choose_on_tune": args.choose_on_tune, "seconds": round(time.monotonic() - started, 1),
               "mix": al.get("mix"), "repeats": al.get("repeats"),
               "local": {k: v for k, v in al.get("local_mix", {}).items() if k != "table"},
               "memory": {k: v for k, v in al.get("caption_memory", {}).items() if k != "table"},
               "memory_objective": memory_objective(al.get("caption_memory", {})),
               "own_tune": own(space, data.tune_pairs), "own_val": own(space, data.val),
               "heldout": fs.r1(evaluate_retrieval(space, eval_feats)),
               "photos": fs.r1(evaluate_retrieval(space, photo_feats))}
        h, p = out["heldout"], out["photos"]
        print(f"{name:20s} own: tune {out['own_tune']} val {out['own_val']} memory {out['memory_objective']} | "
              f"held-out t2i {fs.fmt(h, 't2i')} i2t {fs.fmt(h, 'i2t')} | photos t2i {p['t2i']['R@1']:.3f} "
              f"i2t {p['i2t']['R@1']:.3f} | mix {out['mix']} repeats {out['repeats']} "
              f"memory weight {out['memory'].get('weight')} ({out['seconds']} s)", flush=True)
        with open(Path(args.data).with_name("variants.jsonl"), "a") as f:
            f.write(json.dumps(out, default=str) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="run the trusted scenario once and save the retrain's TrainingSet")
    c.add_argument("--home", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--label", default="_capture")
    r = sub.add_parser("run", help="fine-tune variants on a captured TrainingSet")
    r.add_argument("--home", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--memory-width", type=float, default=None, help="caption memory nearness ramp width (default 0.1)")
    r.add_argument("--memory-k", type=int, default=None, help="caption memory neighbours (default 5)")
    r.add_argument("--choose-on-tune", choices=("none", "memory", "local", "both"), default="none",
                   help="choose the memory / local mix on users' tune pairs only (default: with the bootstrap val)")
    r.add_argument("variants", nargs="+", metavar="NAME:KEY=VALUE,...", help="config.finetune overrides per variant")
    args = parser.parse_args(argv)
    return capture(args) if args.cmd == "capture" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
