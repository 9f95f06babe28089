"""Fine-tune a candidate from the current model on cached features: projections and fusion head.

Towers stay frozen (features come from the cache). The projections start from the current
version's and see users' pairs mixed with a replay sample of the bootstrap corpus, user pairs
repeated so that each batch is balanced between the two sources; the fusion head sees users'
label corrections mixed with the bootstrap memes, weighted to balance sources and labels.
Seeding is the caller's job (once, at the entry point). No database here.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mmapp.config import TrainConfig
from mmapp.joint import JointSpace
from mmapp.training import (AlignmentResult, PairFeatures, choose_local_mix, choose_mix, train_alignment,
                            train_fusion_head, with_centers)


@dataclass(frozen=True)
class FineTuneSettings:
    # Measured on the flywheel simulation (benchmarks/flywheel_sim.py): 8 epochs at 0.3x lr barely
    # moved the projections, and the re-chosen score mix then often fell back to the bridge.
    epochs: int = 20  # alignment epochs from the current projections
    lr_scale: float = 1.0  # fine-tune learning rate = train.lr * lr_scale (one-cycle schedule)
    fusion_epochs: int = 15
    user_share_of_batch: float = 0.5  # expected share of users' items in a batch (rest: replay)
    max_repeat: int = 8  # users' pairs are repeated at most this often to reach that share
    # Local mix (mmapp.joint.LocalMix): the taught images it remembers, newest kept. 0 = global mix only.
    local_reference_max: int = 4096


@dataclass
class LabelledMemes:
    image: torch.Tensor  # (N, D_img)
    text: torch.Tensor  # (N, D_txt)
    labels: torch.Tensor  # (N,)
    source: np.ndarray  # (N,) 'replay' | 'user'

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(*parts: "LabelledMemes | None") -> "LabelledMemes | None":
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return None
        return LabelledMemes(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]),
                             torch.cat([p.labels for p in parts]), np.concatenate([p.source for p in parts]))


@dataclass
class TrainingSet:
    replay: PairFeatures  # bootstrap replay sample
    val: PairFeatures  # bootstrap validation split: one half of the score-mix objective
    user_pairs: PairFeatures | None = None  # users' pairs to fit on
    tune_pairs: PairFeatures | None = None  # users' pairs kept for the score mix (other half)
    guard: PairFeatures | None = None  # real photos: the mix may not make them worse than the bridge
    memes: LabelledMemes | None = None  # fit: bootstrap meme train split + users' label corrections
    memes_val: LabelledMemes | None = None  # best-epoch choice: bootstrap meme val + users' tune labels

    @property
    def has_user_pairs(self) -> bool:
        return self.user_pairs is not None and len(self.user_pairs.text_to_image) > 0

    @property
    def has_user_labels(self) -> bool:
        return self.memes is not None and bool((self.memes.source == "user").any())


@dataclass
class CandidateModel:
    space: JointSpace
    fusion_head: torch.nn.Module | None
    info: dict = field(default_factory=dict)


def concat_pairs(*parts: PairFeatures | None) -> PairFeatures:
    parts = [p for p in parts if p is not None]
    offsets = np.cumsum([0] + [p.image_features.shape[0] for p in parts[:-1]])
    probs = [p.class_probs for p in parts]
    return PairFeatures(
        torch.cat([p.image_features for p in parts]),
        None if any(c is None for c in probs) else torch.cat(probs),
        torch.cat([p.text for p in parts]),
        np.concatenate([p.text_to_image + o for p, o in zip(parts, offsets)]))


def repeat_captions(pairs: PairFeatures, times: int) -> PairFeatures:
    """Each caption ``times`` times over, pointing at the same image row (the images are not copied:
    InfoNCE with group ids treats the copies as positives of one image, never as negatives)."""
    if times <= 1:
        return pairs
    return PairFeatures(pairs.image_features, pairs.class_probs, pairs.text.repeat(times, 1),
                        np.tile(pairs.text_to_image, times))


def balance_repeats(n_user: int, n_replay: int, share: float, max_repeat: int) -> int:
    """How often to repeat users' captions so that they make about ``share`` of the training captions."""
    if n_user == 0 or share <= 0:
        return 1
    if share >= 1:
        return max_repeat
    want = share / (1 - share) * n_replay / n_user
    return int(min(max_repeat, max(1, round(want))))


def balanced_weights(labels: torch.Tensor, source: np.ndarray, user_share: float) -> torch.Tensor:
    """(N,) sample weights: each source gets its share of the total weight (users ``user_share``,
    replay the rest), and within a source every label present weighs the same."""
    weights = torch.zeros(len(labels))
    sources = [s for s in ("replay", "user") if (source == s).any()]
    for s in sources:
        share = 1.0 if len(sources) == 1 else (user_share if s == "user" else 1 - user_share)
        mask = torch.as_tensor(source == s)
        present = labels[mask].unique()
        for lab in present:
            sel = mask & (labels == lab)
            weights[sel] = share / len(present) / int(sel.sum())
    return weights * len(labels)  # mean weight 1


