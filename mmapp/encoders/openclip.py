"""open_clip towers, for deployments with internet or a local checkpoint.

``pretrained`` is a hub tag (e.g. ``laion2b_s34b_b79k``), ``local-dir:PATH`` (a folder holding
``open_clip_config.json`` and weights, as written by :func:`save_local_dir`), a checkpoint file, or
"" for random init (tests). Offline, a hub tag fails at once with a message saying what to do.
"""
from __future__ import annotations

import functools
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from mmapp.device import Placement
from mmapp.encoders.base import ImageFeatures, file_sha256, tree_sha256

LOCAL_DIR = "local-dir:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPBackbone:
    """One open_clip model shared by the ``clip-image`` and ``clip-text`` encoders."""

    def __init__(self, model_name: str, pretrained: str, *, placement: Placement):
        import open_clip

        self.placement = placement
        self.model_name = model_name
        self.pretrained = pretrained
        try:
            if pretrained.startswith(LOCAL_DIR):
                name = pretrained
                model, _, preprocess = open_clip.create_model_and_transforms(name)
                self.tokenizer = open_clip.get_tokenizer(name)
                self._weights_id = tree_sha256(pretrained[len(LOCAL_DIR):], ("*.safetensors", "*.bin", "*.pth"))
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
                self.tokenizer = open_clip.get_tokenizer(model_name)
                if not pretrained:
                    self._weights_id = "random-init"
                elif os.path.isfile(pretrained):
                    self._weights_id = file_sha256(pretrained)
                else:
                    self._weights_id = f"tag-{pretrained}"
        except (RuntimeError, OSError, ValueError) as exc:
            raise RuntimeError(
                f"could not load open_clip model {model_name!r} with pretrained={pretrained!r}: {exc}. "
                "Without network access, download the weights on a machine that has it and set "
                "model.clip_pretrained to 'local-dir:/path/to/folder' or to a checkpoint file "
                "(or use the default 'offline' profile)."
            ) from exc
        self.model = model.to(placement.device, placement.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.dim = int(self.model.text_projection.shape[1] if isinstance(getattr(self.model, "text_projection", None), torch.Tensor)
                       else self.model.visual.output_dim)

    @property
    def identity(self) -> str:
        return f"openclip-{self.model_name}@{self._weights_id[:16]}"

    def encode_images(self, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                px = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + batch_size]])
                emb = self.model.encode_image(px.to(self.placement.device, self.placement.dtype))  # (B, D)
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def encode_texts(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.placement.device)
                emb = self.model.encode_text(tokens)  # (B, D)
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


@functools.lru_cache(maxsize=2)
def shared_backbone(model_name: str, pretrained: str, placement: Placement) -> OpenCLIPBackbone:
    return OpenCLIPBackbone(model_name, pretrained, placement=placement)


class OpenCLIPImageEncoder:
    kind = "image"
    has_imagenet_head = False  # no classifier: no ConSE bridge; the baseline is the native cosine instead

    def __init__(self, backbone: OpenCLIPBackbone, *, batch_size: int = 32):
        self.backbone = backbone
        self.name = "clip-image"
        self.dim = backbone.dim
        self.batch_size = batch_size

    @cached_property
    def identity(self) -> str:
        return f"{self.backbone.identity}/image"

    @property
    def embedding_space(self) -> str:
        """Pre-aligned towers: the image and text encoders of one CLIP share this space id."""
        return self.backbone.identity

    def encode(self, images: Sequence[Image.Image]) -> ImageFeatures:
        return ImageFeatures(features=self.backbone.encode_images(images, self.batch_size), class_probs=None)


class OpenCLIPTextEncoder:
    kind = "text"

    def __init__(self, backbone: OpenCLIPBackbone, *, batch_size: int = 64):
        self.backbone = backbone
        self.name = "clip-text"
        self.dim = backbone.dim
        self.batch_size = batch_size

    @cached_property
    def identity(self) -> str:
        return f"{self.backbone.identity}/text"

    @property
    def embedding_space(self) -> str:
        return self.backbone.identity

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.backbone.encode_texts(texts, self.batch_size)


def save_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], directory: Path,
                   preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write ``open_clip_config.json`` + safetensors weights, loadable as ``local-dir:DIRECTORY``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {
        "mean": list(getattr(model.visual, "image_mean", None) or OPENAI_MEAN),
        "std": list(getattr(model.visual, "image_std", None) or OPENAI_STD),
    }}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_NAME))
    return directory
