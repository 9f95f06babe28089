"""Joint space: ConSE bridge, projections start as the bridge, mix selection, cache, model store round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmapp.cache import EmbeddingCache, text_key
from mmapp.config import TrainConfig
from mmapp.fusion import FusionConfig, create_fusion_head
from mmapp.joint import AlignmentConfig, AlignmentModel, CaptionMemory, JointSpace, LocalMix, conse
from mmapp.model_store import ModelStore, VersionMeta
from mmapp.training import (PairFeatures, choose_local_mix, choose_memory, choose_mix, mean_mrr, mean_r1,
                            train_alignment, with_centers)


def synthetic_pairs(n: int, seed: int, *, n_classes: int = 50, d_img: int = 32, d_txt: int = 16) -> tuple[PairFeatures, torch.Tensor]:
    """Images whose features linearly encode a latent caption vector; class probs from a noisy classifier."""
    g = torch.Generator().manual_seed(seed)
    latent = F.normalize(torch.randn(n, d_txt, generator=g), dim=-1)
    mixing = torch.randn(d_txt, d_img, generator=torch.Generator().manual_seed(99))
    img = latent @ mixing + 0.05 * torch.randn(n, d_img, generator=g)
    class_text = F.normalize(torch.randn(n_classes, d_txt, generator=torch.Generator().manual_seed(7)), dim=-1)
    probs = (latent @ class_text.T * 10).softmax(-1)
    text = F.normalize(latent + 0.1 * torch.randn(n, d_txt, generator=g), dim=-1)
    return PairFeatures(img, probs, text, np.arange(n)), class_text


def test_conse_is_weighted_mean_of_top_t_class_embeddings():
    class_text = F.normalize(torch.randn(5, 4), dim=-1)
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    got = conse(probs, class_text, top_t=2)
    expected = F.normalize((0.5 * class_text[0] + 0.3 * class_text[1]) / 0.8, dim=-1)
    torch.testing.assert_close(got[0], expected)


def test_untrained_projection_reproduces_the_bridge_ranking():
    feats, class_text = synthetic_pairs(64, 0)
    model = AlignmentModel(AlignmentConfig(image_dim=32, text_dim=16, bridge_dim=16, joint_dim=16)).eval()
    space = JointSpace(class_text, top_t=5, model=model)
    vi = space.image_views(feats.image_features, feats.class_probs)
    vt = space.text_views(feats.text)
    # joint_dim == text_dim with an orthogonal shared map: the projected cosines equal the bridge's.
    torch.testing.assert_close(vi["joint"] @ vt["joint"].T, vi["bridge"] @ vt["bridge"].T, atol=1e-5, rtol=1e-5)


def test_training_beats_the_bridge_and_mix_never_hurts_the_guard():
    train, class_text = synthetic_pairs(512, 1)
    val, _ = synthetic_pairs(128, 2)
    cfg = TrainConfig(epochs=8, batch_size=64, lr=3e-3)
    result = train_alignment(train, val, class_text=class_text, top_t=5, config=cfg, joint_dim=16)
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"]
    space = with_centers(JointSpace(class_text, 5, result.model), train)
    vi, vt = space.image_views(val.image_features, val.class_probs), space.text_views(val.text)
    trained = mean_r1(space.similarity(vi, vt, mix=0.0), val.text_to_image)
    bridge = mean_r1(space.similarity(vi, vt, mix=1.0), val.text_to_image)
    assert trained > bridge + 0.1, (trained, bridge)
    guard, _ = synthetic_pairs(40, 3)
    mix, table = choose_mix(space, [("val", val)], guard=("guard", guard))
    chosen = next(r for r in table if r["mix"] == mix)
    assert chosen["allowed"] and chosen["guard_mrr"] >= table[-1]["guard_mrr"] - 1e-9  # mix=1.0 is the bridge


def other_domain_pairs(n: int, seed: int, class_text: torch.Tensor) -> PairFeatures:
    """Like synthetic_pairs but the image tower sees another domain (another feature mixing): the
    class probabilities (the bridge) still work, projections trained on the first domain do not."""
    g = torch.Generator().manual_seed(seed)
    latent = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    img = latent @ torch.randn(16, 32, generator=torch.Generator().manual_seed(123)) + 0.05 * torch.randn(n, 32, generator=g)
    text = F.normalize(latent + 0.1 * torch.randn(n, 16, generator=g), dim=-1)
    return PairFeatures(img, (latent @ class_text.T * 10).softmax(-1), text, np.arange(n))


def test_local_mix_leans_on_the_projections_only_near_the_taught_images():
    feats, class_text = synthetic_pairs(8, 0)
    model = AlignmentModel(AlignmentConfig(image_dim=32, text_dim=16, bridge_dim=16, joint_dim=16)).eval()
    with torch.no_grad():
        model.image_mlp[-1].weight.normal_()  # projections that differ from the bridge
    space = with_centers(JointSpace(class_text, 5, model, mix=0.8), feats)
    space.local = LocalMix(F.normalize(feats.image_features[:4], dim=-1), near_mix=0.1, lo=0.9, hi=0.95, k=1)
    far = -feats.image_features[4:]  # cosine -1 to their own originals: outside the neighbourhood
    images = torch.cat([feats.image_features[:4], far])
    probs = torch.cat([feats.class_probs[:4], feats.class_probs[4:]])
    vi, vt = space.image_views(images, probs), space.text_views(feats.text)
    torch.testing.assert_close(vi["local_weight"][:4], torch.ones(4))
    served = space.similarity(vi, vt)
    torch.testing.assert_close(served[:4], space.similarity(vi, vt, mix=0.1)[:4])  # taught: near mix
    torch.testing.assert_close(served[4:], space.similarity(vi, vt, mix=0.8)[4:])  # elsewhere: global mix
    with pytest.raises(ValueError, match="bad local mix"):
        LocalMix(feats.image_features, near_mix=0.2, lo=0.5, hi=0.5)


def test_choose_local_mix_helps_the_taught_domain_and_spares_the_guard():
    train, class_text = synthetic_pairs(512, 1)
    val, _ = synthetic_pairs(128, 2)
    result = train_alignment(train, val, class_text=class_text, top_t=5,
                             config=TrainConfig(epochs=8, batch_size=64, lr=3e-3), joint_dim=16)
    space = with_centers(JointSpace(class_text, 5, result.model), train)
    guard = other_domain_pairs(40, 3, class_text)
    space.mix, _ = choose_mix(space, [("val", val)], guard=("guard", guard))
    assert space.mix >= 0.5  # the guard holds the global mix near the bridge
    local, table = choose_local_mix(space, train.image_features, [("val", val)], guard=("guard", guard))
    assert local is not None and local.near_mix < space.mix
    # Where the neighbourhood leaves the guard images out, the guard sees the global mix it accepted.
    assert all(r["allowed"] for r in table[1:] if r["lo"] >= 0.8)
    vi, vt = space.image_views(val.image_features, val.class_probs), space.text_views(val.text)
    before = mean_r1(space.similarity(vi, vt), val.text_to_image)
    gi, gt = space.image_views(guard.image_features, guard.class_probs), space.text_views(guard.text)
    guard_floor = mean_mrr(space.similarity(gi, gt, mix=1.0), guard.text_to_image)
    space.local = local
    vi, gi = space.image_views(val.image_features, val.class_probs), space.image_views(guard.image_features, guard.class_probs)
    assert mean_r1(space.similarity(vi, vt), val.text_to_image) > before
    assert mean_mrr(space.similarity(gi, gt), guard.text_to_image) >= guard_floor - 1e-9
    # The guard's floor is the pure bridge, whatever the global mix.
    space.local, space.mix = None, 0.3
    _, table = choose_local_mix(space, train.image_features, [("val", val)], guard=("guard", guard))
    assert table[0]["guard_floor"] == pytest.approx(guard_floor)
    # Taught images unlike anything held out: no local mix is worth having.
    space.local = None
    none, _ = choose_local_mix(space, guard.image_features, [("val", val)], guard=("guard", guard))
    assert none is None


def test_caption_memory_helps_near_the_taught_pictures_and_leaves_the_guard_alone():
    train, class_text = synthetic_pairs(512, 1)
    val, _ = synthetic_pairs(128, 2)
    space = with_centers(JointSpace(class_text, 5), train)  # the bridge alone: the memory must add what it lacks
    guard = other_domain_pairs(40, 3, class_text)
    # photos look unlike the taught pictures: shift them along a direction the taught features lack
    mixing = torch.randn(16, 32, generator=torch.Generator().manual_seed(99))  # as synthetic_pairs
    away = torch.linalg.svd(mixing, full_matrices=True).Vh[-1]  # (32,) orthogonal to every taught feature
    guard = PairFeatures(guard.image_features + 3 * guard.image_features.norm(dim=1).mean() * away,
                         guard.class_probs, guard.text, guard.text_to_image)
    memory, table = choose_memory(space, train.image_features, train.text, [("val", val)], guard=("guard", guard))
    assert memory is not None and memory.weight > 0
    vi, vt = space.image_views(val.image_features, val.class_probs), space.text_views(val.text)
    gi, gt = space.image_views(guard.image_features, guard.class_probs), space.text_views(guard.text)
    before_val = mean_r1(space.similarity(vi, vt), val.text_to_image)
    before_guard = mean_mrr(space.similarity(gi, gt), guard.text_to_image)
    space.memory = memory
    vi, vt = space.image_views(val.image_features, val.class_probs), space.text_views(val.text)
    gi, gt = space.image_views(guard.image_features, guard.class_probs), space.text_views(guard.text)
    assert mean_r1(space.similarity(vi, vt), val.text_to_image) > before_val + 0.1
    assert mean_mrr(space.similarity(gi, gt), guard.text_to_image) >= before_guard - 1e-9
    # an explicit mix is that mix alone: no memory
    torch.testing.assert_close(space.similarity(vi, vt, mix=1.0), vi["bridge"] @ vt["bridge"].T)
    # a memory of pictures and captions that tell nothing (random) is worth nothing
    space.memory = None
    g = torch.Generator().manual_seed(5)
    none, _ = choose_memory(space, torch.randn(200, 32, generator=g), torch.randn(200, 16, generator=g),
                            [("val", val)], guard=("guard", guard), min_gain=0.02)  # 154 settings on 128 pairs: noise
    assert none is None
    with pytest.raises(ValueError, match="one row per caption"):
        CaptionMemory(train.image_features, train.text[:3], weight=0.1, lo=0.5, hi=0.6)


def test_mean_mrr_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 9, generator=g)
    t2i = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
    rr_t = [1 / (1 + sum(float(sim[i, j]) > float(sim[t2i[j], j]) for i in range(6))) for j in range(9)]
    rr_i = []
    for i in range(6):
        mine = [j for j in range(9) if t2i[j] == i]
        best = max(float(sim[i, j]) for j in mine)
        rr_i.append(1 / (1 + sum(float(sim[i, j]) >= best for j in range(9) if j not in mine)))
    assert mean_mrr(sim, t2i) == pytest.approx((np.mean(rr_t) + np.mean(rr_i)) / 2)


def test_cache_roundtrip_atomic_and_corrupt_entries_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = text_key("hello")
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return [{"embedding": np.full(3, i, np.float32)} for i in idx]

    rows, n = cache.get_or_compute("enc@abc", [key, key, text_key("x")], compute)
    assert n == 2 and calls == [[0, 2]] and len(rows) == 3
    rows, n = cache.get_or_compute("enc@abc", [key], compute)
    assert n == 0 and rows[0]["embedding"].tolist() == [0, 0, 0]
    path = next(tmp_path.rglob(f"{key}.npz"))
    path.write_bytes(path.read_bytes()[:10])  # a torn entry
    rows, n = cache.get_or_compute("enc@abc", [key], compute)
    assert n == 1
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(ValueError, match="hex digest"):
        cache.get("enc", "../../etc/passwd")


def test_model_store_roundtrip_and_atomic_pointer(tmp_path):
    feats, class_text = synthetic_pairs(32, 0)
    model = AlignmentModel(AlignmentConfig(image_dim=32, text_dim=16, bridge_dim=16, joint_dim=8)).eval()
    space = with_centers(JointSpace(class_text, 5, model, mix=0.3), feats)
    space.local = LocalMix(F.normalize(feats.image_features[:10], dim=-1), near_mix=0.05, lo=0.5, hi=0.6)
    space.memory = CaptionMemory(feats.image_features[:12], feats.text[:12], weight=0.3, lo=0.4, hi=0.5, k=3)
    fcfg = FusionConfig(image_dim=32, text_dim=16, num_labels=3)
    head = create_fusion_head("concat", fcfg).eval()
    store = ModelStore(tmp_path)
    store.save("v1", space, meta=VersionMeta(labels=("a", "b", "c")), fusion_head=head, fusion_config=fcfg,
               fusion_name="concat")
    with pytest.raises(FileExistsError):
        store.save("v1", space, meta=VersionMeta())
    with pytest.raises(ValueError, match="invalid model version"):
        store.path("../evil")
    loaded = store.load("v1")
    vi = loaded.space.image_views(feats.image_features, feats.class_probs)
    vt = loaded.space.text_views(feats.text)
    vi0, vt0 = space.image_views(feats.image_features, feats.class_probs), space.text_views(feats.text)
    torch.testing.assert_close(loaded.space.similarity(vi, vt), space.similarity(vi0, vt0), atol=1e-3, rtol=0)
    assert loaded.space.local.meta() == space.local.meta()
    assert loaded.space.memory.meta() == space.memory.meta() and loaded.space.memory.images.shape == (12, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.fusion_head(feats.image_features, feats.text).logits,
                                   head(feats.image_features, feats.text).logits)
    assert loaded.labels == ("a", "b", "c") and store.current() is None
    store.set_current("v1")
    assert store.current() == "v1"
    with pytest.raises(FileNotFoundError):
        store.set_current("nope")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
