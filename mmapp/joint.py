"""The joint image–text space: the ConSE bridge, trained projections, and the served score mixture.

* ConSE (Norouzi et al., ICLR 2014): an image's top-T ImageNet class probabilities weight the
  text embeddings of the class prompts; the result lives in the text tower's space. Zero training.
* Projections (LiT-style: towers frozen, only projections trained with InfoNCE): image features
  and the bridge vector map to ``joint_dim``; text embeddings map to ``joint_dim``. The bridge
  enters the image side through a linear map initialised equal to the text map, and the image
  MLP's last layer starts at zero, so before training the projected space reproduces the bridge.
* Native baseline (pre-aligned towers such as open_clip, whose image and text embeddings share one
  space): the zero-training baseline is the towers' own cosine. The image embedding itself plays the
  bridge's role, and with ``identity_init`` both projections start as the identity (the MLPs are
  residual adapters starting at zero), so training begins exactly at the native alignment.
  "Bridge" below means this zero-training *baseline view*, ConSE or native.
* Served score = ``mix * bridge_score + (1 - mix) * projected_score`` with ``mix`` chosen on
  held-out data, after centering each side (hubness reduction): clip-art training must not make
  real photos worse than the bridge.
* Local mix (set by a retrain, see :class:`LocalMix`): near the images users have taught the
  model, the mix may lean further on the projections than the global ``mix`` allows; elsewhere
  (real photos, say) the global mix holds. "Near" is the image tower's cosine similarity to those
  images (mean of the k nearest), ramped linearly between two thresholds.
* Caption memory (set by a retrain, see :class:`CaptionMemory`): a kNN memory of the pictures users
  taught and their accepted captions. An image near taught pictures gets, for each text, a bonus of
  ``weight * nearness * cos(its neighbours' captions, the text)``: the served score leans on what
  users said about pictures like it, in both directions (i→t and t→i read the same score matrix).
No database, no UI here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmapp.losses import LogitScale

PROMPT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "{}")


def class_prompt_embeddings(class_names: Sequence[str], encode_texts) -> torch.Tensor:
    """(C, D_txt) unit-norm mean embedding over PROMPT_TEMPLATES for each class."""
    prompts = [t.format(name) for name in class_names for t in PROMPT_TEMPLATES]
    emb = encode_texts(prompts).view(len(class_names), len(PROMPT_TEMPLATES), -1).mean(1)  # (C, D)
    return F.normalize(emb, dim=-1)


def conse(class_probs: torch.Tensor, class_text: torch.Tensor, top_t: int) -> torch.Tensor:
    """(B, C) probabilities, (C, D) class embeddings -> (B, D) unit-norm bridge vectors."""
    top = class_probs.topk(min(top_t, class_probs.shape[1]), dim=-1)  # values/indices (B, T)
    weights = top.values / top.values.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, T)
    vecs = (weights.unsqueeze(-1) * class_text[top.indices]).sum(1)  # (B, D)
    return F.normalize(vecs, dim=-1)


@dataclass(frozen=True)
class AlignmentConfig:
    image_dim: int  # pooled image-tower width (1280 for EfficientNet-Lite)
    text_dim: int  # text-tower width (384 MiniLM, 768 mpnet)
    bridge_dim: int = 0  # 0: no baseline input; else text_dim (ConSE vector, or the native image embedding)
    joint_dim: int = 256
    hidden_dim: int = 1024
    dropout: float = 0.1
    temperature_init: float = 0.07
    identity_init: bool = False  # pre-aligned towers: text_proj and bridge_proj start as the identity


class AlignmentModel(nn.Module):
    """Trainable projections on top of frozen towers; returns unit-norm joint embeddings."""

    def __init__(self, config: AlignmentConfig):
        super().__init__()
        self.config = config
        c = config
        self.image_mlp = nn.Sequential(
            nn.LayerNorm(c.image_dim), nn.Linear(c.image_dim, c.hidden_dim), nn.GELU(),
            nn.Dropout(c.dropout), nn.Linear(c.hidden_dim, c.joint_dim),
        )
        self.text_proj = nn.Linear(c.text_dim, c.joint_dim, bias=False)
        self.text_mlp = nn.Sequential(nn.Linear(c.text_dim, c.hidden_dim), nn.GELU(), nn.Dropout(c.dropout),
                                      nn.Linear(c.hidden_dim, c.joint_dim))
        if c.identity_init:
            if c.joint_dim != c.text_dim:
                raise ValueError(f"identity_init needs joint_dim == text_dim, got {c.joint_dim} and {c.text_dim}")
            nn.init.eye_(self.text_proj.weight)  # start at the towers' own alignment
        else:
            nn.init.orthogonal_(self.text_proj.weight)  # rows orthonormal: cosines roughly preserved (JL)
        nn.init.zeros_(self.text_mlp[-1].weight)
        nn.init.zeros_(self.text_mlp[-1].bias)
        if c.bridge_dim:
            self.bridge_proj = nn.Linear(c.bridge_dim, c.joint_dim, bias=False)
            with torch.no_grad():
                self.bridge_proj.weight.copy_(self.text_proj.weight)
            nn.init.zeros_(self.image_mlp[-1].weight)
            nn.init.zeros_(self.image_mlp[-1].bias)
        else:
            self.bridge_proj = None
        self.logit_scale = LogitScale(c.temperature_init)

    def encode_image(self, features: torch.Tensor, bridge: torch.Tensor | None = None) -> torch.Tensor:
        z = self.image_mlp(features)  # (B, J)
        if self.bridge_proj is not None:
            if bridge is None:
                raise ValueError("this alignment model was trained with a ConSE bridge input; got bridge=None")
            z = z + self.bridge_proj(bridge)
        return F.normalize(z, dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text) + self.text_mlp(text), dim=-1)  # (B, J)


def ramp(support: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between."""
    return ((support - lo) / (hi - lo)).clamp(0.0, 1.0)


