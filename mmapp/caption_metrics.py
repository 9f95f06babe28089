"""Standard caption metrics for generated captions: CIDEr-D, BLEU-4 and exact match, with bootstrap intervals.

CIDEr-D and BLEU come from ``pycocoevalcap`` (the COCO caption evaluation code; its ``Cider`` class is
CIDEr-D: clipped counts, a Gaussian length penalty, scaled by 10). Its PTB tokenizer, METEOR and SPICE
need Java and are not used: :func:`tokenize` lower-cases, drops punctuation and splits on spaces, the
same for references and candidates. CIDEr-D's document frequencies come from the references of the
sets being scored (:func:`score_caption_sets` pools several sets), so scores of two models are comparable
only on the same references (which is how the retrain's gate uses them). Intervals: percentile
bootstrap over items of the per-item scores.
No database, no UI.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

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
    return score_caption_sets({"all": (candidates, references)}, n_bootstrap=n_bootstrap, seed=seed)["all"]


def score_caption_sets(sets: Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]]]], *,
                       n_bootstrap: int = 1000, seed: int = 0) -> dict[str, CaptionScores]:
    """:func:`score_captions` for several named sets, with CIDEr-D's document frequencies taken over the
    references of *all* of them (as COCO's evaluation takes them over its whole test set). Scored alone, a
    small set whose references all share a word (every held-out correction names the new colour) gives
    that word no weight at all, and CIDEr-D could not see a model learn it. BLEU-4 and exact match are
    per set."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res, gts, owner = {}, {}, []
    for name, (candidates, references) in sets.items():
        if len(candidates) != len(references):
            raise ValueError(f"{name}: {len(candidates)} candidates but {len(references)} reference lists")
        if not candidates:
            raise ValueError(f"{name}: no captions to score")
        if any(not refs for refs in references):
            raise ValueError(f"{name}: every candidate needs at least one reference caption")
        for cand, refs in zip(candidates, references):
            k = len(owner)
            res[k], gts[k] = [tokenize(cand) or "<empty>"], [tokenize(r) for r in refs]
            owner.append(name)
    _, cider_items = Cider().compute_score(gts, res)
    cider_items = np.asarray(cider_items, dtype=np.float64)
    out = {}
    for name in sets:
        keys = [k for k, o in enumerate(owner) if o == name]
        bleu, _ = Bleu(4).compute_score({i: gts[k] for i, k in enumerate(keys)},
                                        {i: res[k] for i, k in enumerate(keys)}, verbose=0)
        cider = [float(cider_items[k]) for k in keys]
        exact = [float(res[k][0] in gts[k]) for k in keys]
        out[name] = CaptionScores(n=len(keys), cider_d=float(np.mean(cider)), bleu4=float(bleu[3]),
                                  exact=float(np.mean(exact)),
                                  cider_d_ci=bootstrap_ci(cider, n_bootstrap=n_bootstrap, seed=seed),
                                  exact_ci=bootstrap_ci(exact, n_bootstrap=n_bootstrap, seed=seed),
                                  per_item_cider=tuple(cider), per_item_exact=tuple(exact))
    return out