def fine_tune(current, data: TrainingSet, *, train_config: TrainConfig,
              settings: FineTuneSettings = FineTuneSettings()) -> CandidateModel:
    """A candidate from ``current`` (an ``mmapp.model_store.ModelVersion``). Parts without new user
    data are copied unchanged: a run with only caption corrections keeps the fusion head as it was."""
    info: dict = {}
    space = current.space
    if data.has_user_pairs:
        space, info["alignment"] = _fine_tune_space(current.space, data, train_config, settings)
    else:
        space = copy.deepcopy(current.space)
        info["alignment"] = {"skipped": "no new pairs"}
    head = current.fusion_head
    if data.has_user_labels and head is not None:
        head, info["fusion"] = _fine_tune_head(current, data, train_config, settings)
    else:
        head = copy.deepcopy(head)
        info["fusion"] = {"skipped": "no new label corrections" if head is not None else "no fusion head"}
    return CandidateModel(space, head, info)


def fit_projections(current: JointSpace, replay: PairFeatures, user_pairs: PairFeatures, train_config: TrainConfig,
                    settings: FineTuneSettings, *, epochs: int, lr_scale: float,
                    joint_dim: int) -> tuple[JointSpace, AlignmentResult, int]:
    """Projections fine-tuned from ``current``'s on replay + users' pairs (users' captions repeated to
    about ``settings.user_share_of_batch`` of the batch), centered on both. Returns (space with the
    global mix still to choose, training result, repeats)."""
    repeats = balance_repeats(len(user_pairs.text_to_image), len(replay.text_to_image),
                              settings.user_share_of_batch, settings.max_repeat)
    config = dataclasses.replace(train_config, lr=train_config.lr * lr_scale, epochs=epochs)
    result = train_alignment(concat_pairs(replay, repeat_captions(user_pairs, repeats)), None,
                             class_text=current.class_text, top_t=current.top_t, config=config,
                             joint_dim=joint_dim, init=current.model)
    space = with_centers(JointSpace(current.class_text, current.top_t, result.model), concat_pairs(replay, user_pairs))
    return space, result, repeats


def _fine_tune_space(current: JointSpace, data: TrainingSet, train_config: TrainConfig,
                     settings: FineTuneSettings) -> tuple[JointSpace, dict]:
    started = time.monotonic()
    n_user, n_replay = len(data.user_pairs.text_to_image), len(data.replay.text_to_image)
    joint_dim = current.model.config.joint_dim if current.model is not None else 256
    space, result, repeats = fit_projections(current, data.replay, data.user_pairs, train_config, settings,
                                             epochs=settings.epochs, lr_scale=settings.lr_scale, joint_dim=joint_dim)
    heldout = [("bootstrap_val", data.val)]
    if data.tune_pairs is not None and data.tune_pairs.image_features.shape[0] >= 2:
        heldout.append(("users_tune", data.tune_pairs))
    guard = ("photos", data.guard) if data.guard is not None else None
    space.mix, table = choose_mix(space, heldout, guard=guard)
    local_info: dict = {"skipped": "disabled (local_reference_max 0)"}
    if settings.local_reference_max > 0:
        # Remember the images users taught (earlier runs' first, then this run's fit images); the
        # tune images stay out so that they can judge the neighbourhood fairly.
        parts = [current.local.reference.float()] if current.local is not None else []
        reference = torch.cat([*parts, data.user_pairs.image_features.float()])[-settings.local_reference_max:]
        space.local, local_table = choose_local_mix(space, reference, heldout, guard=guard)
        local_info = ({**space.local.meta(), "table": local_table} if space.local is not None
                      else {"skipped": "no local mix beat the global one on the held-out objective",
                            "table": local_table})
    return space, {"user_pairs": n_user, "replay_pairs": n_replay, "repeats": repeats,
                   "epochs": settings.epochs, "lr": train_config.lr * settings.lr_scale, "mix": space.mix,
                   "mix_table": table,
                   "local_mix": local_info, "history": result.history,
                   "seconds": round(time.monotonic() - started, 2)}


def _fine_tune_head(current, data: TrainingSet, train_config: TrainConfig,
                    settings: FineTuneSettings) -> tuple[torch.nn.Module, dict]:
    started = time.monotonic()
    memes = data.memes
    weights = balanced_weights(memes.labels, memes.source, settings.user_share_of_batch)
    val = None
    if data.memes_val is not None and len(data.memes_val):
        val = (data.memes_val.image, data.memes_val.text, data.memes_val.labels)
    name = (current.meta.get("fusion") or {}).get("name")
    if not name:
        raise ValueError(f"model version {current.version!r} has a fusion head but no fusion name in its meta")
    config = dataclasses.replace(train_config, lr=train_config.lr * settings.lr_scale)
    result = train_fusion_head(name, memes.image, memes.text, memes.labels, num_labels=len(current.labels),
                               config=config, val=val, epochs=settings.fusion_epochs,
                               init=current.fusion_head, weights=weights)
    return result.head, {"examples": len(memes), "user_examples": int((memes.source == "user").sum()),
                         "epochs": settings.fusion_epochs, "history": result.history,
                         "seconds": round(time.monotonic() - started, 2)}
