"""Fine-tune the last blocks of the image tower together with the projections (InfoNCE on pixels).

The step after LiT-style :func:`mmapp.training.train_alignment`: the text tower stays frozen (its
embeddings come in), the image tower's last ``n_blocks`` blocks + head are trained on the fly, and
only those tensors are written out as a "tower delta". No cache, database or UI here.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from mmapp.config import TrainConfig
from mmapp.imageio import load_image
from mmapp.joint import AlignmentModel, JointSpace, conse
from mmapp.losses import info_nce
from mmapp.training import mean_r1

ImageSource = Union[Image.Image, str, os.PathLike]

DELTA_FORMAT = "mmapp-tower-delta/1"


@dataclass
class CaptionedImages:
    """Images (PIL or paths) with caption embeddings; several captions may share an image."""

    images: Sequence[ImageSource]
    text: torch.Tensor  # (N_txt, D_txt) unit norm, from the frozen text tower
    text_to_image: np.ndarray  # (N_txt,) index of each caption's image

    def __post_init__(self) -> None:
        self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)
        if self.text.ndim != 2 or self.text.shape[0] != len(self.text_to_image):
            raise ValueError(f"text must be (N_txt, D) with one row per caption->image index; got "
                             f"{tuple(self.text.shape)} and {len(self.text_to_image)} indices")
        n_img = len(self.images)
        if len(self.text_to_image) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= n_img):
            raise ValueError(f"caption->image index out of range for {n_img} images: "
                             f"min {self.text_to_image.min()}, max {self.text_to_image.max()}")


@dataclass
class TowerFinetuneResult:
    model: AlignmentModel  # on CPU, eval mode, best epoch
    encoder_state_dict: dict[str, torch.Tensor]  # best epoch's unfrozen tower tensors, float32 on CPU
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    n_blocks: int = 0
    seconds: float = 0.0


def finetune_with_unfrozen_blocks(encoder, model: AlignmentModel, images: Sequence[ImageSource],
                                  captions_emb: torch.Tensor, text_to_image: np.ndarray, *,
                                  class_text: torch.Tensor | None, top_t: int, config: TrainConfig,
                                  n_blocks: int | None = None, val: CaptionedImages | None = None,
                                  tower_lr_factor: float = 0.1, progress: bool = False) -> TowerFinetuneResult:
    """Train the last ``n_blocks`` tower blocks (+ head) and a copy of ``model`` with symmetric InfoNCE.

    The tower learns at ``config.lr * tower_lr_factor``, the projections at ``config.lr``. The tower
    stays in eval mode throughout: BatchNorm statistics are not updated (small fine-tuning batches
    would make them noisy, and the frozen blocks must not change) and drop-connect is off; the
    unfrozen blocks' affine BatchNorm weights are trained. With ``class_text`` the ConSE bridge is
    recomputed from the live class probabilities every step. Model selection: mean R@1 on ``val``
    in the uncentered joint space (``mix=0``) after each epoch; without ``val`` the last epoch wins.

    ``encoder`` is changed in place: on return it holds the best epoch's weights, frozen and in eval
    mode (on error, its original weights). Its ``identity`` still names the base weights: features
    cached under it are stale for the fine-tuned tower.
    """
    n_blocks = config.unfreeze_last_n if n_blocks is None else n_blocks  # the config's knob by default
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}; to train with frozen towers use "
                         "mmapp.training.train_alignment on cached features")
    if not 0 < tower_lr_factor <= 1:
        raise ValueError(f"tower_lr_factor must be in (0, 1], got {tower_lr_factor}")
    train = CaptionedImages(images, captions_emb, text_to_image)
    if len(train.text_to_image) < 2:
        raise ValueError(f"InfoNCE needs at least 2 captions, got {len(train.text_to_image)}")
    if model.config.image_dim != encoder.dim:
        raise ValueError(f"model expects {model.config.image_dim}-d image features, {encoder.name} gives {encoder.dim}")
    if model.bridge_proj is not None and class_text is None:
        raise ValueError("this alignment model takes a ConSE bridge input; got class_text=None")

    start = time.monotonic()
    torch.manual_seed(config.seed)  # same data + config -> same weights (dropout, permutation)
    placement = encoder.placement
    device = placement.device
    # Master weights of the trained blocks stay float32; on CUDA the tower runs under autocast in
    # the placement dtype, on CPU plainly in float32.
    autocast = (torch.autocast(device.type, dtype=placement.dtype) if device.type == "cuda"
                else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and placement.dtype == torch.float16)

    modules = _unfrozen_modules(encoder, n_blocks)
    initial_tower = _tower_state(encoder, modules)
    train_pixels = _preprocess_all(encoder, train.images)  # (N_img, 3, S, S) float32 on CPU
    val_pixels = _preprocess_all(encoder, val.images) if val is not None else None
    model = copy.deepcopy(model).to(device)
    class_text_dev = class_text.to(device) if class_text is not None else None
    text = train.text.to(device)
    t2i = torch.as_tensor(train.text_to_image)

    def tower_forward(pixels: torch.Tensor):
        with autocast:
            return encoder.forward_pixels(pixels)

    def val_score() -> float:
        if val is None:
            return float("nan")
        model.eval()
        feats, probs = [], []
        with torch.inference_mode():
            for s in range(0, len(val_pixels), encoder.batch_size):
                out = tower_forward(val_pixels[s:s + encoder.batch_size])
                feats.append(out.features)
                probs.append(out.class_probs)
            space = JointSpace(class_text_dev, top_t, model, mix=0.0)
            views_i = space.image_views(torch.cat(feats), torch.cat(probs) if class_text is not None else None)
            views_t = space.text_views(val.text.to(device))
            return mean_r1(space.similarity(views_i, views_t, mix=0.0).cpu(), val.text_to_image)

    try:
        for m in modules.values():
            m.float()  # in place: parameter objects (and so the optimizer's references) are kept
        tower_params = encoder.unfreeze_last(n_blocks)
        encoder.model.eval()
        head_params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": head_params, "lr": config.lr},
                                 {"params": tower_params, "lr": config.lr * tower_lr_factor}],
                                weight_decay=config.weight_decay)
        n = len(train.text_to_image)
        steps = max(1, math.ceil(n / config.batch_size)) * config.epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[config.lr, config.lr * tower_lr_factor],
                                                    total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(config.seed)

        best_score = val_score()
        best_model, best_tower, best_epoch = copy.deepcopy(model.state_dict()), initial_tower, 0
        history = [{"epoch": 0, "val_mean_r1": best_score}]
        for epoch in tqdm(range(1, config.epochs + 1), desc="finetune-tower", disable=not progress):
            model.train()
            perm = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for s in range(0, n, config.batch_size):
                idx = perm[s:s + config.batch_size]
                if len(idx) < 2:
                    continue
                img_idx = t2i[idx]
                uniq, inverse = img_idx.unique(return_inverse=True)  # each image through the tower once
                out = tower_forward(train_pixels[uniq])
                feats = out.features[inverse.to(device)]  # (B, D_img)
                bridge = (conse(out.class_probs, class_text_dev, top_t)[inverse.to(device)]
                          if class_text is not None else None)  # (B, D_txt)
                z_img = model.encode_image(feats, bridge)  # (B, J)
                z_txt = model.encode_text(text[idx.to(device)])  # (B, J)
                loss = info_nce(z_img, z_txt, model.logit_scale(), group_ids=img_idx.to(device))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                model.logit_scale.clamp_()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            score = val_score()
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_mean_r1": score,
                            "temperature": model.logit_scale.temperature})
            if val is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_model, best_tower = copy.deepcopy(model.state_dict()), _tower_state(encoder, modules)
        _load_tower_state(encoder, best_tower)
    except BaseException:
        _load_tower_state(encoder, initial_tower)
        raise
    finally:
        for m in modules.values():
            m.to(placement.dtype)
        encoder.freeze()
    model.load_state_dict(best_model)
    model.cpu().eval()
    return TowerFinetuneResult(model, best_tower, history, best_epoch, n_blocks, time.monotonic() - start)


def save_tower_delta(encoder, n_blocks: int, path: str | os.PathLike, *,
                     state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the last ``n_blocks`` blocks' (+ head's) tensors, float32, to ``path``; returns their digest.

    ``state`` (e.g. ``TowerFinetuneResult.encoder_state_dict``) saves the float32 master weights
    instead of the encoder's current ones, which on CUDA are rounded to bf16/fp16. The file records
    the base weights' identity, so it is only loaded onto the tower it came from.
    """
    from safetensors.torch import save_file

    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    current = _tower_state(encoder, _unfrozen_modules(encoder, n_blocks))
    if state is not None and set(state) != set(current):
        raise ValueError(f"state does not hold the last {n_blocks} block(s) of {encoder.name}: "
                         f"missing {sorted(set(current) - set(state))[:3]}, extra {sorted(set(state) - set(current))[:3]}")
    tensors = current if state is None else {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": DELTA_FORMAT, "base": encoder.identity,
                                            "n_blocks": str(n_blocks)})
    return tower_delta_digest(tensors)


