"""The one training recipe: every model this project trains is fitted here, on cached tower features.

* :func:`fit_space` — projections with InfoNCE (from scratch or from a parent version), hubness
  centers, the bridge/projection score mix chosen on held-out data under the real-photo guard,
  the optional local mix near users' taught images, and the caption temperature.
* :func:`fit_meme_head` — a fusion head with cross-entropy and modality dropout.
The bootstrap build (:mod:`mmapp.pipeline`), ``python -m mmapp train-alignment`` and the retrain
job (``retrain/train.py``) all call these two; only what data they pass differs.
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
from mmapp.joint import AlignmentConfig, AlignmentModel, CaptionMemory, JointSpace, LocalMix, ramp
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


@dataclass
class MemeExamples:
    """Labelled memes as tower features: the bootstrap (synthetic) set and users' label corrections alike."""

    image: torch.Tensor  # (N, D_img)
    text: torch.Tensor  # (N, D_txt)
    labels: torch.Tensor  # (N,) index into the model's labels
    split: np.ndarray  # (N,) 'train' | 'val' | 'test'
    source: np.ndarray  # (N,) 'bootstrap' | 'user'

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, mask: np.ndarray) -> "MemeExamples":
        m = torch.as_tensor(mask)
        return MemeExamples(self.image[m], self.text[m], self.labels[m], self.split[mask], self.source[mask])

    def split_of(self, name: str) -> "MemeExamples | None":
        """The examples of one split, or None when it has none."""
        mask = self.split == name
        return self.where(mask) if mask.any() else None

    @staticmethod
    def concat(*parts: "MemeExamples | None") -> "MemeExamples | None":
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return None
        return MemeExamples(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]),
                            torch.cat([p.labels for p in parts]), np.concatenate([p.split for p in parts]),
                            np.concatenate([p.source for p in parts]))


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


def blend_with_replay(replay: PairFeatures, user_pairs: PairFeatures, *, share: float,
                      max_repeat: int) -> tuple[PairFeatures, PairFeatures, int]:
    """(fit pairs, center pairs, repeats): users' captions repeated to about ``share`` of the batch
    after the replay sample; the centers see every image once."""
    repeats = balance_repeats(len(user_pairs.text_to_image), len(replay.text_to_image), share, max_repeat)
    return (concat_pairs(replay, repeat_captions(user_pairs, repeats)), concat_pairs(replay, user_pairs), repeats)


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
    b = space.bridge(train.class_probs, train.image_features)
    if b is not None and not space.native:  # the native baseline stays uncentered: mix 1 is the towers' own score
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
                    progress: bool = False, native: bool = False) -> AlignmentResult:
    """Train the projections with symmetric InfoNCE; keep the epoch with the best validation R@1.

    ``native`` (pre-aligned towers): the image embedding is the baseline input and, from scratch,
    the projections start as the identity (``joint_dim`` is then the towers' width), so epoch 0 is
    the towers' own alignment and a validation set keeps training from falling below it."""
    import time

    start = time.monotonic()
    torch.manual_seed(config.seed)  # same data + config -> same projections
    probe = JointSpace(class_text, top_t, native=native)
    bridge_train = probe.bridge(train.class_probs, train.image_features)
    if init is not None:
        model = copy.deepcopy(init)
    else:
        if native:
            if train.image_features.shape[1] != train.text.shape[1]:
                raise ValueError(f"pre-aligned towers must share one width, got image {train.image_features.shape[1]}"
                                 f" and text {train.text.shape[1]}")
            joint_dim = train.text.shape[1]
        model = AlignmentModel(AlignmentConfig(
            image_dim=train.image_features.shape[1], text_dim=train.text.shape[1],
            bridge_dim=train.text.shape[1] if bridge_train is not None else 0, joint_dim=joint_dim,
            temperature_init=config.temperature_init, **({"identity_init": True} if native else {})))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    epochs = config.epochs
    n = len(train.text_to_image)
    steps = max(1, math.ceil(n / config.batch_size)) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(config.seed)
    t2i = torch.as_tensor(train.text_to_image)

    def val_score() -> float:
        if val is None:
            return float("nan")
        space = with_centers(JointSpace(class_text, top_t, model, mix=0.0, native=native), train)
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


def fit_projections(fit: PairFeatures, *, class_text: torch.Tensor | None, top_t: int, config: TrainConfig,
                    joint_dim: int, centers: PairFeatures | None = None, early_stop: PairFeatures | None = None,
                    parent: JointSpace | None = None, progress: bool = False,
                    native: bool = False) -> tuple[JointSpace, AlignmentResult]:
    """Projections trained with InfoNCE on ``fit`` (from ``parent``'s when given), centered on
    ``centers`` (default ``fit``). The score mix is still to choose (``space.mix`` is 1.0).
    ``native``: pre-aligned towers, the baseline is their own cosine (see :func:`train_alignment`)."""
    if parent is not None:
        class_text, top_t, native = parent.class_text, parent.top_t, parent.native
    result = train_alignment(fit, early_stop, class_text=class_text, top_t=top_t, config=config,
                             joint_dim=joint_dim, init=parent.model if parent is not None else None,
                             progress=progress, native=native)
    space = with_centers(JointSpace(class_text, top_t, result.model, native=native),
                         centers if centers is not None else fit)
    return space, result


