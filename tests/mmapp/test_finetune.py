"""Tower fine-tuning: which tensors train, frozen afterwards, loss falls, delta round trip (real weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mmapp.config import TrainConfig
from mmapp.device import resolve_placement
from mmapp.encoders import EncoderOptions, create_encoder
from mmapp.finetune import (CaptionedImages, finetune_with_unfrozen_blocks, load_tower_delta,
                            save_tower_delta)
from mmapp.joint import AlignmentConfig, AlignmentModel, conse
from mmapp.losses import info_nce

COLOURS = ((220, 40, 40), (40, 160, 60), (40, 70, 220), (240, 200, 30))
SHAPES = ("disc", "square", "triangle", "bar")
TEXT_DIM = 32
TOP_T = 5
CONFIG = TrainConfig(seed=0, epochs=2, batch_size=8, lr=3e-3)
TRAINED_PREFIXES = ("_blocks.15.", "_conv_head.", "_bn1.")  # EfficientNet-Lite0 has 16 blocks


def shape_image(colour: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(im)
    box = (12, 12, size - 12, size - 12)
    if shape == "disc":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, 8), (size - 8, size - 8), (8, size - 8)], fill=colour)
    else:
        d.rectangle((6, size // 2 - 6, size - 6, size // 2 + 6), fill=colour)
    return im


@pytest.fixture(scope="module")
def shapes():
    """16 images (4 colours x 4 shapes), one caption each: colour vector + shape vector."""
    gen = torch.Generator().manual_seed(1)
    colour_vec = F.normalize(torch.randn(len(COLOURS), TEXT_DIM, generator=gen), dim=-1)
    shape_vec = F.normalize(torch.randn(len(SHAPES), TEXT_DIM, generator=gen), dim=-1)
    images, text = [], []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            images.append(shape_image(colour, shape))
            text.append(F.normalize(colour_vec[c] + shape_vec[s], dim=-1))
    class_text = F.normalize(torch.randn(1000, TEXT_DIM, generator=gen), dim=-1)  # (C, D_txt)
    return CaptionedImages(images, torch.stack(text), np.arange(len(images))), class_text


def new_encoder(tmp_path: Path):
    return create_encoder("efficientnet-lite0", EncoderOptions(placement=resolve_placement("cpu"), cache_dir=tmp_path),
                          kind="image")


def new_model() -> AlignmentModel:
    torch.manual_seed(0)
    return AlignmentModel(AlignmentConfig(image_dim=1280, text_dim=TEXT_DIM, bridge_dim=TEXT_DIM, joint_dim=16,
                                          hidden_dim=64)).eval()


def full_set_loss(encoder, model, data: CaptionedImages, class_text) -> float:
    """InfoNCE over all 16 pairs at once, everything in eval mode."""
    with torch.inference_mode():
        out = encoder.encode(data.images)
        z_img = model.encode_image(out.features, conse(out.class_probs, class_text, TOP_T))
        return float(info_nce(z_img, model.encode_text(data.text), model.logit_scale()))


@pytest.fixture(scope="module")
def finetuned(shapes, tmp_path_factory):
    data, class_text = shapes
    encoder = new_encoder(tmp_path_factory.mktemp("cache"))
    model = new_model()
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    loss_before = full_set_loss(encoder, model, data, class_text)
    result = finetune_with_unfrozen_blocks(encoder, model, data.images, data.text, data.text_to_image,
                                           class_text=class_text, top_t=TOP_T, config=CONFIG, n_blocks=1)
    return encoder, before, model, loss_before, result


@pytest.mark.weights
def test_only_the_last_block_and_head_change(finetuned):
    encoder, before, _, _, result = finetuned
    after = encoder.model.state_dict()
    trained = {k for k in after if k.startswith(TRAINED_PREFIXES)}
    for key, value in after.items():
        if key not in trained:
            assert torch.equal(value, before[key]), f"frozen tensor {key} changed"
    assert not torch.equal(after["_blocks.15._project_conv.weight"], before["_blocks.15._project_conv.weight"])
    assert not torch.equal(after["_conv_head.weight"], before["_conv_head.weight"])
    # BatchNorm statistics stay those of ImageNet: the tower trains in eval mode
    assert torch.equal(after["_blocks.15._bn2.running_mean"], before["_blocks.15._bn2.running_mean"])
    assert set(result.encoder_state_dict) == trained
    assert all(torch.equal(result.encoder_state_dict[k], after[k]) for k in trained)


@pytest.mark.weights
def test_tower_and_model_end_frozen_in_eval_mode(finetuned):
    encoder, _, model, _, result = finetuned
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training and not any(m.training for m in encoder.model.modules())
    assert not result.model.training
    assert result.model is not model  # the caller's projections are not trained in place
    assert [h["epoch"] for h in result.history] == [0, 1, 2] and result.best_epoch == 2


@pytest.mark.weights
def test_loss_goes_down(finetuned, shapes):
    encoder, _, _, loss_before, result = finetuned
    data, class_text = shapes
    assert full_set_loss(encoder, result.model, data, class_text) < loss_before
    assert result.history[2]["train_loss"] < result.history[1]["train_loss"]


@pytest.mark.weights
def test_delta_round_trips_into_a_fresh_encoder(finetuned, shapes, tmp_path):
    encoder, _, _, _, result = finetuned
    data, _ = shapes
    path = tmp_path / "tower.safetensors"
    digest = save_tower_delta(encoder, 1, path)

    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(result.encoder_state_dict)
    # on CPU the float32 masters are the live weights: saving either gives the same digest
    assert save_tower_delta(encoder, 1, tmp_path / "masters.safetensors", state=result.encoder_state_dict) == digest
    fresh = new_encoder(tmp_path)
    assert not torch.equal(fresh.encode(data.images[:4]).features, encoder.encode(data.images[:4]).features)
    assert load_tower_delta(fresh, path) == digest
    assert not any(p.requires_grad for p in fresh.model.parameters())
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    assert torch.equal(fresh.encode(data.images[:4]).features, encoder.encode(data.images[:4]).features)

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a tower delta"):
        load_tower_delta(fresh, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not hold the last 2 block"):
        save_tower_delta(encoder, 2, tmp_path / "two.safetensors", state=result.encoder_state_dict)


@pytest.mark.weights
def test_validation_picks_the_best_epoch_and_runs_are_seeded(shapes, tmp_path):
    data, class_text = shapes
    paths = []
    for i, im in enumerate(data.images[:12]):  # images given as files: the loading branch
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    val = CaptionedImages(paths[8:], data.text[8:12], np.arange(4))
    runs = []
    for _ in range(2):
        runs.append(finetune_with_unfrozen_blocks(
            new_encoder(tmp_path), new_model(), paths[:8], data.text[:8], np.arange(8), class_text=class_text,
            top_t=TOP_T, config=TrainConfig(seed=3, epochs=1, batch_size=8, lr=3e-3), n_blocks=1, val=val))
    first, second = runs
    scores = [h["val_mean_r1"] for h in first.history]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert first.best_epoch == (1 if scores[1] > scores[0] else 0)
    assert first.history == second.history
    assert all(torch.equal(first.encoder_state_dict[k], second.encoder_state_dict[k]) for k in first.encoder_state_dict)


def test_zero_blocks_points_to_train_alignment():
    with pytest.raises(ValueError, match="train_alignment"):
        finetune_with_unfrozen_blocks(None, None, [], torch.empty(0, 4), np.empty(0, dtype=np.int64),
                                      class_text=None, top_t=1, config=TrainConfig(), n_blocks=0)
