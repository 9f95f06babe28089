"""The retrain's "train" stage: a candidate fine-tuned from the current version with the one recipe.

What is retrain-specific is the data, not the training: the projections start from the current
version's (``mmapp.training.fit_space`` with ``parent=``) and see users' pairs mixed with a replay
sample of the bootstrap corpus, users' captions repeated so that each batch is balanced between
the two sources; the fusion head (``mmapp.training.fit_meme_head``) sees users' label corrections
mixed with the bootstrap memes, weighted to balance sources and labels. Knobs: ``config.finetune``.
Seeding is the caller's job (once, at the entry point). No database here.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from mmapp.config import Config, TrainConfig
from mmapp.joint import CaptionMemory, JointSpace
from mmapp.model_store import ModelVersion
from mmapp.training import (MemeExamples, PairFeatures, SpaceData, balanced_weights, blend_with_replay,
                            caption_temperature, fit_meme_head, fit_projections, fit_space)


@dataclass
class TrainingSet:
    replay: PairFeatures  # bootstrap replay sample
    val: PairFeatures  # bootstrap validation split: one half of the score-mix objective, and calibration
    guard: PairFeatures  # real photos: the mix may not make them worse than the bridge
    user_pairs: PairFeatures | None = None  # users' pairs to fit on
    tune_pairs: PairFeatures | None = None  # users' pairs kept for the score mix (other half)
    memes: MemeExamples | None = None  # fit: bootstrap meme train split + users' label corrections
    memes_val: MemeExamples | None = None  # best-epoch choice: bootstrap meme val + users' tune labels

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
    caption_temperature: float
    info: dict = field(default_factory=dict)


def fine_tune(current: ModelVersion, data: TrainingSet, config: Config) -> CandidateModel:
    """A candidate from ``current``. Parts without new user data are copied unchanged: a run with only
    caption corrections keeps the fusion head as it was."""
    info: dict = {}
    if data.has_user_pairs:
        space, temperature, info["alignment"] = _fine_tune_space(current, data, config)
    else:
        space = copy.deepcopy(current.space)
        temperature = caption_temperature(space, data.val)
        info["alignment"] = {"skipped": "no new pairs"}
    head = current.fusion_head
    if data.has_user_labels and head is not None:
        head, info["fusion"] = _fine_tune_head(current, data, config)
    else:
        head = copy.deepcopy(head)
        info["fusion"] = {"skipped": "no new label corrections" if head is not None else "no fusion head"}
    return CandidateModel(space, head, temperature, info)


def _scaled(train: TrainConfig, *, epochs: int, lr_scale: float) -> TrainConfig:
    return dataclasses.replace(train, lr=train.lr * lr_scale, epochs=epochs)


def _joint_dim(space: JointSpace, config: Config) -> int:
    return space.model.config.joint_dim if space.model is not None else config.model.joint_dim


def fit_scorer(current: JointSpace, replay: PairFeatures, user_pairs: PairFeatures, config: Config, *,
               epochs: int, lr_scale: float) -> JointSpace:
    """Projections briefly fine-tuned from ``current``'s on replay + users' pairs, served alone
    (``mix`` 0): what the cleaning stage's cross-fitting scores agreement with."""
    fit, centers, _ = blend_with_replay(replay, user_pairs, share=config.finetune.user_share_of_batch,
                                        max_repeat=config.finetune.max_repeat)
    space, _ = fit_projections(fit, centers=centers, class_text=None, top_t=current.top_t,
                               config=_scaled(config.train, epochs=epochs, lr_scale=lr_scale),
                               joint_dim=_joint_dim(current, config), parent=current)
    space.mix = 0.0  # projections only: the bridge part is what the current model already scored
    return space


