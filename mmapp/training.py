"""Training on cached features: InfoNCE for the projections, cross-entropy for fusion heads.

Towers stay frozen here (their features come from the cache). Seeded by the caller.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmapp.config import TrainConfig
from mmapp.fusion import FusionConfig, create_fusion_head
from mmapp.joint import AlignmentConfig, AlignmentModel, JointSpace, LocalMix, conse, ramp
from mmapp.losses import info_nce


@dataclass
class PairFeatures:
    """Cached tower outputs for a set of image–caption pairs (several captions may share an image)."""

    image_features: torch.Tensor  # (N_img, D_img)
    class_probs: torch.Tensor | None  # (N_img, C) or None
    text: torch.Tensor  # (N_txt, D_txt) unit norm
    text_to_image: np.ndarray  # (N_txt,) index of each caption's image

    def __post_init__(self) -> None:
        n_img = self.image_features.shape[0]
        if self.text.shape[0] != len(self.text_to_image):
            raise ValueError(f"{self.text.shape[0]} captions but {len(self.text_to_image)} caption->image indices")
        if len(self.text_to_image) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= n_img):
            raise ValueError(f"caption->image index out of range for {n_img} images")

    def subset_images(self, image_idx: np.ndarray) -> "PairFeatures":
        """Keep these images and all their captions."""
        remap = -np.ones(self.image_features.shape[0], dtype=np.int64)
        remap[image_idx] = np.arange(len(image_idx))
        keep = np.nonzero(remap[self.text_to_image] >= 0)[0]
        return PairFeatures(self.image_features[image_idx],
                            None if self.class_probs is None else self.class_probs[image_idx],
                            self.text[keep], remap[self.text_to_image[keep]])


def mean_r1(similarity: torch.Tensor, text_to_image: np.ndarray) -> float:
    """Mean of image->text and text->image Recall@1 (fast, for model selection; no intervals)."""
    t2i = torch.as_tensor(text_to_image)
    t2i_hit = (similarity.argmax(0) == t2i).float().mean()
    i2t_hit = (t2i[similarity.argmax(1)] == torch.arange(similarity.shape[0])).float().mean()
    return float((t2i_hit + i2t_hit) / 2)


def mean_mrr(similarity: torch.Tensor, text_to_image: np.ndarray) -> float:
    """Mean reciprocal rank over both directions (pessimistic ties); steadier than R@1 on small sets."""
    t2i = torch.as_tensor(text_to_image)
    own = similarity[t2i, torch.arange(len(t2i))]  # (N_txt,) score of each caption's own image
    rank_t = (similarity >= own[None, :]).sum(0)  # (N_txt,) own image counts itself
    correct = torch.zeros_like(similarity, dtype=torch.bool)
    correct[t2i, torch.arange(len(t2i))] = True
    best = similarity.masked_fill(~correct, float("-inf")).max(1).values  # (N_img,)
    has = correct.any(1)
    rank_i = ((similarity >= best[:, None]) & ~correct).sum(1) + 1  # (N_img,)
    return float(((1 / rank_t.float()).mean() + (1 / rank_i[has].float()).mean()) / 2)


def with_centers(space: JointSpace, train: PairFeatures) -> JointSpace:
    """Set the hubness-reduction centers from the training images and captions."""
    b = space.bridge(train.class_probs)
    if b is not None:
        space.bridge_center_img = b.mean(0)
        space.bridge_center_txt = train.text.mean(0)
    if space.model is not None:
        space.model.eval()
        with torch.inference_mode():
            space.joint_center_img = space.model.encode_image(train.image_features, b).mean(0)
            space.joint_center_txt = space.model.encode_text(train.text).mean(0)
    return space


@dataclass
class AlignmentResult:
    model: AlignmentModel
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def train_alignment(train: PairFeatures, val: PairFeatures | None, *, class_text: torch.Tensor | None,
                    top_t: int, config: TrainConfig, joint_dim: int, init: AlignmentModel | None = None,
                    progress: bool = False, epochs: int | None = None) -> AlignmentResult:
    """Train the projections with symmetric InfoNCE; keep the epoch with the best validation R@1."""
    import time

    start = time.monotonic()
    torch.manual_seed(config.seed)  # same data + config -> same projections
    bridge_train = conse(train.class_probs, class_text, top_t) if class_text is not None else None
    if init is not None:
        model = copy.deepcopy(init)
    else:
        model = AlignmentModel(AlignmentConfig(
            image_dim=train.image_features.shape[1], text_dim=train.text.shape[1],
            bridge_dim=train.text.shape[1] if bridge_train is not None else 0, joint_dim=joint_dim,
            temperature_init=config.temperature_init))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    epochs = config.epochs if epochs is None else epochs
    n = len(train.text_to_image)
    steps = max(1, math.ceil(n / config.batch_size)) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(config.seed)
    t2i = torch.as_tensor(train.text_to_image)

    def val_score() -> float:
        if val is None:
            return float("nan")
        space = with_centers(JointSpace(class_text, top_t, model, mix=0.0), train)
        views_i = space.image_views(val.image_features, val.class_probs)
        views_t = space.text_views(val.text)
        return mean_r1(space.similarity(views_i, views_t, mix=0.0), val.text_to_image)

    best_state, best_score, best_epoch = copy.deepcopy(model.state_dict()), val_score(), 0
    history = [{"epoch": 0, "val_mean_r1": best_score}]
    for epoch in tqdm(range(1, epochs + 1), desc="train-alignment", disable=not progress):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start_i in range(0, n, config.batch_size):
            idx = perm[start_i:start_i + config.batch_size]
            if len(idx) < 2:
                continue
            img_idx = t2i[idx]
            z_img = model.encode_image(train.image_features[img_idx],
                                       None if bridge_train is None else bridge_train[img_idx])  # (B, J)
            z_txt = model.encode_text(train.text[idx])  # (B, J)
            loss = info_nce(z_img, z_txt, model.logit_scale(), group_ids=img_idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.logit_scale.clamp_()
            total += float(loss.detach()) * len(idx)
        model.eval()
        score = val_score()
        history.append({"epoch": epoch, "train_loss": total / n, "val_mean_r1": score,
                        "temperature": model.logit_scale.temperature})
        if val is None or score > best_score:
            best_state, best_score, best_epoch = copy.deepcopy(model.state_dict()), score, epoch
    model.load_state_dict(best_state)
    model.eval()
    return AlignmentResult(model, history, best_epoch, time.monotonic() - start)


def choose_mix(space: JointSpace, heldout: Sequence[tuple[str, PairFeatures]], *,
               guard: tuple[str, PairFeatures] | None = None,
               grid: Sequence[float] = tuple(i / 20 for i in range(21))) -> tuple[float, list[dict]]:
    """Pick the bridge/projection score mix that maximises held-out mean R@1.

    With ``guard`` (e.g. hand-captioned real photos), only mixes whose mean reciprocal rank there
    is not below the pure bridge's are allowed (mix=1 is the bridge itself, so a choice always
    exists); MRR rather than R@1 because a guard set of a few dozen photos makes R@1 too coarse.
    Ties go to the larger mix (closer to the bridge, which needs no training data).
    """
    if not space.has_bridge or space.model is None:
        return (0.0 if space.model is not None else 1.0), []
    parts = _score_parts(space, [*heldout, *([guard] if guard else [])])

    def score(mix: float, name: str, metric=mean_r1) -> float:
        bridge, joint, t2i = parts[name]
        return metric(mix * bridge + (1 - mix) * joint, t2i)

    rows = []
    guard_floor = score(1.0, guard[0], mean_mrr) if guard else None
    for mix in grid:
        row = {"mix": mix, **{name: score(mix, name) for name, _ in heldout}}
        row["objective"] = float(np.mean([row[name] for name, _ in heldout]))
        if guard:
            row[f"{guard[0]}_r1"] = score(mix, guard[0])
            row[f"{guard[0]}_mrr"] = score(mix, guard[0], mean_mrr)
            row["allowed"] = row[f"{guard[0]}_mrr"] >= guard_floor - 1e-9
        else:
            row["allowed"] = True
        rows.append(row)
    allowed = [r for r in rows if r["allowed"]]
    best = max(allowed, key=lambda r: (round(r["objective"], 6), r["mix"]))
    return float(best["mix"]), rows


def _score_parts(space: JointSpace, sets: Sequence[tuple[str, PairFeatures]]) -> dict[str, tuple]:
    """name -> (bridge scores, projection scores, caption -> image): every mix of a search is a
    weighted sum of these two matrices, so the towers' projections run once per set, not per mix."""
    out = {}
    for name, feats in sets:
        vi, vt = space.image_views(feats.image_features, feats.class_probs), space.text_views(feats.text)
        out[name] = (vi["bridge"] @ vt["bridge"].T, vi["joint"] @ vt["joint"].T, feats.text_to_image)
    return out