@dataclass
class SpaceData:
    """What :func:`fit_space` learns from and is judged on."""

    fit: PairFeatures  # pairs the projections learn from
    heldout: Sequence[tuple[str, PairFeatures]]  # (name, pairs) the score mix is chosen on
    guard: tuple[str, PairFeatures] | None  # real photos: no mix may make them worse than the bridge
    centers: PairFeatures | None = None  # hubness centers (default: fit)
    early_stop: PairFeatures | None = None  # keep the best epoch on these (None: the last epoch)
    taught: torch.Tensor | None = None  # (N, D_img) images users taught: a local mix may lean on them
    # (images (M, D_img), texts (M, D_txt)): taught pictures and their captions, one row per caption, for
    # a caption memory (:func:`choose_memory`); None: no memory
    memory: tuple[torch.Tensor, torch.Tensor] | None = None
    memory_k: int = 5  # taught pictures whose captions the memory averages (nearest first)
    calibration: PairFeatures | None = None  # caption softmax temperature is fitted on these


@dataclass
class FittedSpace:
    space: JointSpace
    caption_temperature: float | None
    info: dict  # best_epoch, seconds, mix, mix_table, local_mix (the tables are long: strip for manifests)
    history: list[dict]


def fit_space(data: SpaceData, *, config: TrainConfig, joint_dim: int, parent: JointSpace | None = None,
              class_text: torch.Tensor | None = None, top_t: int = 10, progress: bool = False,
              native: bool = False) -> FittedSpace:
    """The joint-space recipe: projections, centers, global score mix, local mix, caption temperature.

    From scratch (``parent=None``: ``class_text``/``top_t`` give the ConSE bridge, ``native=True``
    the pre-aligned towers' own cosine as the baseline) or fine-tuned from a parent version's space
    (its baseline is kept). ``config`` carries epochs and learning rate.
    """
    space, result = fit_projections(data.fit, class_text=class_text, top_t=top_t, config=config, joint_dim=joint_dim,
                                    centers=data.centers, early_stop=data.early_stop, parent=parent,
                                    progress=progress, native=native)
    space.mix, table = choose_mix(space, data.heldout, guard=data.guard)
    info: dict = {"best_epoch": result.best_epoch, "seconds": result.seconds, "mix": space.mix, "mix_table": table}
    if data.taught is not None:
        space.local, local_table = choose_local_mix(space, data.taught, data.heldout, guard=data.guard)
        info["local_mix"] = ({**space.local.meta(), "table": local_table} if space.local is not None
                             else {"skipped": "no local mix beat the global one on the held-out objective",
                                   "table": local_table})
    if data.memory is not None:
        space.memory, memory_table = choose_memory(space, *data.memory, data.heldout, guard=data.guard,
                                                   k=data.memory_k)
        info["caption_memory"] = ({**space.memory.meta(), "rows": int(space.memory.images.shape[0]),
                                   "table": memory_table} if space.memory is not None
                                  else {"skipped": "no memory weight beat none on the held-out objective",
                                        "table": memory_table})
    temperature = caption_temperature(space, data.calibration) if data.calibration is not None else None
    return FittedSpace(space, temperature, info, result.history)


def caption_temperature(space: JointSpace, feats: PairFeatures) -> float:
    """Softmax temperature over caption scores minimising the NLL of the true caption (held-out)."""
    vi = space.image_views(feats.image_features, feats.class_probs)
    vt = space.text_views(feats.text)
    sim = space.similarity(vi, vt)  # (N_img, N_txt)
    first_caption = {}
    for j, i in enumerate(feats.text_to_image):
        first_caption.setdefault(int(i), j)
    rows = torch.tensor(list(first_caption))
    cols = torch.tensor(list(first_caption.values()))
    best_t, best_nll = 0.05, float("inf")
    for t in np.geomspace(0.005, 0.5, 40):
        nll = float(-(torch.log_softmax(sim[rows] / t, dim=1)[torch.arange(len(rows)), cols]).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


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
    rows = []
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
    table = [{"baseline_objective": baseline, "guard_floor": guard_floor}, *rows]
    r = _best_row(rows, above=baseline + 1e-9, key=lambda row: (row["near_mix"], row["lo"]))
    if r is None:
        return None, table
    return LocalMix(probe.reference, near_mix=r["near_mix"], lo=r["lo"], hi=r["hi"], k=k), table


def _best_row(rows: Sequence[dict], *, above: float, key) -> dict | None:
    """The allowed grid row with the highest objective over ``above``; ties (to 6 decimals) go to the
    highest ``key(row)``. None when no allowed row clears ``above``."""
    eligible = [row for row in rows if row["allowed"] and row["objective"] > above]
    return max(eligible, key=lambda row: (round(row["objective"], 6), *key(row)), default=None)


MEMORY_WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
MEMORY_THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(14))  # tower cosine where nearness starts