def _fine_tune_space(current: ModelVersion, data: TrainingSet, config: Config) -> tuple[JointSpace, float, dict]:
    started = time.monotonic()
    ft = config.finetune
    fit, centers, repeats = blend_with_replay(data.replay, data.user_pairs, share=ft.user_share_of_batch,
                                              max_repeat=ft.max_repeat)
    heldout = [("bootstrap_val", data.val)]
    if data.tune_pairs is not None and data.tune_pairs.image_features.shape[0] >= 2:
        heldout.append(("users_tune", data.tune_pairs))
    taught = None
    if ft.local_reference_max > 0:
        # Remember the images users taught (earlier runs' first, then this run's fit images); the
        # tune images stay out so that they can judge the neighbourhood fairly.
        parts = [current.space.local.reference.float()] if current.space.local is not None else []
        taught = torch.cat([*parts, data.user_pairs.image_features.float()])[-ft.local_reference_max:]
    memory = _memory_rows(current.space, data.user_pairs, ft.memory_max) if ft.caption_memory else None
    train_config = _scaled(config.train, epochs=ft.epochs, lr_scale=ft.lr_scale)
    fitted = fit_space(SpaceData(fit=fit, centers=centers, heldout=heldout, guard=("photos", data.guard),
                                 taught=taught, calibration=data.val, memory=memory,
                                 memory_k=ft.memory_k),
                       config=train_config, joint_dim=_joint_dim(current.space, config), parent=current.space)
    if fitted.space.memory is not None and data.tune_pairs is not None:
        # chosen without them (they judged it); served with them: every accepted picture is remembered
        m = fitted.space.memory
        images, texts = _memory_rows(fitted.space, data.tune_pairs, ft.memory_max)
        fitted.space.memory = CaptionMemory(images, texts, weight=m.weight, lo=m.lo, hi=m.hi, k=m.k,
                                            temperature=m.temperature)
    info = {"user_pairs": len(data.user_pairs.text_to_image), "replay_pairs": len(data.replay.text_to_image),
            "repeats": repeats, "epochs": ft.epochs, "lr": train_config.lr, **fitted.info,
            "history": fitted.history, "seconds": round(time.monotonic() - started, 2)}
    info.setdefault("local_mix", {"skipped": "disabled (finetune.local_reference_max 0)"})
    return fitted.space, fitted.caption_temperature, info


def _memory_rows(space: JointSpace, pairs: PairFeatures | None, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``space``'s caption memory rows (earlier runs') then one row per caption of ``pairs``, newest
    ``max_rows`` kept: (images (M, D_img), texts (M, D_txt))."""
    images = [space.memory.images] if space.memory is not None else []
    texts = [space.memory.texts] if space.memory is not None else []
    if pairs is not None and len(pairs.text_to_image):
        images.append(pairs.image_features.float()[torch.as_tensor(pairs.text_to_image)])
        texts.append(pairs.text.float())
    if not images:
        return torch.zeros(0, 1), torch.zeros(0, 1)
    return torch.cat(images)[-max_rows:], torch.cat(texts)[-max_rows:]


def _fine_tune_head(current: ModelVersion, data: TrainingSet, config: Config) -> tuple[torch.nn.Module, dict]:
    started = time.monotonic()
    ft = config.finetune
    memes = data.memes
    name = current.meta.fusion_name
    if not name:
        raise ValueError(f"model version {current.version!r} has a fusion head but no fusion name in its meta")
    result = fit_meme_head(memes, val=data.memes_val if data.memes_val is not None and len(data.memes_val) else None,
                           name=name, num_labels=len(current.labels),
                           config=_scaled(config.train, epochs=config.train.epochs, lr_scale=ft.lr_scale),
                           epochs=ft.fusion_epochs, parent=current.fusion_head,
                           weights=balanced_weights(memes.labels, memes.source, ft.user_share_of_batch))
    return result.head, {"examples": len(memes), "user_examples": int((memes.source == "user").sum()),
                         "epochs": ft.fusion_epochs, "history": result.history,
                         "seconds": round(time.monotonic() - started, 2)}
