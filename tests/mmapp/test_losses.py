import math

import pytest
import torch
import torch.nn.functional as F

from mmapp.losses import LogitScale, classification_loss, info_nce


def naive_info_nce(image, text, scale, group_ids=None):
    """Double loop over the batch; same-group off-diagonal pairs leave the denominator."""
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    batch = image.shape[0]
    total = 0.0
    for i in range(batch):
        for direction in ("i2t", "t2i"):
            terms = []
            for j in range(batch):
                if j != i and group_ids is not None and group_ids[i] == group_ids[j]:
                    continue
                a, b = (image[i], text[j]) if direction == "i2t" else (text[i], image[j])
                terms.append(scale * torch.dot(a, b))
            a, b = (image[i], text[i]) if direction == "i2t" else (text[i], image[i])
            positive = scale * torch.dot(a, b)
            total += -(positive - torch.logsumexp(torch.stack(terms), 0))
    return total / (2 * batch)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)


def test_info_nce_matches_double_loop(pair):
    image, text = pair
    scale = torch.tensor(3.0, dtype=torch.float64)
    assert torch.allclose(info_nce(image, text, scale), naive_info_nce(image, text, scale))


def test_info_nce_group_ids_match_double_loop(pair):
    image, text = pair
    scale = torch.tensor(3.0, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = info_nce(image, text, scale, group_ids=groups)
    assert torch.allclose(got, naive_info_nce(image, text, scale, groups))
    assert not torch.allclose(got, info_nce(image, text, scale))
    # all-distinct groups are the plain loss
    assert torch.allclose(info_nce(image, text, scale, group_ids=torch.arange(7)), info_nce(image, text, scale))


def test_info_nce_normalises_inputs(pair):
    image, text = pair
    scale = torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(info_nce(image * 5, text * 0.1, scale), info_nce(image, text, scale))


def test_info_nce_gradient_reaches_logit_scale(pair):
    image, text = (t.float() for t in pair)
    scale = LogitScale(0.07)
    loss = info_nce(image, text, scale(), group_ids=torch.tensor([0, 0, 1, 2, 3, 4, 5]))
    loss.backward()
    assert scale.log_scale.grad is not None and torch.isfinite(scale.log_scale.grad)
    assert scale.log_scale.grad.abs() > 0


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="group_ids"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0), group_ids=torch.arange(3))


def test_logit_scale_init_and_clamp():
    scale = LogitScale(0.07)
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert scale.temperature == pytest.approx(0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-5)
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with pytest.raises(ValueError, match="0.001"):
        LogitScale(0.001)
    with pytest.raises(ValueError, match="-1"):
        LogitScale(-1)


def test_classification_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    weights = torch.tensor([1.0, 2.0, 0.5])
    assert torch.allclose(classification_loss(logits, targets), F.cross_entropy(logits, targets))
    assert torch.allclose(classification_loss(logits, targets, label_smoothing=0.1, class_weights=weights),
                          F.cross_entropy(logits, targets, weight=weights, label_smoothing=0.1))
    with pytest.raises(ValueError, match="class_weights"):
        classification_loss(logits, targets, class_weights=torch.ones(2))