LOCAL_THRESHOLDS = tuple(round(0.45 + 0.05 * i, 2) for i in range(8))  # cosine where the ramp starts
LOCAL_WIDTHS = (0.05, 0.1)


def choose_local_mix(space: JointSpace, reference: torch.Tensor, heldout: Sequence[tuple[str, PairFeatures]], *,
                     guard: tuple[str, PairFeatures] | None = None, k: int = 5,
                     thresholds: Sequence[float] = LOCAL_THRESHOLDS, widths: Sequence[float] = LOCAL_WIDTHS,
                     step: float = 0.05) -> tuple[LocalMix | None, list[dict]]:
    """A per-image mix near ``reference`` (users' taught images), or None when none beats the global mix.

    The global ``space.mix`` was chosen for every image, so the real-photo guard held it near the
    bridge even where users have shown the projections what the pictures mean. Here the mix may go
    lower, but only for images whose tower features are close to the taught ones: each candidate
    (near mix, ramp thresholds) must raise the mean reciprocal rank over ``heldout`` (which should
    include users' pairs NOT in ``reference``; MRR because those are few and R@1 would be too
    coarse) and keep the guard's MRR at or above the pure bridge's, as :func:`choose_mix` does.
    Ties go to the mix closer to the global one, then to the narrower neighbourhood (higher threshold).
    """
    if space.model is None or not space.has_bridge or reference.shape[0] == 0:
        return None, []
    probe = LocalMix(reference, near_mix=0.0, lo=0.0, hi=1.0, k=k)  # only for its support()
    sets = [*heldout, *([guard] if guard else [])]
    parts = _score_parts(space, sets)
    support = {name: probe.support(feats.image_features) for name, feats in sets}

    def scores(name: str, near: float, lo: float, hi: float, metric=mean_r1) -> float:
        bridge, joint, t2i = parts[name]
        mix = LocalMix.per_image_mix(space.mix, near, ramp(support[name], lo, hi))
        return metric(mix * bridge + (1 - mix) * joint, t2i)

    def objective(near: float, lo: float, hi: float) -> float:
        return float(np.mean([scores(name, near, lo, hi, mean_mrr) for name, _ in heldout]))

    baseline = objective(space.mix, 0.0, 1.0)
    guard_floor = mean_mrr(parts[guard[0]][0], parts[guard[0]][2]) if guard else None  # the pure bridge
    rows, best = [], None
    nears = [max(0.0, round(space.mix - step * i, 4)) for i in range(int(space.mix / step + 1e-9) + 1)]  # no -0.0
    for near in nears:
        for lo in thresholds:
            for width in widths:
                hi = round(lo + width, 4)
                row = {"near_mix": near, "lo": lo, "hi": hi, "objective": objective(near, lo, hi)}
                if guard:
                    row[f"{guard[0]}_mrr"] = scores(guard[0], near, lo, hi, mean_mrr)
                    row["allowed"] = row[f"{guard[0]}_mrr"] >= guard_floor - 1e-9
                else:
                    row["allowed"] = True
                rows.append(row)
                if row["allowed"] and row["objective"] > baseline + 1e-9:
                    key = (round(row["objective"], 6), near, lo)
                    if best is None or key > best[0]:
                        best = (key, row)
    table = [{"baseline_objective": baseline, "guard_floor": guard_floor}, *rows]
    if best is None:
        return None, table
    r = best[1]
    return LocalMix(probe.reference, near_mix=r["near_mix"], lo=r["lo"], hi=r["hi"], k=k), table