def load_tower_delta(encoder, path: str | os.PathLike) -> str:
    """Copy a delta written by :func:`save_tower_delta` into ``encoder`` (in place); returns its digest."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path} is not a tower delta (format {meta.get('format')!r}, expected {DELTA_FORMAT!r})")
    if meta.get("base") != encoder.identity:
        raise ValueError(f"{path} was fine-tuned from {meta.get('base')!r}, but this tower is {encoder.identity!r}")
    tensors = load_file(str(path))
    target = encoder.model.state_dict()
    for key, value in tensors.items():
        if key not in target:
            raise ValueError(f"{path}: tensor {key!r} is not in {encoder.name}")
        if target[key].shape != value.shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, "
                             f"{encoder.name} has {tuple(target[key].shape)}")
    _load_tower_state(encoder, tensors)
    encoder.freeze()
    return tower_delta_digest(tensors)


def tower_delta_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and values; the file's own bytes are not reproducible
    (safetensors writes its metadata map in no fixed order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unfrozen_modules(encoder, n_blocks: int) -> dict[str, nn.Module]:
    """Tower modules owning the parameters ``unfreeze_last(n_blocks)`` picks, by state-dict prefix.

    Asks the encoder which parameters it would unfreeze and leaves every ``requires_grad`` as found.
    """
    flags = [(p, p.requires_grad) for p in encoder.model.parameters()]
    try:
        chosen = {id(p) for p in encoder.unfreeze_last(n_blocks)}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: m for name, m in encoder.model.named_modules()
            if any(id(p) in chosen for p in m.parameters(recurse=False))}


def _tower_state(encoder, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The modules' parameters and buffers as float32 CPU copies, keyed as in the tower's state dict."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True).contiguous()
            for k, v in encoder.model.state_dict().items() if k.rpartition(".")[0] in modules}


@torch.no_grad()
def _load_tower_state(encoder, tensors: dict[str, torch.Tensor]) -> None:
    target = encoder.model.state_dict()  # shares storage with the live tower
    for key, value in tensors.items():
        target[key].copy_(value)
    encoder.weights_changed()


def _preprocess_all(encoder, images: Sequence[ImageSource]) -> torch.Tensor:
    """(N, 3, S, S) float32 pixels on CPU, decoded and preprocessed once for all epochs."""
    chunks = []
    for s in range(0, len(images), encoder.batch_size):
        batch = [im if isinstance(im, Image.Image) else load_image(im).image
                 for im in images[s:s + encoder.batch_size]]
        chunks.append(encoder.preprocess(batch))
    return torch.cat(chunks)
