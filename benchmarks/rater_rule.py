"""What the per-rater chance test lets through, by how much wrong work a rater mixes in (issue 10).

    python benchmarks/rater_rule.py [--raters 2000] [--pairs 20]

A Monte Carlo over ``retrain.cleaning.flag_chance_agreement`` itself, pair by pair (``rater_min_items``
0) against per rater (the default, 10). Agreement is a z-score against random captions, so a wrong
caption's agreement is drawn from N(0, 1). Honest captions of a new domain are drawn from N(2.11, 1.38):
the normal that matches the flywheel simulation's clean run (docs/results.md, issue 10: 21 % of honest
pairs under the 1-SD bar, 30 % of those under 0). Each rater gives ``--pairs`` pairs, a share q of them
wrong. Prints, per q, the share of the wrong pairs accepted and of the honest pairs rejected.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrain.cleaning import Candidate, flag_chance_agreement  # noqa: E402

HONEST = (2.11, 1.38)  # mean, SD of an honest pair's agreement on a new domain (fitted to the simulation)


def run(q: float, *, raters: int, pairs: int, rater_min_items: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    candidates, wrong = [], set()
    for r in range(raters):
        n_wrong = int(round(q * pairs))
        for k in range(pairs):
            bad = k < n_wrong
            a = rng.normal(0.0, 1.0) if bad else rng.normal(*HONEST)
            item_id = f"r{r}-{k}"
            candidates.append(Candidate(item_id, f"rater{r}", "pair", f"{r:032x}{k:032x}", "x", agreement=float(a)))
            if bad:
                wrong.add(item_id)
    kept, _ = flag_chance_agreement(candidates, 1.0, rater_min_items=rater_min_items)
    kept_ids = {c.item_id for c in kept}
    n_wrong, n_honest = len(wrong), len(candidates) - len(wrong)
    wrong_in = len(kept_ids & wrong) / n_wrong if n_wrong else float("nan")
    honest_out = (n_honest - len(kept_ids - wrong)) / n_honest if n_honest else float("nan")
    return wrong_in, honest_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raters", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=20, help="pairs per rater in a run")
    args = ap.parse_args()
    print(f"{args.raters} raters x {args.pairs} pairs; wrong ~ N(0, 1), honest ~ N{HONEST}")
    print(f"{'wrong share q':>14} | {'wrong accepted: pair by pair':>28} {'per rater':>10} | "
          f"{'honest rejected: pair by pair':>29} {'per rater':>10}")
    for q in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0):
        w0, h0 = run(q, raters=args.raters, pairs=args.pairs, rater_min_items=0)
        w1, h1 = run(q, raters=args.raters, pairs=args.pairs, rater_min_items=10)
        print(f"{q:14.2f} | {w0:28.3f} {w1:10.3f} | {h0:29.3f} {h1:10.3f}")


if __name__ == "__main__":
    main()
