"""The frozen towers: image, text and OCR encoders behind the embedding cache, plus the class prompts.

Serving (:class:`mmapp.predictor.Predictor`), the bootstrap build, the CLI and the retrain job all
take a :class:`Towers`; a retrain inside the app process shares the app's towers read-only (the
encoders are frozen, the cache is safe for concurrent writers). Device and dtype are chosen here,
once (:func:`mmapp.device.resolve_placement`). Nothing is loaded at import; OCR and the class
prompts are built on first use. No model versions, no database, no UI.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np
import torch

from mmapp.cache import EmbeddingCache
from mmapp.config import Config
from mmapp.device import cuda_auto_setting, resolve_placement
from mmapp.embedder import Embedder
from mmapp.encoders import EncoderOptions, ImageRuntimeConfig, create_encoder
from mmapp.encoders.image import imagenet_class_names
from mmapp.imageio import DecodedImage
from mmapp.joint import JointSpace, class_prompt_embeddings


class ReadUntil(Protocol):
    """When a partial OCR read may stop (``__call__(text_so_far)``), and a cache key naming the rule."""

    key: str

    def __call__(self, text: str) -> bool: ...


class Towers:
    def __init__(self, *, embedder: Embedder, ocr: Callable[[], object], bridge_top_t: int):
        self.embedder = embedder
        self.bridge_top_t = bridge_top_t  # ConSE: ImageNet classes averaged per image
        self._ocr_factory = ocr  # built on first use: captioning alone never loads the OCR models
        self._ocr = None
        self._class_text: torch.Tensor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> "Towers":
        placement = resolve_placement(config.model.device)
        paths = config.paths
        opts = EncoderOptions(placement=placement, cache_dir=paths.weights, clip_model=config.model.clip_model,
                              clip_pretrained=config.model.clip_pretrained, ocr_det_side=config.model.ocr_det_side,
                              image_runtime=ImageRuntimeConfig(config.model.image_runtime, config.model.image_runtime_threads,
                                                               config.model.image_runtime_serving_threads))
        embedder = Embedder(image_encoder=create_encoder(config.model.image_encoder, opts, kind="image"),
                            text_encoder=create_encoder(config.model.text_encoder, opts, kind="text"),
                            cache=EmbeddingCache(paths.embeddings),
                            decode_on_device=cuda_auto_setting(config.model.decode_on_device, placement,
                                                               knob="model.decode_on_device"))
        return cls(embedder=embedder, ocr=lambda: create_encoder(config.model.ocr, opts, kind="ocr"),
                   bridge_top_t=config.model.bridge_top_t)

    @property
    def identity(self) -> dict[str, str]:
        """Encoder identities (name + weights hash): a model version trained on others is refused."""
        return self.embedder.identity

    @property
    def ocr(self):
        with self._lock:
            if self._ocr is None:
                self._ocr = self._ocr_factory()
            return self._ocr

    @property
    def has_imagenet_head(self) -> bool:
        return bool(getattr(self.embedder.image_encoder, "has_imagenet_head", False))

    @property
    def shares_embedding_space(self) -> bool:
        """Pre-aligned towers (open_clip; SigLIP-like models would declare the same): the image and
        text encoders name one common ``embedding_space``, so their own cosine is a zero-training
        baseline. Encoders without the attribute (EfficientNet, MiniLM) are separate spaces."""
        img = getattr(self.embedder.image_encoder, "embedding_space", None)
        txt = getattr(self.embedder.text_encoder, "embedding_space", None)
        return img is not None and img == txt

    def class_text(self) -> torch.Tensor | None:
        """(1000, D_txt) ImageNet prompt embeddings, or None when the image tower has no ImageNet head."""
        if not self.has_imagenet_head or self.shares_embedding_space:
            return None
        with self._lock:
            if self._class_text is None:
                self._class_text = class_prompt_embeddings(imagenet_class_names(), self.embedder.texts)
            return self._class_text

    @property
    def baseline_kind(self) -> str:
        """'native' (pre-aligned towers' own cosine) or 'conse' (ImageNet head + class prompts)."""
        if self.shares_embedding_space:
            return "native"
        if self.has_imagenet_head:
            return "conse"
        raise ValueError("these towers have no zero-training baseline: the image tower has no ImageNet head "
                         "and the towers do not share an embedding space")

    def bridge_space(self) -> JointSpace:
        """The zero-training baseline, ConSE or native: what serves before any version exists."""
        if self.baseline_kind == "native":
            return JointSpace(class_text=None, top_t=self.bridge_top_t, native=True)
        return JointSpace(class_text=self.class_text(), top_t=self.bridge_top_t)

    baseline_space = bridge_space

    def read_text(self, image: DecodedImage, until: ReadUntil | None = None) -> str:
        """OCR text, cached by image content so a re-analysis never runs OCR twice.

        With ``until`` (e.g. :class:`mmapp.captioning.QuotedWords`) OCR stops once ``until(text)`` holds:
        a whole read in the cache is used as it is; a partial one is cached under ``until.key`` apart."""
        cache = self.embedder.cache
        identity = getattr(self.ocr, "identity", "ocr")
        keys = [identity] if until is None else [identity, f"{identity}/{until.key}"]
        if cache is not None:
            for key in keys:
                hit = cache.get(key, image.sha256)
                if hit is not None:
                    return str(hit["text"])
        text = self.ocr.read(image.image, until=until).text if until is not None else self.ocr.read(image.image).text
        if cache is not None:
            cache.put(keys[-1], image.sha256, {"text": np.array(text)})
        return text