@dataclass
class FusionResult:
    head: torch.nn.Module
    config: FusionConfig
    history: list[dict] = field(default_factory=list)


def train_fusion_head(name: str, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, *,
                      num_labels: int, config: TrainConfig, val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      epochs: int = 40, init: torch.nn.Module | None = None,
                      weights: torch.Tensor | None = None) -> FusionResult:
    """Train a fusion head on (image features, text features) -> label with modality dropout.

    ``weights`` (N,) are per-sample weights (e.g. to balance sources); best validation accuracy kept.
    """
    fcfg = FusionConfig(image_dim=image.shape[1], text_dim=text.shape[1], num_labels=num_labels,
                        modality_dropout=config.modality_dropout)
    head = copy.deepcopy(init) if init is not None else create_fusion_head(name, fcfg)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(labels)
    weights = torch.ones(n) if weights is None else weights

    def accuracy(split) -> float:
        head.eval()
        with torch.inference_mode():
            return float((head(split[0], split[1]).logits.argmax(-1) == split[2]).float().mean())

    best_state, best_acc, history = copy.deepcopy(head.state_dict()), -1.0, []
    for epoch in range(1, epochs + 1):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, config.batch_size):
            idx = perm[s:s + config.batch_size]
            out = head(image[idx], text[idx])
            loss = (F.cross_entropy(out.logits, labels[idx], reduction="none",
                                    label_smoothing=config.label_smoothing) * weights[idx]).sum() / weights[idx].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(val) if val is not None else float("nan")
        history.append({"epoch": epoch, "val_accuracy": acc})
        if val is None or acc > best_acc:
            best_state, best_acc = copy.deepcopy(head.state_dict()), acc
    head.load_state_dict(best_state)
    head.eval()
    return FusionResult(head, fcfg, history)


