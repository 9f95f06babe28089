"""Training losses as small pure functions (plus the learnable temperature); a trainer combines them.

Nothing here knows a model: inputs are tensors, outputs are scalar losses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def info_nce(image: Tensor, text: Tensor, logit_scale: Tensor, *, group_ids: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (the CLIP loss, Radford et al. 2021, eq. in Fig. 3) over paired embeddings.

    ``image`` and ``text`` are ``(B, D)``; row ``i`` of each is a positive pair. Both are
    L2-normalised here, so callers may pass raw projections. ``logit_scale`` is the multiplier
    ``1 / T`` (what :class:`LogitScale` returns), not its log.

    ``group_ids`` ``(B,)``: rows sharing an id (several captions of one image, duplicate captions)
    are not negatives of each other. Those off-diagonal logits are masked out of the softmax
    denominator (set to ``-inf``); the target stays the diagonal, so each row keeps one positive
    and its same-group siblings simply do not compete with it.

    Returns the mean of the image->text and text->image cross-entropies (a scalar).
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must both be (B, D) with equal shapes, got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    batch = image.shape[0]
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    logits = logit_scale * image @ text.T  # (B, B); [i, j] = image i vs text j
    if group_ids is not None:
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids must be ({batch},), got {tuple(group_ids.shape)}")
        same_group = group_ids[:, None] == group_ids[None, :]  # (B, B), symmetric
        same_group.fill_diagonal_(False)
        logits = logits.masked_fill(same_group, float("-inf"))
    targets = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class LogitScale(nn.Module):
    """Learnable InfoNCE temperature, stored as ``log(1 / T)`` (CLIP's parameterisation).

    ``forward()`` returns the scale ``1 / T``, clamped to ``max_scale`` (100, as in CLIP). The clamp
    has zero gradient above the limit, so also call :meth:`clamp_` after each optimiser step
    (as open_clip does) to keep the stored value from drifting past it.
    """

    def __init__(self, temperature_init: float = 0.07, *, max_scale: float = 100.0) -> None:
        super().__init__()
        if not temperature_init > 0:
            raise ValueError(f"temperature_init must be > 0, got {temperature_init}")
        if 1.0 / temperature_init > max_scale:
            raise ValueError(f"temperature_init {temperature_init} gives scale {1.0 / temperature_init:.1f} "
                             f"above max_scale {max_scale}")
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()  # scalar

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(max=self.max_log_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.forward().detach())


def classification_loss(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0,
                        class_weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``logits`` ``(B, L)`` against integer ``targets`` ``(B,)``.

    ``class_weights`` ``(L,)`` re-weights classes (e.g. inverse frequency for the rare labels).
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (B, L) and targets (B,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if class_weights is not None and class_weights.shape != (logits.shape[1],):
        raise ValueError(f"class_weights must be ({logits.shape[1]},), got {tuple(class_weights.shape)}")
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)
