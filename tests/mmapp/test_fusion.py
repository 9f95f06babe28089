import dataclasses

import pytest
import torch

from mmapp.fusion import FusionConfig, FusionOutput, create_fusion_head, list_fusion_heads

HEADS = list_fusion_heads()
B, D_IMG, D_TXT, L, H = 6, 12, 10, 3, 16


def make_head(name, **overrides):
    torch.manual_seed(0)
    config = FusionConfig(image_dim=D_IMG, text_dim=D_TXT, num_labels=L, hidden_dim=H, num_heads=2,
                          tokens_per_modality=2, **overrides)
    return create_fusion_head(name, config)


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D_IMG, generator=g), torch.randn(B, D_TXT, generator=g)


def test_factory_lists_heads_and_rejects_unknown():
    assert HEADS == ["late", "concat", "cross-attention"]
    with pytest.raises(ValueError, match=r"'gated'.*\['late', 'concat', 'cross-attention'\]"):
        make_head("gated")


def test_config_is_frozen_and_validated():
    config = FusionConfig(image_dim=4, text_dim=4, num_labels=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_dim = 8
    with pytest.raises(ValueError, match="modality_dropout.*1.5"):
        FusionConfig(image_dim=4, text_dim=4, num_labels=3, modality_dropout=1.5)
    with pytest.raises(ValueError, match="num_heads 3"):
        create_fusion_head("cross-attention", FusionConfig(image_dim=4, text_dim=4, num_labels=3, num_heads=3))


@pytest.mark.parametrize("name", HEADS)
def test_output_shapes(name, features):
    head = make_head(name).eval()
    out = head(*features)
    assert isinstance(out, FusionOutput)
    assert out.logits.shape == (B, L) and out.fused.shape == (B, H)
    assert out.image_present.all() and out.text_present.all()


@pytest.mark.parametrize("name", HEADS)
def test_missing_modality_paths(name, features):
    image, text = features
    head = make_head(name).eval()
    with torch.no_grad():
        for out in (head(None, text), head(image, None)):
            assert out.logits.shape == (B, L) and torch.isfinite(out.logits).all()
        mask = torch.tensor([True, False, True, False, True, True])
        mixed = head(image, text, image_present=mask)
        assert torch.equal(mixed.image_present, mask)
        # rows whose image is present are unaffected by the mask; absent rows match the text-only output
        assert torch.allclose(mixed.logits[mask], head(image, text).logits[mask], atol=1e-6)
        assert torch.allclose(mixed.logits[~mask], head(None, text).logits[~mask], atol=1e-6)
        # absent rows may hold garbage (even NaN) without affecting anything
        garbage = image.clone()
        garbage[~mask] = float("nan")
        assert torch.allclose(head(garbage, text, image_present=mask).logits, mixed.logits, atol=1e-6)
    with pytest.raises(ValueError, match="image=None and text=None"):
        head(None, None)
    with pytest.raises(ValueError, match=r"samples \[1\] have neither image nor text"):
        head(image, text, image_present=torch.tensor([True, False, True, True, True, True]),
             text_present=torch.tensor([True, False, True, True, True, True]))
    with pytest.raises(ValueError, match="image=None but image_present"):
        head(None, text, image_present=torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"\(B, {D_IMG}\).*\(6, 5\)"):
        head(torch.randn(B, 5), text)


@pytest.mark.parametrize("name", HEADS)
def test_absent_modality_equals_all_false_mask(name, features):
    image, text = features
    head = make_head(name).eval()
    with torch.no_grad():
        none_out = head(None, text)
        masked_out = head(image, text, image_present=torch.zeros(B, dtype=torch.bool))
        assert torch.allclose(none_out.logits, masked_out.logits, atol=1e-6)
        assert torch.allclose(none_out.fused, masked_out.fused, atol=1e-6)
        none_txt = head(image, None)
        masked_txt = head(image, text, text_present=torch.zeros(B, dtype=torch.bool))
        assert torch.allclose(none_txt.logits, masked_txt.logits, atol=1e-6)
        # the missing modality changes the prediction (it is not silently ignored by the fused path)
        assert not torch.allclose(none_out.logits, head(image, text).logits)


@pytest.mark.parametrize("name", [n for n in HEADS if n != "late"])
def test_null_embedding_is_used(name, features):
    _, text = features
    head = make_head(name).eval()
    with torch.no_grad():
        before = head(None, text).logits
        head.image_projection.null.add_(1.0)
        assert not torch.allclose(before, head(None, text).logits)


@pytest.mark.parametrize("name", HEADS)
def test_modality_dropout_only_in_train_mode(name):
    head = make_head(name, modality_dropout=0.5, dropout=0.0)
    image, text = torch.randn(4000, D_IMG), torch.randn(4000, D_TXT)
    torch.manual_seed(1)
    with torch.no_grad():
        out = head.train()(image, text)
    dropped_image, dropped_text = ~out.image_present, ~out.text_present
    assert not (dropped_image & dropped_text).any()
    rate = (dropped_image | dropped_text).float().mean().item()
    assert 0.45 < rate < 0.55
    assert 0.4 < dropped_image.float().mean().item() / rate < 0.6
    # a sample that only has text keeps it
    only_text = head(None, text[:50])
    assert only_text.text_present.all()
    with torch.no_grad():
        eval_out = head.eval()(image, text)
    assert eval_out.image_present.all() and eval_out.text_present.all()
    with torch.no_grad():
        assert torch.equal(head(image, text).logits, eval_out.logits)


@pytest.mark.parametrize("name", HEADS)
def test_full_modality_dropout_matches_single_modality_outputs(name, features):
    image, text = features
    head = make_head(name, modality_dropout=1.0, dropout=0.0)
    with torch.no_grad():
        out = head.train()(image, text)
        assert (out.image_present ^ out.text_present).all()
        head.eval()
        expected = torch.where(out.image_present[:, None], head(image, None).logits, head(None, text).logits)
    assert torch.allclose(out.logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_only_trainable_parameters(name, features):
    image, text = features
    head = make_head(name).train()
    frozen = head.image_encoder if name == "late" else head.image_projection
    for p in frozen.parameters():
        p.requires_grad_(False)
    out = head(image, text, image_present=torch.tensor([True, False, True, True, False, True]))
    out.logits.sum().backward()
    frozen_ids = {id(p) for p in frozen.parameters()}
    for pname, p in head.named_parameters():
        if id(p) in frozen_ids:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
