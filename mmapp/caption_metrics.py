"""Standard caption metrics for generated captions: CIDEr-D, BLEU-4 and exact match, with bootstrap intervals.

CIDEr-D and BLEU come from ``pycocoevalcap`` (the COCO caption evaluation code; its ``Cider`` class is
CIDEr-D: clipped counts, a Gaussian length penalty, scaled by 10). Its PTB tokenizer, METEOR and SPICE
need Java and are not used: :func:`tokenize` lower-cases, drops punctuation and splits on spaces, the
same for references and candidates. CIDEr-D's document frequencies come from the references of the
set being scored, so scores of two models are comparable only on the same references (which is how the
retrain's gate uses them). Intervals: percentile bootstrap over items of the per-item scores.
No database, no UI.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> str:
    """Lower case, punctuation removed, single spaces (what the scorers compare)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class CaptionScores:
    n: int
    cider_d: float
    bleu4: float
    exact: float  # share of items whose tokenized caption equals one of its references
    cider_d_ci: tuple[float, float]
    exact_ci: tuple[float, float]
    per_item_cider: tuple[float, ...]
    per_item_exact: tuple[float, ...]

    def summary(self) -> dict:
        return {"n": self.n, "cider_d": round(self.cider_d, 4), "bleu4": round(self.bleu4, 4),
                "exact": round(self.exact, 4), "cider_d_ci": [round(x, 4) for x in self.cider_d_ci],
                "exact_ci": [round(x, 4) for x in self.exact_ci]}


def bootstrap_ci(values: Sequence[float], *, n_bootstrap: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` (items resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_bootstrap, len(x)))].mean(axis=1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n_bootstrap: int = 1000,
                   seed: int = 0) -> CaptionScores:
    """CIDEr-D, BLEU-4 and exact match of ``candidates[i]`` against ``references[i]`` (one or more each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")
    res = {i: [tokenize(c) or "<empty>"] for i, c in enumerate(candidates)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider, cider_items = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    exact = [float(res[i][0] in gts[i]) for i in range(len(candidates))]
    cider_items = [float(v) for v in np.asarray(cider_items, dtype=np.float64)]
    return CaptionScores(n=len(candidates), cider_d=float(cider), bleu4=float(bleu[3]), exact=float(np.mean(exact)),
                         cider_d_ci=bootstrap_ci(cider_items, n_bootstrap=n_bootstrap, seed=seed),
                         exact_ci=bootstrap_ci(exact, n_bootstrap=n_bootstrap, seed=seed),
                         per_item_cider=tuple(cider_items), per_item_exact=tuple(exact))