def choose_memory(space: JointSpace, images: torch.Tensor, texts: torch.Tensor,
                  heldout: Sequence[tuple[str, PairFeatures]], *, guard: tuple[str, PairFeatures] | None = None,
                  k: int = 5, weights: Sequence[float] = MEMORY_WEIGHTS, thresholds: Sequence[float] = MEMORY_THRESHOLDS,
                  width: float = 0.1, min_gain: float = 0.005) -> tuple[CaptionMemory | None, list[dict]]:
    """A caption memory of ``images``/``texts`` (taught pictures, their captions), or None when no
    weight beats none.

    Each (weight, nearness threshold) must raise the mean reciprocal rank over ``heldout`` by ``min_gain``
    (``heldout`` must not contain the memory's own pictures: users' tune pairs, the bootstrap validation split)
    and must leave every guard image untouched (nearness 0: the memory acts only near what users
    taught, never on real photos; a guard MRR that merely does not fall let a neighbourhood reach
    the photos and move other photos in the simulation). Ties go to the smaller weight, then the
    higher threshold (a narrower neighbourhood).
    """
    if images.shape[0] == 0:
        return None, []
    probe = CaptionMemory(images, texts, weight=0.0, lo=0.0, hi=1.0, k=k)
    sets = [*heldout, *([guard] if guard else [])]
    parts = {}
    for name, feats in sets:
        vi, vt = space.image_views(feats.image_features, feats.class_probs), space.text_views(feats.text)
        memory_view = probe.image_view(feats.image_features)
        raw = CaptionMemory.raw_bonus(memory_view, probe.text_view(feats.text))
        parts[name] = (space.similarity(vi, vt), raw, memory_view["support"], feats.text_to_image)

    def score(name: str, weight: float, lo: float) -> float:
        base, mem, support, t2i = parts[name]
        return mean_mrr(base + weight * ramp(support, lo, lo + width)[:, None] * mem, t2i)

    def touched(name: str, lo: float) -> int:
        return int((parts[name][2] > lo).sum())  # images the memory would change at all

    baseline = float(np.mean([score(name, 0.0, 0.0) for name, _ in heldout]))
    guard_floor = score(guard[0], 0.0, 0.0) if guard else None
    rows = []
    for weight in weights:
        for lo in thresholds:
            row = {"weight": weight, "lo": lo, "hi": round(lo + width, 4),
                   **{name: score(name, weight, lo) for name, _ in heldout}}
            row["objective"] = float(np.mean([row[name] for name, _ in heldout]))
            if guard:
                row[f"{guard[0]}_mrr"] = score(guard[0], weight, lo)
                row[f"{guard[0]}_touched"] = touched(guard[0], lo)
                row["allowed"] = row[f"{guard[0]}_touched"] == 0
            else:
                row["allowed"] = True
            rows.append(row)
    table = [{"baseline_objective": baseline, "guard_floor": guard_floor}, *rows]
    r = _best_row(rows, above=baseline + min_gain, key=lambda row: (-row["weight"], row["lo"]))
    if r is None:
        return None, table
    return CaptionMemory(images, texts, weight=r["weight"], lo=r["lo"], hi=r["hi"], k=k), table


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




def fit_meme_head(train: MemeExamples, *, name: str, num_labels: int, config: TrainConfig, epochs: int,
                  val: MemeExamples | None = None, parent: torch.nn.Module | None = None,
                  weights: torch.Tensor | None = None) -> FusionResult:
    """The meme-head recipe: fusion head ``name`` (from ``parent`` when given) on labelled memes;
    the best epoch on ``val`` is kept."""
    return train_fusion_head(name, train.image, train.text, train.labels, num_labels=num_labels, config=config,
                             val=(val.image, val.text, val.labels) if val is not None else None, epochs=epochs,
                             init=parent, weights=weights)


def balanced_weights(labels: torch.Tensor, source: np.ndarray, user_share: float) -> torch.Tensor:
    """(N,) sample weights: each source gets its share of the total weight (users ``user_share``,
    bootstrap the rest), and within a source every label present weighs the same."""
    weights = torch.zeros(len(labels))
    sources = [s for s in ("bootstrap", "user") if (source == s).any()]
    for s in sources:
        share = 1.0 if len(sources) == 1 else (user_share if s == "user" else 1 - user_share)
        mask = torch.as_tensor(source == s)
        present = labels[mask].unique()
        for lab in present:
            sel = mask & (labels == lab)
            weights[sel] = share / len(present) / int(sel.sum())
    return weights * len(labels)  # mean weight 1
