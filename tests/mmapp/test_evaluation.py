import json
import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             roc_auc_score)

from mmapp.evaluation import (ablation_deltas, chance_recall, classification_metrics, retrieval_metrics,
                              select_candidates, subsample_candidates)

KS = (1, 2, 5)


def naive_ranks(similarity, text_to_image, tie_breaker=None):
    """Sort every query's candidates explicitly. Default tie order: wrong before correct (pessimistic);
    ``tie_breaker(n)`` supplies random secondary keys instead."""
    n_images, n_texts = similarity.shape
    i2t, t2i = [], []
    for i in range(n_images):
        correct = [j for j in range(n_texts) if text_to_image[j] == i]
        if not correct:
            continue
        second = tie_breaker(n_texts) if tie_breaker else [j in correct for j in range(n_texts)]
        order = sorted(range(n_texts), key=lambda j: (-similarity[i, j], second[j]))
        i2t.append(min(order.index(j) for j in correct) + 1)
    for j in range(n_texts):
        second = tie_breaker(n_images) if tie_breaker else [i == text_to_image[j] for i in range(n_images)]
        order = sorted(range(n_images), key=lambda i: (-similarity[i, j], second[i]))
        t2i.append(order.index(text_to_image[j]) + 1)
    return np.array(i2t, float), np.array(t2i, float)


def random_case(seed, n_images=9, n_texts=20, levels=None):
    rng = np.random.default_rng(seed)
    text_to_image = np.concatenate([np.arange(n_images - 1), rng.integers(0, n_images - 1, n_texts - n_images + 1)])
    rng.shuffle(text_to_image)  # image n_images-1 has no caption: a candidate, never an image->text query
    similarity = rng.integers(0, levels, (n_images, n_texts)) if levels else rng.normal(size=(n_images, n_texts))
    return similarity.astype(float), text_to_image


def check_direction(metrics, ranks, n_candidates):
    assert metrics.n_queries == len(ranks) and metrics.n_candidates == n_candidates
    for k in KS:
        assert metrics.recall[k] == pytest.approx(np.mean(ranks <= k))
    assert metrics.median_rank == pytest.approx(np.median(ranks))
    assert metrics.mean_rank == pytest.approx(ranks.mean())


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 3), (3, 2)])
def test_retrieval_matches_naive_sort(seed, levels):
    similarity, text_to_image = random_case(seed, levels=levels)
    report = retrieval_metrics(similarity, text_to_image, ks=KS, n_bootstrap=0)
    i2t, t2i = naive_ranks(similarity, text_to_image)
    check_direction(report.image_to_text, i2t, n_candidates=20)
    check_direction(report.text_to_image, t2i, n_candidates=9)
    assert report.image_to_text.recall_ci is None


def test_expected_ties_match_random_tie_breaking():
    similarity, text_to_image = random_case(4, levels=2)
    report = retrieval_metrics(similarity, text_to_image, ks=KS, n_bootstrap=0, ties="expected")
    rng = np.random.default_rng(0)
    trials = [naive_ranks(similarity, text_to_image, tie_breaker=rng.random) for _ in range(400)]
    for direction, which in ((report.image_to_text, 0), (report.text_to_image, 1)):
        ranks = np.stack([t[which] for t in trials])  # (trials, queries)
        for k in KS:
            assert direction.recall[k] == pytest.approx(np.mean(ranks <= k), abs=0.03)
        assert direction.mean_rank == pytest.approx(ranks.mean(), rel=0.03)


def test_multi_caption_image_uses_best_caption():
    # image 0 has captions 0, 1, 2; image 1 has caption 3
    similarity = np.array([[0.1, 0.9, 0.2, 0.5],
                           [0.3, 0.8, 0.1, 0.7]])
    report = retrieval_metrics(similarity, np.array([0, 0, 0, 1]), ks=(1, 2), n_bootstrap=0)
    # image 0: caption 1 is top-1; image 1: own caption 3 (0.7) is beaten by caption 1 (0.8) -> rank 2
    assert report.image_to_text.recall == {1: 0.5, 2: 1.0}
    assert report.image_to_text.n_queries == 2
    # text->image: caption 0 ranks its image 2nd (0.1 < 0.3); the others rank theirs 1st
    assert report.text_to_image.recall[1] == 0.75
    assert report.text_to_image.mean_rank == 1.25


def test_perfect_identity():
    report = retrieval_metrics(np.eye(30), np.arange(30), n_bootstrap=200)
    for direction in (report.image_to_text, report.text_to_image):
        assert direction.recall == {1: 1.0, 5: 1.0, 10: 1.0}
        assert direction.median_rank == 1.0 and direction.recall_ci[1] == (1.0, 1.0)


