"""Pre-aligned towers (open_clip-like): the native cosine is the zero-training baseline, projections
start as the identity, the served mix is guarded by the native score, and a saved space round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmapp.config import TrainConfig
from mmapp.joint import AlignmentConfig, AlignmentModel, JointSpace
from mmapp.model_store import ModelStore, VersionMeta
from mmapp.training import PairFeatures, SpaceData, fit_space, mean_r1


def aligned_pairs(n: int, seed: int, *, d: int = 16, noise: float = 0.9) -> PairFeatures:
    """A shared space where image and caption embeddings are noisy copies of one latent, plus a fixed
    linear distortion on the image side that training can learn to undo (the native cosine can't)."""
    g = torch.Generator().manual_seed(seed)
    latent = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    distort = torch.eye(d) + 0.6 * torch.randn(d, d, generator=torch.Generator().manual_seed(5))
    img = F.normalize(latent @ distort + noise * 0.1 * torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(latent + 0.1 * torch.randn(n, d, generator=g), dim=-1)
    return PairFeatures(img, None, text, np.arange(n))


def test_native_baseline_is_the_plain_cosine():
    feats = aligned_pairs(32, 0)
    space = JointSpace(None, 10, native=True)
    sim = space.similarity(space.image_views(feats.image_features, None), space.text_views(feats.text))
    torch.testing.assert_close(sim, feats.image_features @ feats.text.T)
    with pytest.raises(ValueError, match="one baseline"):
        JointSpace(torch.randn(3, 16), 10, native=True)


def test_identity_init_reproduces_the_native_cosine_exactly():
    feats = aligned_pairs(32, 1)
    model = AlignmentModel(AlignmentConfig(image_dim=16, text_dim=16, bridge_dim=16, joint_dim=16,
                                           identity_init=True)).eval()
    space = JointSpace(None, 10, model=model, native=True)
    vi, vt = space.image_views(feats.image_features, None), space.text_views(feats.text)
    torch.testing.assert_close(vi["joint"] @ vt["joint"].T, feats.image_features @ feats.text.T, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="joint_dim == text_dim"):
        AlignmentModel(AlignmentConfig(image_dim=16, text_dim=16, joint_dim=8, identity_init=True))


def test_fit_space_native_starts_at_native_and_never_serves_below_it(tmp_path):
    train, val, test, guard = (aligned_pairs(n, s) for n, s in ((512, 2), (128, 3), (256, 4), (48, 6)))
    cfg = TrainConfig(epochs=6, batch_size=64, lr=3e-3)
    fitted = fit_space(SpaceData(fit=train, early_stop=val, heldout=[("val", val)], guard=("photos", guard)),
                       config=cfg, joint_dim=256, native=True)
    space = fitted.space
    assert space.native and space.model.config.identity_init and space.model.config.joint_dim == 16
    # epoch 0 is the native alignment (identity projections): the history starts at the native score
    native = JointSpace(None, 10, native=True)
    nvi, nvt = native.image_views(val.image_features, None), native.text_views(val.text)
    assert fitted.history[0]["val_mean_r1"] == pytest.approx(
        mean_r1(nvi["bridge"] @ nvt["bridge"].T, val.text_to_image), abs=0.02)
    # the guard floor is the native score: the chosen mix keeps the guard's MRR at or above it
    row = next(r for r in fitted.info["mix_table"] if r["mix"] == space.mix)
    floor = next(r for r in fitted.info["mix_table"] if r["mix"] == 1.0)["photos_mrr"]
    assert row["allowed"] and row["photos_mrr"] >= floor - 1e-9
    served = mean_r1(space.similarity(space.image_views(test.image_features, None), space.text_views(test.text)),
                     test.text_to_image)
    nat = mean_r1(native.similarity(native.image_views(test.image_features, None), native.text_views(test.text)),
                  test.text_to_image)
    assert served > nat + 0.05, (served, nat)
    # saved and loaded: same scores, still native
    ModelStore(tmp_path).save("v1", space, meta=VersionMeta(labels=("a",)))
    loaded = ModelStore(tmp_path).load("v1").space
    assert loaded.native and loaded.mix == space.mix
    torch.testing.assert_close(
        loaded.similarity(loaded.image_views(test.image_features, None), loaded.text_views(test.text)),
        space.similarity(space.image_views(test.image_features, None), space.text_views(test.text)))


def test_a_conse_space_meta_has_no_baseline_key_and_old_metas_load():
    space = JointSpace(torch.randn(4, 16), 3)
    assert "baseline" not in space.meta()
    old = {"top_t": 3, "mix": 1.0, "alignment": {"image_dim": 8, "text_dim": 16, "bridge_dim": 16, "joint_dim": 16,
                                                  "hidden_dim": 32, "dropout": 0.1, "temperature_init": 0.07}}
    model = AlignmentModel(AlignmentConfig(**old["alignment"]))
    tensors = {"class_text": torch.randn(4, 16), **{f"model.{k}": v for k, v in model.state_dict().items()}}
    loaded = JointSpace.from_state(tensors, old)
    assert not loaded.native and not loaded.model.config.identity_init and loaded.has_bridge


def test_a_retrain_from_a_native_parent_keeps_the_native_baseline():
    """The retrain's fine-tune (fit_space with parent=) keeps the parent's baseline and adapters."""
    train, val, guard = (aligned_pairs(n, s) for n, s in ((256, 7), (96, 8), (48, 9)))
    cfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3)
    parent = fit_space(SpaceData(fit=train, early_stop=val, heldout=[("val", val)], guard=("photos", guard)),
                       config=cfg, joint_dim=256, native=True).space
    child = fit_space(SpaceData(fit=val, heldout=[("val", val)], guard=("photos", guard)), config=cfg,
                      joint_dim=256, parent=parent).space
    assert child.native and child.class_text is None and child.model.config == parent.model.config
    assert child.bridge_center_img is None  # the native view stays the towers' own cosine
