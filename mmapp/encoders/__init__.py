"""One factory for every encoder: ``list_encoders()`` names them, ``create_encoder(name, ...)`` builds one.

Encoders are frozen towers: image encoders return :class:`ImageFeatures`, text encoders a
``(B, D)`` unit-norm tensor, OCR readers an ``OCRResult``. Device and dtype come in as a
:class:`~mmapp.device.Placement`; nothing is loaded at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmapp.device import Placement
from mmapp.encoders.base import ImageFeatures
from mmapp.encoders.onnx_runtime import ImageRuntimeConfig

__all__ = ["ImageFeatures", "EncoderOptions", "ImageRuntimeConfig", "list_encoders", "create_encoder", "encoder_kind"]


@dataclass(frozen=True)
class EncoderOptions:
    placement: Placement
    cache_dir: Path  # where reassembled weights live (mpnet)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = ""
    ocr_det_side: int | None = None  # None: the OCR reader's own default (OCRConfig.det_side)
    image_runtime: ImageRuntimeConfig = ImageRuntimeConfig()  # what runs a frozen EfficientNet tower (ONNX export under cache_dir)


def _efficientnet(name: str) -> Callable[[EncoderOptions], Any]:
    def build(opts: EncoderOptions):
        from mmapp.encoders.image import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(name, placement=opts.placement, runtime=opts.image_runtime,
                                       cache_dir=opts.cache_dir)
    return build


def _minilm(opts: EncoderOptions):
    from mmapp.encoders.text import SentenceEncoder, minilm_model_dir

    return SentenceEncoder("minilm", minilm_model_dir(), placement=opts.placement)


def _mpnet(opts: EncoderOptions):
    from mmapp.encoders.text import SentenceEncoder, mpnet_model_dir

    return SentenceEncoder("mpnet", mpnet_model_dir(opts.cache_dir), placement=opts.placement)


def _clip_image(opts: EncoderOptions):
    from mmapp.encoders.openclip import OpenCLIPImageEncoder, shared_backbone

    return OpenCLIPImageEncoder(shared_backbone(opts.clip_model, opts.clip_pretrained, opts.placement))


def _clip_text(opts: EncoderOptions):
    from mmapp.encoders.openclip import OpenCLIPTextEncoder, shared_backbone

    return OpenCLIPTextEncoder(shared_backbone(opts.clip_model, opts.clip_pretrained, opts.placement))


def _rapidocr(opts: EncoderOptions):
    from mmapp.encoders.ocr import OCRConfig, RapidOCRReader

    return RapidOCRReader(OCRConfig() if opts.ocr_det_side is None else OCRConfig(det_side=opts.ocr_det_side))


_REGISTRY: dict[str, tuple[str, Callable[[EncoderOptions], Any]]] = {
    "efficientnet-lite0": ("image", _efficientnet("efficientnet-lite0")),
    "efficientnet-lite1": ("image", _efficientnet("efficientnet-lite1")),
    "efficientnet-lite2": ("image", _efficientnet("efficientnet-lite2")),
    "clip-image": ("image", _clip_image),
    "minilm": ("text", _minilm),
    "mpnet": ("text", _mpnet),
    "clip-text": ("text", _clip_text),
    "rapidocr": ("ocr", _rapidocr),
}


def list_encoders(kind: str | None = None) -> list[str]:
    """Names of the encoders, optionally of one kind ('image', 'text', 'ocr')."""
    kinds = {k for k, _ in _REGISTRY.values()}
    if kind is not None and kind not in kinds:
        raise ValueError(f"unknown encoder kind {kind!r}; valid: {sorted(kinds)}")
    return sorted(n for n, (k, _) in _REGISTRY.items() if kind is None or k == kind)


def encoder_kind(name: str) -> str:
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; valid: {list_encoders()}")
    return _REGISTRY[name][0]


def create_encoder(name: str, options: EncoderOptions, *, kind: str | None = None):
    """Build encoder ``name``; ``kind`` (if given) must match, so a text name can't be used as image tower."""
    actual = encoder_kind(name)
    if kind is not None and actual != kind:
        raise ValueError(f"encoder {name!r} is a {actual} encoder, not {kind}; valid {kind} encoders: {list_encoders(kind)}")
    return _REGISTRY[name][1](options)