@dataclass
class LocalMix:
    """A per-image mix near users' taught images: ``mix_i = global + (near_mix - global) * ramp(support_i)``.

    ``support_i`` is the mean cosine of image i's tower features to its ``k`` nearest ``reference``
    rows; ``ramp`` is 0 at or below ``lo``, 1 at or above ``hi``, linear between.
    """

    reference: torch.Tensor  # (M, D_img) tower features of the images users taught (normalised here)
    near_mix: float
    lo: float
    hi: float
    k: int = 5

    def __post_init__(self) -> None:
        if self.reference.ndim != 2 or self.reference.shape[0] == 0:
            raise ValueError(f"local mix reference must be a non-empty (M, D) matrix, got {tuple(self.reference.shape)}")
        if not (0.0 <= self.near_mix <= 1.0 and self.lo < self.hi and self.k >= 1):
            raise ValueError(f"bad local mix: near_mix {self.near_mix}, lo {self.lo}, hi {self.hi}, k {self.k}")
        self.reference = F.normalize(self.reference.float(), dim=-1)

    def support(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) mean cosine to the k nearest reference images."""
        sims = F.normalize(features.float(), dim=-1) @ self.reference.T  # (N, M)
        return sims.topk(min(self.k, sims.shape[1]), dim=1).values.mean(1)

    def weight(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) in [0, 1]: how far each image is inside the taught neighbourhood."""
        return ramp(self.support(features), self.lo, self.hi)

    @staticmethod
    def per_image_mix(global_mix: float, near_mix: float, weight: torch.Tensor) -> torch.Tensor:
        """(N, 1) bridge weight of each image: the global mix, moved towards ``near_mix`` by ``weight``."""
        return (global_mix + (near_mix - global_mix) * weight)[:, None]

    def meta(self) -> dict:
        return {"near_mix": self.near_mix, "lo": self.lo, "hi": self.hi, "k": self.k,
                "reference_images": int(self.reference.shape[0])}


