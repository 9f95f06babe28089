"""Fusion heads: (image features, text features) -> meme-label logits, robust to a missing modality.

Heads take already-encoded features (the frozen towers live in ``mmapp.encoders``); build them
by name with :func:`create_fusion_head`. No loss here: heads return logits, ``mmapp.losses`` scores them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FusionConfig:
    image_dim: int
    text_dim: int
    num_labels: int
    hidden_dim: int = 256
    dropout: float = 0.1
    modality_dropout: float = 0.3  # train mode: P(a sample loses one modality); which one is 50/50; never both
    num_layers: int = 2  # MLP layers (late, concat) or transformer layers (cross-attention)
    num_heads: int = 4  # cross-attention only; must divide hidden_dim
    tokens_per_modality: int = 4  # cross-attention only: each modality's vector is split into this many tokens

    def __post_init__(self) -> None:
        for name in ("image_dim", "text_dim", "num_labels", "hidden_dim", "num_layers", "num_heads",
                     "tokens_per_modality"):
            if getattr(self, name) < 1:
                raise ValueError(f"FusionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FusionConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"FusionConfig.modality_dropout must be in [0, 1], got {self.modality_dropout}")


@dataclass
class FusionOutput:
    logits: Tensor  # (B, L)
    fused: Tensor  # (B, H) representation before the classifier
    image_present: Tensor  # (B,) bool, after modality dropout: which samples used their image
    text_present: Tensor  # (B,) bool


def _resolve_presence(image: Tensor | None, text: Tensor | None, image_present: Tensor | None,
                      text_present: Tensor | None, config: FusionConfig) -> tuple[int, Tensor, Tensor]:
    """Validate inputs; return the batch size and (B,) bool presence masks for image and text."""
    if image is None and text is None:
        raise ValueError("fusion head needs at least one modality, got image=None and text=None")
    batch_sizes = {}
    for name, features, dim in (("image", image, config.image_dim), ("text", text, config.text_dim)):
        if features is not None:
            if features.ndim != 2 or features.shape[1] != dim:
                raise ValueError(f"{name} features must be (B, {dim}), got {tuple(features.shape)}")
            batch_sizes[name] = features.shape[0]
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"image and text batch sizes differ: {batch_sizes}")
    batch = next(iter(batch_sizes.values()))
    device = (image if image is not None else text).device

    masks = []
    for name, features, present in (("image", image, image_present), ("text", text, text_present)):
        if present is None:
            present = torch.full((batch,), features is not None, dtype=torch.bool, device=device)
        else:
            if present.shape != (batch,):
                raise ValueError(f"{name}_present must be ({batch},), got {tuple(present.shape)}")
            present = present.to(device=device, dtype=torch.bool)
            if features is None and bool(present.any()):
                raise ValueError(f"{name}=None but {name}_present marks {int(present.sum())} sample(s) present")
        masks.append(present)
    image_mask, text_mask = masks
    neither = (~image_mask & ~text_mask).nonzero().flatten()
    if len(neither):
        raise ValueError(f"samples {neither.tolist()[:10]} have neither image nor text")
    return batch, image_mask, text_mask


def _drop_one_modality(image_present: Tensor, text_present: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Modality dropout: each sample with both modalities loses one of them (50/50) with probability p."""
    both = image_present & text_present
    drop = both & (torch.rand(both.shape, device=both.device) < p)
    drop_image = drop & (torch.rand(both.shape, device=both.device) < 0.5)
    drop_text = drop & ~drop_image
    return image_present & ~drop_image, text_present & ~drop_text


class _ModalityProjection(nn.Module):
    """Projects one modality's features; absent samples get a learned null embedding instead."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout))
        self.null = nn.Parameter(torch.randn(out_dim) * 0.02)

    def forward(self, features: Tensor | None, present: Tensor) -> Tensor:
        if features is None:
            return self.null.expand(present.shape[0], -1)  # (B, out_dim)
        # Zero absent rows first so placeholder values (even NaN) cannot leak into gradients.
        projected = self.proj(features.masked_fill(~present[:, None], 0.0))  # (B, out_dim)
        return torch.where(present[:, None], projected, self.null)


def _mlp(in_dim: int, hidden_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class _FusionHead(nn.Module):
    """Shared input handling: presence masks, and modality dropout in train mode only."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config

    def _presence(self, image: Tensor | None, text: Tensor | None, image_present: Tensor | None,
                  text_present: Tensor | None) -> tuple[Tensor, Tensor]:
        _, image_mask, text_mask = _resolve_presence(image, text, image_present, text_present, self.config)
        if self.training and self.config.modality_dropout > 0:
            image_mask, text_mask = _drop_one_modality(image_mask, text_mask, self.config.modality_dropout)
        return image_mask, text_mask


