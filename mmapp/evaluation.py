"""Evaluation metrics on numpy arrays: cross-modal retrieval, classification, modality ablation.

Pure numpy in, plain dicts/dataclasses out (JSON-able via ``to_dict``); no torch, no sklearn, no I/O.
Recalls are fractions in [0, 1]; ranks are 1-based. Bootstrap intervals are 95% percentile
intervals from resampling queries (retrieval) or examples (classification) with replacement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

TieRule = Literal["pessimistic", "expected"]
_BOOTSTRAP_CHUNK = 100  # resamples drawn at once; bounds memory at chunk * n indices


def chance_recall(n_candidates: int, k: int, n_positives: int = 1) -> float:
    """P(at least one of ``n_positives`` correct items is in the top ``k`` of a uniformly random ranking)."""
    if n_candidates < 1 or not 1 <= n_positives <= n_candidates or k < 0:
        raise ValueError(f"need 1 <= n_positives <= n_candidates and k >= 0, got n_candidates={n_candidates}, "
                         f"k={k}, n_positives={n_positives}")
    miss = 1.0  # P(the top k are all wrong) = prod_{i<k} (n - p - i) / (n - i)
    for i in range(min(k, n_candidates - n_positives + 1)):
        miss *= (n_candidates - n_positives - i) / (n_candidates - i)
    return 1.0 - miss


def subsample_candidates(n_images: int, max_images: int = 1000, seed: int = 0) -> np.ndarray:
    """Sorted image indices to use as the retrieval gallery: all of them, or ``max_images`` drawn
    without replacement (deterministic for a seed) so R@K is comparable across corpus sizes."""
    if n_images < 0 or max_images < 1:
        raise ValueError(f"need n_images >= 0 and max_images >= 1, got {n_images} and {max_images}")
    if n_images <= max_images:
        return np.arange(n_images)
    return np.sort(np.random.default_rng(seed).choice(n_images, size=max_images, replace=False))


def select_candidates(image_indices: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Captions of the chosen images: returns (text indices to keep, their image index within ``image_indices``)."""
    image_indices = np.asarray(image_indices)
    position = np.full(int(max(image_indices.max(initial=-1), np.max(text_to_image, initial=-1))) + 1, -1)
    position[image_indices] = np.arange(len(image_indices))
    remapped = position[np.asarray(text_to_image)]
    keep = np.flatnonzero(remapped >= 0)
    return keep, remapped[keep]


@dataclass(frozen=True)
class DirectionMetrics:
    recall: dict[int, float]  # K -> R@K as a fraction in [0, 1]
    recall_ci: dict[int, tuple[float, float]] | None  # K -> 95% bootstrap interval; None if n_bootstrap=0
    median_rank: float
    median_rank_ci: tuple[float, float] | None
    mean_rank: float
    n_queries: int
    n_candidates: int
    chance_recall: dict[int, float]  # K -> R@K of a random ranking, for reference

    def to_dict(self) -> dict:
        out: dict = {}
        for k, value in self.recall.items():
            out[f"R@{k}"] = value
            out[f"R@{k}_ci"] = list(self.recall_ci[k]) if self.recall_ci else None
            out[f"chance_R@{k}"] = self.chance_recall[k]
        out.update(median_rank=self.median_rank,
                   median_rank_ci=list(self.median_rank_ci) if self.median_rank_ci else None,
                   mean_rank=self.mean_rank, n_queries=self.n_queries, n_candidates=self.n_candidates)
        return out


@dataclass(frozen=True)
class RetrievalReport:
    image_to_text: DirectionMetrics
    text_to_image: DirectionMetrics
    ties: str

    def to_dict(self) -> dict:
        return {"image_to_text": self.image_to_text.to_dict(), "text_to_image": self.text_to_image.to_dict(),
                "ties": self.ties}


def _bootstrap_indices(rng: np.random.Generator, n: int, n_bootstrap: int) -> Iterator[np.ndarray]:
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        yield rng.integers(0, n, size=(min(_BOOTSTRAP_CHUNK, n_bootstrap - start), n))  # (chunk, n)


def _interval(samples: Sequence[float] | np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(samples), [2.5, 97.5])
    return float(lo), float(hi)


