"""Evaluate a model version on the fixed held-out sets and flatten the numbers the gate compares.

Both the candidate and the current model go through :func:`evaluate_model` with the same
:class:`EvalSets`, so their metrics are comparable item for item. No database, no training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmapp.evaluation import classification_metrics
from mmapp.joint import JointSpace
from mmapp.training import MemeExamples, PairFeatures

BOOTSTRAP_TEST = "bootstrap_test"
HELDOUT_PAIRS = "heldout_corrections"
MEMES = "memes"
HELDOUT_LABELS = "heldout_labels"
REPORT_PHOTOS = "report_photos"  # real photos no choice ever sees: evaluated and reported, never gated
TARGET_PAIRS = f"{HELDOUT_PAIRS}.mean_R@1"  # what caption corrections should raise
TARGET_LABELS = f"{HELDOUT_LABELS}.macro_f1"  # what label corrections should raise
_DIRECTIONS = {"i2t": "image_to_text", "t2i": "text_to_image"}


@dataclass
class EvalSets:
    bootstrap_test: PairFeatures  # the bootstrap corpus' test split
    heldout_pairs: PairFeatures | None = None  # users' held-out pairs (clean)
    memes_test: MemeExamples | None = None  # the bootstrap meme set's test split
    heldout_labels: MemeExamples | None = None  # users' held-out label corrections (clean)
    report_photos: PairFeatures | None = None  # data.report_photos: reported only, never in gate_metrics


def retrieval(space: JointSpace, feats: PairFeatures, *, n_bootstrap: int, max_images: int = 1000) -> dict:
    from mmapp.pipeline import evaluate_retrieval

    return evaluate_retrieval(space, feats, max_images=max_images, n_bootstrap=n_bootstrap)


def memes_metrics(head: torch.nn.Module, memes: MemeExamples, labels: list[str], *, n_bootstrap: int) -> dict:
    """Macro-F1/AUROC fused, image-only and text-only, and the ablation deltas between them."""
    from mmapp.pipeline import ablation_metrics

    return ablation_metrics(head, memes.image, memes.text, memes.labels, labels, n_bootstrap=n_bootstrap)


def evaluate_model(space: JointSpace, head: torch.nn.Module | None, labels: list[str], sets: EvalSets, *,
                   n_bootstrap: int = 1000) -> dict:
    """Nested metrics (with bootstrap intervals) for one model on every set that exists."""
    out: dict = {BOOTSTRAP_TEST: retrieval(space, sets.bootstrap_test, n_bootstrap=n_bootstrap)}
    if sets.heldout_pairs is not None and sets.heldout_pairs.image_features.shape[0] >= 2:
        out[HELDOUT_PAIRS] = retrieval(space, sets.heldout_pairs, n_bootstrap=n_bootstrap)
    if head is not None and sets.memes_test is not None and len(sets.memes_test):
        out[MEMES] = memes_metrics(head, sets.memes_test, labels, n_bootstrap=n_bootstrap)
    if head is not None and sets.heldout_labels is not None and len(sets.heldout_labels):
        h = sets.heldout_labels
        with torch.inference_mode():
            probs = head(h.image, h.text).logits.softmax(-1).numpy()
        out[HELDOUT_LABELS] = classification_metrics(probs, h.labels.numpy(), labels, n_bootstrap=n_bootstrap)
    if sets.report_photos is not None and sets.report_photos.image_features.shape[0] >= 2:
        out[REPORT_PHOTOS] = retrieval(space, sets.report_photos, n_bootstrap=n_bootstrap)
    return out


def mean_recall(report: dict, k: int) -> float:
    return float(np.mean([report[d][f"R@{k}"] for d in _DIRECTIONS.values()]))


def gate_metrics(nested: dict) -> dict[str, float | None]:
    """The flat metrics the gate compares (all higher-is-better): R@1/5/10 both ways on the bootstrap
    test split, mean R@K on held-out corrections, meme macro-F1/AUROC and ablation gains, held-out labels.
    The report photos are left out on purpose: a set the gate looks at is a set choices are tuned on."""
    flat: dict[str, float | None] = {}
    if BOOTSTRAP_TEST in nested:
        for short, long in _DIRECTIONS.items():
            for k in (1, 5, 10):
                flat[f"{BOOTSTRAP_TEST}.{short}.R@{k}"] = nested[BOOTSTRAP_TEST][long][f"R@{k}"]
    if HELDOUT_PAIRS in nested:
        for k in (1, 5, 10):
            flat[f"{HELDOUT_PAIRS}.mean_R@{k}"] = mean_recall(nested[HELDOUT_PAIRS], k)
    if MEMES in nested:
        m = nested[MEMES]
        flat[f"{MEMES}.macro_f1"] = m["fused"]["macro_f1"]
        flat[f"{MEMES}.macro_auroc"] = m["fused"]["macro_auroc"]
        for key, delta in m["ablation"].items():
            flat[f"{MEMES}.ablation.{key}.macro_f1"] = delta["macro_f1"]
    if HELDOUT_LABELS in nested:
        flat[f"{HELDOUT_LABELS}.macro_f1"] = nested[HELDOUT_LABELS]["macro_f1"]
        flat[f"{HELDOUT_LABELS}.macro_auroc"] = nested[HELDOUT_LABELS]["macro_auroc"]
    return flat


def small_set_tolerances(sets: EvalSets, tolerance: float) -> dict[str, float]:
    """Per-metric tolerances for the users' held-out sets: at least one item's worth (1/n), since on a
    set of 20 pairs a single caption moving past another is a change of 0.05, not a regression."""
    out: dict[str, float] = {}
    if sets.heldout_pairs is not None and len(sets.heldout_pairs.text_to_image):
        n = len(sets.heldout_pairs.text_to_image)
        out.update({f"{HELDOUT_PAIRS}.mean_R@{k}": max(tolerance, 1.0 / n) for k in (1, 5, 10)})
    if sets.heldout_labels is not None and len(sets.heldout_labels):
        n = len(sets.heldout_labels)
        out.update({f"{HELDOUT_LABELS}.{m}": max(tolerance, 1.0 / n) for m in ("macro_f1", "macro_auroc")})
    return out