def test_constant_similarity_is_not_perfect():
    n = 50
    text_to_image = np.repeat(np.arange(n), 2)  # two captions per image
    similarity = np.zeros((n, 2 * n))
    pessimistic = retrieval_metrics(similarity, text_to_image, n_bootstrap=0)
    assert pessimistic.image_to_text.recall[10] == 0.0 and pessimistic.text_to_image.recall[10] == 0.0
    assert pessimistic.text_to_image.median_rank == n
    expected = retrieval_metrics(similarity, text_to_image, n_bootstrap=0, ties="expected")
    for k in (1, 5, 10):
        assert expected.text_to_image.recall[k] == pytest.approx(k / n)
        assert expected.text_to_image.recall[k] == pytest.approx(expected.text_to_image.chance_recall[k])
        assert expected.image_to_text.recall[k] == pytest.approx(chance_recall(2 * n, k, 2))
        assert expected.image_to_text.chance_recall[k] == pytest.approx(chance_recall(2 * n, k, 2))


def test_chance_recall():
    assert chance_recall(10, 1) == pytest.approx(0.1)
    assert chance_recall(10, 5, 2) == pytest.approx(1 - math.comb(8, 5) / math.comb(10, 5))
    assert chance_recall(10, 9, 2) == 1.0 and chance_recall(10, 20) == 1.0 and chance_recall(10, 0) == 0.0
    with pytest.raises(ValueError, match="n_positives=11"):
        chance_recall(10, 1, 11)


def test_bootstrap_intervals_contain_estimates_and_are_seeded():
    rng = np.random.default_rng(5)
    text_to_image = np.repeat(np.arange(60), 2)
    similarity = rng.normal(size=(60, 120)) + 2.0 * (text_to_image[None, :] == np.arange(60)[:, None])
    report = retrieval_metrics(similarity, text_to_image, n_bootstrap=300, seed=1)
    for direction in (report.image_to_text, report.text_to_image):
        for k, (lo, hi) in direction.recall_ci.items():
            assert lo <= direction.recall[k] <= hi and lo < hi
        lo, hi = direction.median_rank_ci
        assert lo <= direction.median_rank <= hi
    assert retrieval_metrics(similarity, text_to_image, n_bootstrap=300, seed=1) == report
    assert retrieval_metrics(similarity, text_to_image, n_bootstrap=300, seed=2) != report
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["image_to_text"]["R@1"] == report.image_to_text.recall[1]
    assert as_dict["text_to_image"]["R@5_ci"] == list(report.text_to_image.recall_ci[5])


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 3\]"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 3]))
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), np.array([0, 0]))


def test_subsample_candidates():
    assert np.array_equal(subsample_candidates(20), np.arange(20))
    picked = subsample_candidates(5000, seed=3)
    assert len(picked) == 1000 and len(np.unique(picked)) == 1000 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, subsample_candidates(5000, seed=3))
    assert not np.array_equal(picked, subsample_candidates(5000, seed=4))
    keep, remapped = select_candidates(np.array([1, 3]), np.array([0, 1, 3, 3, 2]))
    assert keep.tolist() == [1, 2, 3] and remapped.tolist() == [0, 1, 1]


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LABELS = ["positive", "sarcastic", "dark humor"]


def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    probs = softmax(rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[targets])
    probs[:20] = probs[20:40]  # tied scores across samples exercise the average-rank AUROC
    m = classification_metrics(probs, targets, LABELS, n_bootstrap=200)
    preds = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(targets, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro"))
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(targets, preds, labels=[0, 1, 2])
    for c, label in enumerate(LABELS):
        row = m["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[c], recall[c], f1[c], support[c]))
        assert row["auroc"] == pytest.approx(roc_auc_score(targets == c, probs[:, c]))
    assert m["confusion_matrix"] == confusion_matrix(targets, preds).tolist()
    lo, hi = m["macro_f1_ci"]
    assert lo <= m["macro_f1"] <= hi and lo < hi
    json.dumps(m)


def test_classification_with_absent_class():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, 80)  # "dark humor" never occurs (but may be predicted)
    probs = softmax(rng.normal(size=(80, 3)))
    m = classification_metrics(probs, targets, LABELS, n_bootstrap=100)
    preds = probs.argmax(1)
    assert m["auroc_undefined"] == ["dark humor"] and m["per_class"]["dark humor"]["auroc"] is None
    expected_auroc = np.mean([roc_auc_score(targets == c, probs[:, c]) for c in (0, 1)])
    assert m["macro_auroc"] == pytest.approx(expected_auroc)
    assert m["macro_f1"] == pytest.approx(f1_score(targets, preds, labels=[0, 1, 2], average="macro",
                                                   zero_division=0))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        classification_metrics(probs[:, :2], targets, LABELS)


def test_ablation_deltas():
    metrics = {"fused": {"accuracy": 0.8, "macro_f1": 0.7}, "image_only": {"accuracy": 0.6, "macro_f1": 0.5},
               "text_only": {"accuracy": 0.75, "macro_f1": 0.72}}
    deltas = ablation_deltas(metrics)
    assert deltas["fused_minus_image_only"] == pytest.approx({"accuracy": 0.2, "macro_f1": 0.2})
    assert deltas["fused_minus_text_only"] == pytest.approx({"accuracy": 0.05, "macro_f1": -0.02})
    with pytest.raises(ValueError, match=r"missing \['text_only'\]"):
        ablation_deltas({"fused": metrics["fused"], "image_only": metrics["image_only"]})