def _hits_and_ranks(above: np.ndarray, tied_wrong: np.ndarray, tied_correct: np.ndarray, ks: Sequence[int],
                    ties: TieRule) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per-query rank of the best correct item and R@K indicator, from counts of wrong items scoring
    above it, wrong items tied with it, and correct items tied with it (including itself).

    pessimistic: tied wrong items rank first. expected: the exact expectation under a uniformly random
    order within the tie, so a constant similarity matrix scores exactly chance.
    """
    if ties == "pessimistic":
        ranks = (above + tied_wrong + 1).astype(float)
        return ranks, {k: (ranks <= k).astype(float) for k in ks}
    block = tied_wrong + tied_correct
    ranks = above + (block + 1) / (tied_correct + 1)  # expected position of the first of p among n shuffled
    hits = {}
    for k in ks:
        slots = np.clip(k - above, 0, None)  # positions of the tie block that still fall within the top k
        miss = np.ones(len(above))
        for i in range(int(min(slots.max(initial=0), block.max(initial=0)))):
            factor = np.where(block - i > 0, np.clip(tied_wrong - i, 0, None) / np.maximum(block - i, 1), 0.0)
            miss *= np.where(i < slots, factor, 1.0)
        hits[k] = np.where(slots > 0, 1.0 - miss, 0.0)
    return ranks, hits


def _direction(ranks: np.ndarray, hits: dict[int, np.ndarray], chance: dict[int, float], n_candidates: int,
               n_bootstrap: int, rng: np.random.Generator) -> DirectionMetrics:
    recall_ci = median_ci = None
    if n_bootstrap > 0:
        recall_samples: dict[int, list[np.ndarray]] = {k: [] for k in hits}
        median_samples = []
        for idx in _bootstrap_indices(rng, len(ranks), n_bootstrap):
            for k, hit in hits.items():
                recall_samples[k].append(hit[idx].mean(axis=1))
            median_samples.append(np.median(ranks[idx], axis=1))
        recall_ci = {k: _interval(np.concatenate(s)) for k, s in recall_samples.items()}
        median_ci = _interval(np.concatenate(median_samples))
    return DirectionMetrics(recall={k: float(h.mean()) for k, h in hits.items()}, recall_ci=recall_ci,
                            median_rank=float(np.median(ranks)), median_rank_ci=median_ci,
                            mean_rank=float(ranks.mean()), n_queries=len(ranks), n_candidates=n_candidates,
                            chance_recall=chance)


def retrieval_metrics(similarity: np.ndarray, text_to_image: np.ndarray, *, ks: Sequence[int] = (1, 5, 10),
                      n_bootstrap: int = 1000, seed: int = 0, ties: TieRule = "pessimistic") -> RetrievalReport:
    """Image<->text retrieval from a ``(N_images, N_texts)`` similarity matrix.

    ``text_to_image[j]`` is the index of caption j's image; an image may have several captions.
    image->text: each image with at least one caption is a query, ranked over all texts; its rank is
    that of its best-ranked correct caption. text->image: each caption is a query over all images;
    its rank is that of its own image. Ties between a correct item and wrong ones count
    pessimistically by default (the correct item ranks after them), so a degenerate constant
    matrix scores R@K = 0 for K < N, never perfect; ``ties="expected"`` instead averages over a random
    order within ties, which gives exactly the chance level on a constant matrix.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (N_images, N_texts), got shape {similarity.shape}")
    n_images, n_texts = similarity.shape
    if text_to_image.shape != (n_texts,) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must be integer ({n_texts},), got {text_to_image.dtype} {text_to_image.shape}")
    if n_texts == 0 or text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(f"text_to_image values must lie in [0, {n_images}), got "
                         f"[{text_to_image.min(initial=0)}, {text_to_image.max(initial=0)}] over {n_texts} texts")
    if not np.isfinite(similarity).all():
        raise ValueError(f"similarity has {int((~np.isfinite(similarity)).sum())} non-finite entries")
    if ties not in ("pessimistic", "expected"):
        raise ValueError(f"ties must be 'pessimistic' or 'expected', got {ties!r}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    rng = np.random.default_rng(seed)
    texts = np.arange(n_texts)

    correct = np.zeros((n_images, n_texts), dtype=bool)  # (N_img, N_txt)
    correct[text_to_image, texts] = True
    n_positives = correct.sum(axis=1)  # (N_img,)
    queries = np.flatnonzero(n_positives > 0)
    sim_q, correct_q = similarity[queries], correct[queries]  # (Q, N_txt)
    best = np.where(correct_q, sim_q, -np.inf).max(axis=1, keepdims=True)  # (Q, 1) best correct score
    ranks, hits = _hits_and_ranks(above=((sim_q > best) & ~correct_q).sum(axis=1),
                                  tied_wrong=((sim_q == best) & ~correct_q).sum(axis=1),
                                  tied_correct=((sim_q == best) & correct_q).sum(axis=1), ks=ks, ties=ties)
    positives_q = n_positives[queries]
    chance = {k: float(np.mean([chance_recall(n_texts, k, p) for p in positives_q])) for k in ks}
    image_to_text = _direction(ranks, hits, chance, n_texts, n_bootstrap, rng)

    own = similarity[text_to_image, texts][None, :]  # (1, N_txt) score of each caption's own image
    ranks, hits = _hits_and_ranks(above=(similarity > own).sum(axis=0), tied_wrong=(similarity == own).sum(axis=0) - 1,
                                  tied_correct=np.ones(n_texts, dtype=int), ks=ks, ties=ties)
    chance = {k: chance_recall(n_images, k) for k in ks}
    text_to_image_metrics = _direction(ranks, hits, chance, n_images, n_bootstrap, rng)
    return RetrievalReport(image_to_text=image_to_text, text_to_image=text_to_image_metrics, ties=ties)


def _per_class_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class from (..., L, L) confusion matrices (rows true, cols predicted);
    0 where undefined (sklearn's zero_division=0)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(float)
    predicted, actual = confusion.sum(axis=-2), confusion.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return precision, recall, f1


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Mann-Whitney AUROC with average ranks for ties; None if only one class is present."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = (ends - counts + 1 + ends) / 2  # mean of 1-based ranks within each tie group
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, targets: np.ndarray, labels: list[str], *,
                           n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Accuracy, macro-F1 (with 95% bootstrap interval), macro one-vs-rest AUROC, per-class
    precision/recall/F1/AUROC and the confusion matrix (rows = true label, columns = predicted).

    ``probs`` ``(N, L)`` are class probabilities (any scores work; the prediction is the argmax).
    Macro-F1 averages over all ``L`` labels, so a label never predicted nor present scores 0 there.
    Macro AUROC averages over labels that have both positives and negatives in ``targets``; the
    others get ``None`` and are listed under ``auroc_undefined``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probs must be (N, {len(labels)}) for labels {labels}, got shape {probs.shape}")
    n, num_labels = probs.shape
    if n == 0 or targets.shape != (n,) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be a non-empty integer array of shape ({n},), got {targets.dtype} {targets.shape}")
    if targets.min() < 0 or targets.max() >= num_labels:
        raise ValueError(f"targets must lie in [0, {num_labels}), got [{targets.min()}, {targets.max()}]")
    if not np.isfinite(probs).all():
        raise ValueError(f"probs has {int((~np.isfinite(probs)).sum())} non-finite entries")
    preds = probs.argmax(axis=1)

    confusion = np.bincount(targets * num_labels + preds, minlength=num_labels ** 2).reshape(num_labels, num_labels)
    precision, recall, f1 = _per_class_from_confusion(confusion)
    aurocs = [_binary_auroc(targets == c, probs[:, c]) for c in range(num_labels)]
    defined = [a for a in aurocs if a is not None]

    macro_f1_ci = accuracy_ci = None
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        f1_samples, accuracy_samples = [], []
        for idx in _bootstrap_indices(rng, n, n_bootstrap):
            chunk = len(idx)
            codes = (np.arange(chunk)[:, None] * num_labels ** 2 + targets[idx] * num_labels + preds[idx]).ravel()
            confusions = np.bincount(codes, minlength=chunk * num_labels ** 2).reshape(chunk, num_labels, num_labels)
            f1_samples.append(_per_class_from_confusion(confusions)[2].mean(axis=1))
            accuracy_samples.append((targets[idx] == preds[idx]).mean(axis=1))
        macro_f1_ci = list(_interval(np.concatenate(f1_samples)))
        accuracy_ci = list(_interval(np.concatenate(accuracy_samples)))

    return {
        "n": n,
        "labels": list(labels),
        "accuracy": float((preds == targets).mean()),
        "accuracy_ci": accuracy_ci,
        "macro_f1": float(f1.mean()),
        "macro_f1_ci": macro_f1_ci,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "auroc_undefined": [label for label, a in zip(labels, aurocs) if a is None],
        "per_class": {label: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                              "auroc": aurocs[c], "support": int(confusion[c].sum())}
                      for c, label in enumerate(labels)},
        "confusion_matrix": confusion.tolist(),
    }


ABLATION_MODES = ("fused", "image_only", "text_only")
ABLATION_METRICS = ("accuracy", "macro_f1")


def ablation_deltas(metrics_by_mode: dict[str, dict]) -> dict:
    """What each modality adds: ``fused - image_only`` and ``fused - text_only`` for accuracy and macro-F1.

    ``metrics_by_mode`` maps 'fused', 'image_only', 'text_only' to :func:`classification_metrics` dicts.
    A positive ``fused_minus_image_only`` delta is the gain from adding text to the image.
    """
    missing = [m for m in ABLATION_MODES if m not in metrics_by_mode]
    if missing:
        raise ValueError(f"ablation needs modes {list(ABLATION_MODES)}; missing {missing}, got {sorted(metrics_by_mode)}")
    fused = metrics_by_mode["fused"]
    return {f"fused_minus_{mode}": {metric: float(fused[metric] - metrics_by_mode[mode][metric])
                                    for metric in ABLATION_METRICS}
            for mode in ABLATION_MODES[1:]}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (characters or words)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return row[-1]


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - word error rate (case-insensitive), floored at 0: the OCR metric."""
    ref, hyp = reference.upper().split(), hypothesis.upper().split()
    return max(0.0, 1.0 - edit_distance(ref, hyp) / max(1, len(ref)))