@dataclass
class CaptionMemory:
    """kNN memory of taught pictures and their captions, added to the served score.

    Image side: image i's ``k`` nearest memory images by tower cosine, softmax-weighted
    (``temperature``), give a caption vector ``m_i`` (the weighted mean of their captions' text
    embeddings, centred on ``center``, the mean memory caption, so that an unrelated text scores
    about 0). Text side, symmetrically: text t's ``k`` nearest memory captions give a picture vector
    ``u_t`` (the weighted mean of their pictures' tower features, centred on the mean memory picture).
    The bonus is ``weight * ramp(support_i, lo, hi) * (cos(m_i, t) + cos(i, u_t))`` (centred vectors),
    ``support_i`` being image i's mean cosine to its k nearest: pictures unlike any taught one (real
    photos, say) get none.
    """

    images: torch.Tensor  # (M, D_img) tower features of taught pictures, one row per caption
    texts: torch.Tensor  # (M, D_txt) text embeddings of their accepted captions
    weight: float
    lo: float
    hi: float
    k: int = 5
    temperature: float = 0.05
    center: torch.Tensor | None = None  # (D_txt,) default: the mean of ``texts``

    def __post_init__(self) -> None:
        if self.images.ndim != 2 or self.texts.ndim != 2 or self.images.shape[0] != self.texts.shape[0] \
                or self.images.shape[0] == 0:
            raise ValueError(f"caption memory needs (M, D_img) images and (M, D_txt) texts with one row per caption, "
                             f"got {tuple(self.images.shape)} and {tuple(self.texts.shape)}")
        if not (self.weight >= 0.0 and self.lo < self.hi and self.k >= 1 and self.temperature > 0):
            raise ValueError(f"bad caption memory: weight {self.weight}, lo {self.lo}, hi {self.hi}, k {self.k}, "
                             f"temperature {self.temperature}")
        self.images = F.normalize(self.images.float(), dim=-1)
        texts = F.normalize(self.texts.float(), dim=-1)
        self.center = texts.mean(0) if self.center is None else self.center.float()
        self.texts = texts
        self.image_center = self.images.mean(0)  # (D_img,)

    def _neighbours(self, sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top = sims.topk(min(self.k, sims.shape[1]), dim=1)  # values/indices (N, k)
        return top.values, top.indices, torch.softmax(top.values / self.temperature, dim=1)

    def image_view(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image side: "caption" (N, D_txt) m_i, "image" (N, D_img) the centred image itself,
        "support" (N,) the mean cosine to the k nearest taught pictures, "nearness" (N,) it ramped to [0, 1]."""
        unit = F.normalize(features.float(), dim=-1)
        values, idx, w = self._neighbours(unit @ self.images.T)  # (N, k) each
        m = (w.unsqueeze(-1) * (self.texts[idx] - self.center)).sum(1)  # (N, D_txt)
        support = values.mean(1)
        return {"caption": F.normalize(m, dim=-1), "image": F.normalize(unit - self.image_center, dim=-1),
                "support": support, "nearness": ramp(support, self.lo, self.hi)}

    def text_view(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text side: "caption" (N, D_txt) the centred text itself, "image" (N, D_img) u_t."""
        unit = F.normalize(text.float(), dim=-1)
        _, idx, w = self._neighbours(unit @ self.texts.T)
        u = (w.unsqueeze(-1) * (self.images[idx] - self.image_center)).sum(1)  # (N, D_img)
        return {"caption": F.normalize(unit - self.center, dim=-1), "image": F.normalize(u, dim=-1)}

    @staticmethod
    def raw_bonus(image_view: dict[str, torch.Tensor], text_view: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N_img, N_txt) the bonus before weight and nearness."""
        return image_view["caption"] @ text_view["caption"].T + image_view["image"] @ text_view["image"].T

    def bonus(self, image_view: dict[str, torch.Tensor], text_view: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N_img, N_txt) what the memory adds to the served score."""
        return self.weight * image_view["nearness"][:, None] * self.raw_bonus(image_view, text_view)

    def meta(self) -> dict:
        return {"weight": self.weight, "lo": self.lo, "hi": self.hi, "k": self.k, "temperature": self.temperature}


@dataclass
class JointSpace:
    """What a served model version uses to score images against texts.

    ``model`` is None for the baseline alone (``mix`` is then 1). The baseline view ("bridge") is
    ConSE when ``class_text`` is set, the towers' native cosine when ``native`` (pre-aligned towers).
    """

    class_text: torch.Tensor | None  # (C, D_txt) class prompt embeddings; None without ImageNet head
    top_t: int
    model: AlignmentModel | None = None
    mix: float = 1.0  # weight of the bridge score
    bridge_center_img: torch.Tensor | None = None  # (D_txt,) mean bridge vector over training images
    bridge_center_txt: torch.Tensor | None = None  # (D_txt,) mean text embedding over training captions
    joint_center_img: torch.Tensor | None = None  # (J,)
    joint_center_txt: torch.Tensor | None = None  # (J,)
    local: LocalMix | None = None  # per-image mix near users' taught images (None: global mix only)
    memory: CaptionMemory | None = None  # kNN memory of taught pictures' captions (None: off)
    native: bool = False  # pre-aligned towers: the baseline is the native image-text cosine

    def __post_init__(self) -> None:
        if self.native and self.class_text is not None:
            raise ValueError("a joint space has one baseline: ConSE (class_text) or native, not both")

    @property
    def has_bridge(self) -> bool:
        """True when a zero-training baseline view exists (ConSE or native)."""
        return self.class_text is not None or self.native

    @property
    def baseline_kind(self) -> str | None:
        return "native" if self.native else ("conse" if self.class_text is not None else None)

    def bridge(self, class_probs: torch.Tensor | None,
               features: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, D_txt) unit-norm baseline vectors in the text tower's space: ConSE from ``class_probs``,
        or (native) the image embeddings ``features`` themselves. None when there is no baseline."""
        if self.native:
            return None if features is None else F.normalize(features.float(), dim=-1)
        if not self.has_bridge or class_probs is None:
            return None
        return conse(class_probs, self.class_text, self.top_t)

    def image_views(self, features: torch.Tensor, class_probs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The per-space image embeddings used in scoring (centered, unit norm)."""
        out = {}
        b = self.bridge(class_probs, features)
        if b is not None:
            out["bridge"] = _center(b, self.bridge_center_img)
        if self.model is not None:
            with torch.inference_mode():
                out["joint"] = _center(self.model.encode_image(features, b), self.joint_center_img)
            if self.local is not None:
                out["local_weight"] = self.local.weight(features)  # (N,)
        if self.memory is not None:
            out.update({f"memory_{k}": v for k, v in self.memory.image_view(features).items()})
        return out

    def text_views(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.has_bridge:
            out["bridge"] = _center(text, self.bridge_center_txt)
        if self.model is not None:
            with torch.inference_mode():
                out["joint"] = _center(self.model.encode_text(text), self.joint_center_txt)
        if self.memory is not None:
            out.update({f"memory_{k}": v for k, v in self.memory.text_view(text).items()})
        return out

    def similarity(self, image_views: dict[str, torch.Tensor], text_views: dict[str, torch.Tensor],
                   mix: float | None = None) -> torch.Tensor:
        """(N_img, N_txt) served score. An explicit ``mix`` applies to every image (no local mix, no
        caption memory: the score of that mix alone)."""
        if mix is None and self.memory is not None and "memory_caption" in image_views \
                and "memory_caption" in text_views:
            base = self.similarity(image_views, text_views, mix=self._served_mix(image_views))
            return base + self.memory.bonus(_memory_part(image_views), _memory_part(text_views))
        if self.model is None:
            if "bridge" not in image_views:
                raise ValueError("this joint space has neither a baseline (ConSE or native) nor projections")
            return image_views["bridge"] @ text_views["bridge"].T
        joint = image_views["joint"] @ text_views["joint"].T
        if not self.has_bridge:
            return joint
        if mix is None:
            mix = self._served_mix(image_views)
        if not torch.is_tensor(mix) and mix == 0.0:
            return joint
        return mix * (image_views["bridge"] @ text_views["bridge"].T) + (1 - mix) * joint

    def _served_mix(self, image_views: dict[str, torch.Tensor]) -> float | torch.Tensor:
        """The global mix, or (N, 1) per-image mixes where a local mix is set."""
        if self.local is not None and "local_weight" in image_views:
            return LocalMix.per_image_mix(self.mix, self.local.near_mix, image_views["local_weight"])
        return self.mix

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {k: v for k, v in {
            "class_text": self.class_text,
            "bridge_center_img": self.bridge_center_img, "bridge_center_txt": self.bridge_center_txt,
            "joint_center_img": self.joint_center_img, "joint_center_txt": self.joint_center_txt,
        }.items() if v is not None}
        if self.model is not None:
            tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        if self.local is not None:
            tensors["local_reference"] = self.local.reference.half()  # 2 bytes a value is ample for cosines
        if self.memory is not None:
            tensors.update(memory_images=self.memory.images.half(), memory_texts=self.memory.texts.half(),
                           memory_center=self.memory.center)
        return tensors

    def meta(self) -> dict:
        out = {"top_t": self.top_t, "mix": self.mix,
               "alignment": asdict(self.model.config) if self.model is not None else None}
        if self.local is not None:
            out["local_mix"] = {k: v for k, v in self.local.meta().items() if k != "reference_images"}
        if self.memory is not None:
            out["caption_memory"] = self.memory.meta()
        if self.native:
            out["baseline"] = "native"  # absent for ConSE / none: metas written before stay valid
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "JointSpace":
        model = None
        if meta.get("alignment"):
            model = AlignmentModel(AlignmentConfig(**meta["alignment"]))
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            model.eval()
        local = None
        if meta.get("local_mix"):
            if "local_reference" not in tensors:
                raise ValueError("model meta has a local mix but its weights have no local_reference tensor")
            local = LocalMix(tensors["local_reference"].float(), **meta["local_mix"])
        memory = None
        if meta.get("caption_memory"):
            if "memory_images" not in tensors or "memory_texts" not in tensors:
                raise ValueError("model meta has a caption memory but its weights have no memory_images/memory_texts")
            memory = CaptionMemory(tensors["memory_images"].float(), tensors["memory_texts"].float(),
                                   center=tensors.get("memory_center"), **meta["caption_memory"])
        return cls(class_text=tensors.get("class_text"), top_t=int(meta["top_t"]), model=model,
                   mix=float(meta["mix"]), bridge_center_img=tensors.get("bridge_center_img"),
                   bridge_center_txt=tensors.get("bridge_center_txt"),
                   joint_center_img=tensors.get("joint_center_img"),
                   joint_center_txt=tensors.get("joint_center_txt"), local=local, memory=memory,
                   native=meta.get("baseline") == "native")


def _memory_part(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("memory_"): v for k, v in views.items() if k.startswith("memory_")}


def _center(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    return x if center is None else F.normalize(x - center, dim=-1)