class LateFusionHead(_FusionHead):
    """Late fusion: one classifier per modality; logits (and representations) averaged over present modalities.

    Needs no null embedding: an absent modality simply does not vote.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        h = config.hidden_dim
        self.image_encoder = nn.Sequential(nn.LayerNorm(config.image_dim),
                                           _mlp(config.image_dim, h, config.num_layers, config.dropout))
        self.text_encoder = nn.Sequential(nn.LayerNorm(config.text_dim),
                                          _mlp(config.text_dim, h, config.num_layers, config.dropout))
        self.image_classifier = nn.Linear(h, config.num_labels)
        self.text_classifier = nn.Linear(h, config.num_labels)

    def forward(self, image: Tensor | None, text: Tensor | None, *, image_present: Tensor | None = None,
                text_present: Tensor | None = None) -> FusionOutput:
        image_mask, text_mask = self._presence(image, text, image_present, text_present)
        logits_sum, fused_sum = 0.0, 0.0
        for features, mask, encoder, classifier in ((image, image_mask, self.image_encoder, self.image_classifier),
                                                    (text, text_mask, self.text_encoder, self.text_classifier)):
            if features is None:
                continue
            hidden = encoder(features.masked_fill(~mask[:, None], 0.0))  # (B, H)
            keep = mask[:, None]
            fused_sum = fused_sum + torch.where(keep, hidden, 0.0)
            logits_sum = logits_sum + torch.where(keep, classifier(hidden), 0.0)  # (B, L)
        count = (image_mask.float() + text_mask.float())[:, None]  # (B, 1), >= 1
        return FusionOutput(logits=logits_sum / count, fused=fused_sum / count,
                            image_present=image_mask, text_present=text_mask)


class ConcatFusionHead(_FusionHead):
    """Intermediate fusion: project each modality to hidden_dim, concatenate, MLP, classify (the default head)."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        h = config.hidden_dim
        self.image_projection = _ModalityProjection(config.image_dim, h, config.dropout)
        self.text_projection = _ModalityProjection(config.text_dim, h, config.dropout)
        self.mlp = _mlp(2 * h, h, config.num_layers, config.dropout)
        self.classifier = nn.Linear(h, config.num_labels)

    def forward(self, image: Tensor | None, text: Tensor | None, *, image_present: Tensor | None = None,
                text_present: Tensor | None = None) -> FusionOutput:
        image_mask, text_mask = self._presence(image, text, image_present, text_present)
        joint = torch.cat([self.image_projection(image, image_mask),
                           self.text_projection(text, text_mask)], dim=-1)  # (B, 2H)
        fused = self.mlp(joint)  # (B, H)
        return FusionOutput(logits=self.classifier(fused), fused=fused,
                            image_present=image_mask, text_present=text_mask)


class CrossAttentionFusionHead(_FusionHead):
    """Token fusion: each modality becomes k tokens (a projected vector split in k) plus modality-type and
    slot embeddings; a small pre-norm transformer encoder attends across both modalities' tokens and a
    [CLS] token, whose output is the fused representation.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        h, k = config.hidden_dim, config.tokens_per_modality
        if h % config.num_heads:
            raise ValueError(f"hidden_dim {h} must be divisible by num_heads {config.num_heads}")
        self.image_projection = _ModalityProjection(config.image_dim, k * h, config.dropout)
        self.text_projection = _ModalityProjection(config.text_dim, k * h, config.dropout)
        self.modality_type = nn.Parameter(torch.randn(2, 1, h) * 0.02)  # 0 = image, 1 = text
        self.slot = nn.Parameter(torch.randn(k, h) * 0.02)  # position of a token within its modality
        self.cls = nn.Parameter(torch.randn(1, 1, h) * 0.02)
        layer = nn.TransformerEncoderLayer(h, config.num_heads, dim_feedforward=4 * h, dropout=config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.classifier = nn.Linear(h, config.num_labels)

    def forward(self, image: Tensor | None, text: Tensor | None, *, image_present: Tensor | None = None,
                text_present: Tensor | None = None) -> FusionOutput:
        image_mask, text_mask = self._presence(image, text, image_present, text_present)
        batch, k, h = image_mask.shape[0], self.config.tokens_per_modality, self.config.hidden_dim
        image_tokens = self.image_projection(image, image_mask).reshape(batch, k, h) + self.modality_type[0] + self.slot
        text_tokens = self.text_projection(text, text_mask).reshape(batch, k, h) + self.modality_type[1] + self.slot
        tokens = torch.cat([self.cls.expand(batch, -1, -1), image_tokens, text_tokens], dim=1)  # (B, 1 + 2k, H)
        fused = self.norm(self.encoder(tokens)[:, 0])  # (B, H)
        return FusionOutput(logits=self.classifier(fused), fused=fused,
                            image_present=image_mask, text_present=text_mask)


_FUSION_HEADS: dict[str, type[_FusionHead]] = {
    "late": LateFusionHead,
    "concat": ConcatFusionHead,
    "cross-attention": CrossAttentionFusionHead,
}


def list_fusion_heads() -> list[str]:
    return list(_FUSION_HEADS)


def create_fusion_head(name: str, config: FusionConfig) -> nn.Module:
    if name not in _FUSION_HEADS:
        raise ValueError(f"unknown fusion head {name!r}; valid names: {list_fusion_heads()}")
    return _FUSION_HEADS[name](config)
