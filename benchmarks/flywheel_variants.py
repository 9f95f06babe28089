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

Step 3 (measured only, no choice is made from it) asks whether *any* simple learner on the same taught
pairs gets further than the retrain: ridge regression, k nearest taught pictures and kernel ridge from
the image tower's features to the caption embeddings, fitted on the users' fit + tune pairs alone, and
each mixed with the served candidate's score, over a small grid; it prints the best of each family::

    python benchmarks/flywheel_variants.py ceiling --home /tmp/fsim-t2 --data /tmp/t2/trainingset.pt

Results are appended to ``<data dir>/variants.jsonl``. Numbers: docs/results.md, issue 10, "Second pass"
and "A ceiling on the frozen towers".
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


def ceiling(args) -> int:
    """Other learners on the taught pairs, measured on the sim's held-out pictures only (a diagnostic)."""
    import torch
    import torch.nn.functional as F

    import flywheel_sim as fs
    from mmapp.config import load_config
    from mmapp.model_store import ModelStore
    from mmapp.pipeline import retrieval_metrics
    from retrain.train import fine_tune

    home = Path(args.home)
    captured = torch.load(args.data, weights_only=False)
    data = captured["data"]
    current = ModelStore(load_config(storage={"home": str(home)}).paths.models).load(captured["current"])
    eval_feats, _ = torch.load(Path(args.data).with_name("evalfeats.pt"), weights_only=False)  # written by `run`

    def r1(sim: torch.Tensor) -> dict:
        m = retrieval_metrics(sim.numpy(), eval_feats.text_to_image, n_bootstrap=1000, seed=0).to_dict()
        return {short: {"R@1": m[d]["R@1"], "ci": m[d]["R@1_ci"]}
                for short, d in (("t2i", "text_to_image"), ("i2t", "image_to_text"))}

    def taught(p):  # one row per caption: its image's features, its text embedding
        idx = torch.as_tensor(p.text_to_image)
        return F.normalize(p.image_features[idx].float(), dim=-1), F.normalize(p.text.float(), dim=-1)
    xs, ys = zip(*(taught(p) for p in (data.user_pairs, data.tune_pairs)))
    x, y = torch.cat(xs), torch.cat(ys)
    ex, et = F.normalize(eval_feats.image_features.float(), dim=-1), F.normalize(eval_feats.text.float(), dim=-1)
    ones = lambda a: torch.cat([a, torch.ones(len(a), 1)], 1)  # noqa: E731
    preds: dict[tuple[str, str], torch.Tensor] = {}  # (family, its knobs) -> predicted caption embeddings
    for lam in (0.03, 0.1, 0.3):
        w = torch.linalg.solve(ones(x).T @ ones(x) + lam * torch.eye(x.shape[1] + 1), ones(x).T @ y)
        preds["ridge", f"lambda={lam}"] = ones(ex) @ w
    for k in (5, 10, 30):
        for tau in (0.02, 0.05, 0.1):
            v, i = (ex @ x.T).topk(k, dim=1)
            preds["knn", f"k={k} tau={tau}"] = (torch.softmax(v / tau, dim=1).unsqueeze(-1) * y[i]).sum(1)
    for g in (5.0, 10.0, 20.0):
        for lam in (0.01, 0.1):
            a = torch.linalg.solve(torch.exp(g * (x @ x.T - 1)) + lam * torch.eye(len(x)), y)
            preds["kernel ridge", f"gamma={g} lambda={lam}"] = torch.exp(g * (ex @ x.T - 1)) @ a
    torch.manual_seed(0)
    served_space = fine_tune(current, data, load_config(storage={"home": str(home)})).space
    served = served_space.similarity(served_space.image_views(eval_feats.image_features, eval_feats.class_probs),
                                     served_space.text_views(eval_feats.text))
    bridge = current.space.similarity(current.space.image_views(eval_feats.image_features, eval_feats.class_probs),
                                      current.space.text_views(eval_feats.text), mix=1.0)
    z = lambda s: (s - s.mean()) / s.std()  # noqa: E731
    rows = {("bridge", ""): r1(bridge), ("served candidate (the retrain)", ""): r1(served)}
    for (family, knobs), p in preds.items():
        sim = F.normalize(p, dim=-1) @ et.T
        rows[family, knobs] = r1(sim)
        for a in (0.3, 0.5, 0.7):
            rows[f"{family} + served", f"{knobs} weight={a}"] = r1(a * z(sim) + (1 - a) * z(served))
    weaker = lambda r: min(r["t2i"]["R@1"], r["i2t"]["R@1"])  # noqa: E731
    best: dict[str, tuple[str, dict]] = {}
    for (family, knobs), r in rows.items():
        if family not in best or weaker(r) > weaker(best[family][1]):
            best[family] = (knobs, r)
    print(f"taught pairs {len(x)}; held-out pictures {len(ex)}; 3x the bridge = "
          f"{3 * rows['bridge', '']['t2i']['R@1']:.3f} / {3 * rows['bridge', '']['i2t']['R@1']:.3f}")
    for family, (knobs, r) in best.items():
        print(f"{family:32s} best of its grid by the weaker direction: {knobs:30s} "
              f"t2i {r['t2i']['R@1']:.3f} [{r['t2i']['ci'][0]:.3f}, {r['t2i']['ci'][1]:.3f}]  "
              f"i2t {r['i2t']['R@1']:.3f} [{r['i2t']['ci'][0]:.3f}, {r['i2t']['ci'][1]:.3f}]")
    top = max(rows.items(), key=lambda kv: max(kv[1]["t2i"]["R@1"], kv[1]["i2t"]["R@1"]))
    print(f"highest single direction anywhere in the grid: {' '.join(top[0])}: t2i {top[1]['t2i']['R@1']:.3f} "
          f"i2t {top[1]['i2t']['R@1']:.3f}")
    with open(Path(args.data).with_name("variants.jsonl"), "a") as f:
        f.write(json.dumps({"name": "ceiling", "rows": {" ".join(k): r for k, r in rows.items()}}, default=str) + "\n")
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
    e = sub.add_parser("ceiling", help="other learners on the same taught pairs, held-out only (after `run` once)")
    e.add_argument("--home", required=True)
    e.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    return {"capture": capture, "run": run, "ceiling": ceiling}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
