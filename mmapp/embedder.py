"""Frozen towers behind the embedding cache: nothing is encoded twice.

Images are keyed by the sha256 of their file bytes, texts by the sha256 of their UTF-8 text,
both under the encoder's identity (name + weights hash).
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmapp.cache import EmbeddingCache, text_key
from mmapp.encoders import ImageFeatures
from mmapp.imageio import ImageLimits, load_image, sha256_bytes


class Embedder:
    def __init__(self, *, image_encoder, text_encoder, cache: EmbeddingCache | None = None,
                 decode_on_device: bool = False):
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        # bulk files (image_files): JPEGs decoded on the tower's device (model.decode_on_device)
        self.decode_on_device = decode_on_device and hasattr(image_encoder, "encode_jpegs")
        self.cache = cache

    @property
    def identity(self) -> dict[str, str]:
        return {"image": self.image_encoder.identity, "text": self.text_encoder.identity}

    def images(self, images: Sequence[Image.Image], keys: Sequence[str], *,
               encode: Callable[[list[Image.Image]], ImageFeatures] | None = None) -> ImageFeatures:
        """Features for decoded images whose content hashes are ``keys``; ``encode`` runs the tower on
        the cache's misses (default: the image encoder itself; the predictor passes its micro-batcher)."""
        encode = encode or self.image_encoder.encode

        def compute(idx: list[int]) -> list[dict[str, np.ndarray]]:
            out = encode([images[i] for i in idx])
            rows = []
            for j in range(len(idx)):
                row = {"features": out.features[j].numpy()}
                if out.class_probs is not None:
                    row["class_probs"] = out.class_probs[j].numpy()
                rows.append(row)
            return rows

        if self.cache is None:
            return encode(list(images))
        entries, _ = self.cache.get_or_compute(self.image_encoder.identity, list(keys), compute)
        return _stack_image_entries(entries)

    def image_files(self, paths: Sequence[Path], *, limits: ImageLimits = ImageLimits(),
                    chunk: int = 64, progress: bool = False, desc: str = "images") -> tuple[ImageFeatures, list[str]]:
        """Features for image files (decoded safely), with their content keys; errors name the file.
        The next chunk's files are read and hashed in a background thread while the tower runs; with
        ``decode_on_device`` the cache's misses that are plain JPEGs are decoded on the tower's device."""
        feats, probs, keys = [], [], []
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
        chunks = [[Path(p) for p in paths[start:start + chunk]] for start in range(0, len(paths), chunk)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-files") as reader:
            pending = reader.submit(_read_chunk, chunks[0], limits) if chunks else None
            for i, batch in enumerate(chunks):
                datas, batch_keys = pending.result()
                pending = reader.submit(_read_chunk, chunks[i + 1], limits) if i + 1 < len(chunks) else None
                if self.decode_on_device:
                    out = self._jpeg_files(batch, datas, batch_keys, limits)
                else:
                    out = self.images(_DecodeOnAccess(batch, datas, limits), batch_keys)
                feats.append(out.features)
                if out.class_probs is not None:
                    probs.append(out.class_probs)
                keys.extend(batch_keys)
                bar.update(len(batch))
        bar.close()
        if not feats:
            return ImageFeatures(torch.empty(0, self.image_encoder.dim), None), []
        return ImageFeatures(torch.cat(feats), torch.cat(probs) if probs else None), keys

    def _jpeg_files(self, paths: list[Path], datas: list[bytes], keys: list[str], limits: ImageLimits) -> ImageFeatures:
        """Cache misses among plain JPEGs go through the device decoder; the rest (other formats, EXIF
        rotation, CMYK, anything it cannot read) through the safe PIL path, so results keep their order."""
        pil = _DecodeOnAccess(paths, datas, limits)

        def compute(idx: list[int]) -> list[dict[str, np.ndarray]]:
            on_device = [i for i in idx if _plain_jpeg(datas[i], limits)]
            outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
            if on_device:
                try:
                    out = self.image_encoder.encode_jpegs([datas[i] for i in on_device])
                    for j, i in enumerate(on_device):
                        outputs[i] = (out.features[j], out.class_probs[j] if out.class_probs is not None else None)
                except (RuntimeError, ValueError):  # a JPEG variant the device decoder refuses: PIL reads it
                    outputs.clear()
            rest = [i for i in idx if i not in outputs]
            if rest:
                out = self.image_encoder.encode([pil[i] for i in rest])
                for j, i in enumerate(rest):
                    outputs[i] = (out.features[j], out.class_probs[j] if out.class_probs is not None else None)
            rows = []
            for i in idx:
                feat, prob = outputs[i]
                rows.append({"features": feat.numpy(), **({"class_probs": prob.numpy()} if prob is not None else {})})
            return rows

        if self.cache is None:
            return _stack_image_entries(compute(list(range(len(datas)))))
        entries, _ = self.cache.get_or_compute(self.image_encoder.identity, list(keys), compute)
        return _stack_image_entries(entries)

    def texts(self, texts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """(B, D_txt) unit-norm text embeddings."""
        texts = list(texts)
        if self.cache is None:
            return self.text_encoder.encode(texts)
        keys = [text_key(t) for t in texts]

        def compute(idx: list[int]) -> list[dict[str, np.ndarray]]:
            rows = []
            step = 512
            for start in tqdm(range(0, len(idx), step), desc="texts", disable=not progress or len(idx) < step):
                emb = self.text_encoder.encode([texts[i] for i in idx[start:start + step]])
                rows.extend({"embedding": e.numpy()} for e in emb)
            return rows

        entries, _ = self.cache.get_or_compute(self.text_encoder.identity, keys, compute)
        if not entries:
            return torch.empty(0, self.text_encoder.dim)
        return torch.from_numpy(np.stack([e["embedding"] for e in entries]))


def _read_chunk(paths: list[Path], limits: ImageLimits) -> tuple[list[bytes], list[str]]:
    """Read a chunk of files once (hashed for the cache key, decoded on a miss); oversized ones refused."""
    for p in paths:
        if p.stat().st_size > limits.max_bytes:
            load_image(p, limits=limits, name=str(p))  # raises the size error naming the file
    datas = [p.read_bytes() for p in paths]
    return datas, [sha256_bytes(d) for d in datas]


def _plain_jpeg(data: bytes, limits: ImageLimits) -> bool:
    """A baseline/progressive RGB or greyscale JPEG within the pixel limits and without an EXIF
    rotation: what the device decoder reads the same way PIL does (header only, nothing decoded)."""
    if not data.startswith(b"\xff\xd8") or "JPEG" not in limits.formats:
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            w, h = im.size
            return (im.mode in ("RGB", "L") and w * h <= limits.max_pixels and min(w, h) >= limits.min_side
                    and max(w, h) <= limits.max_aspect * min(w, h) and im.getexif().get(0x0112, 1) == 1)
    except Exception:  # the PIL path gives the proper error for a broken file
        return False


def _stack_image_entries(entries: Iterable[dict[str, np.ndarray]]) -> ImageFeatures:
    entries = list(entries)
    feats = torch.from_numpy(np.stack([e["features"] for e in entries]))
    has_probs = all("class_probs" in e for e in entries)
    probs = torch.from_numpy(np.stack([e["class_probs"] for e in entries])) if has_probs else None
    return ImageFeatures(features=feats, class_probs=probs)


class _DecodeOnAccess(Sequence):
    """Image bytes that are decoded only when the cache asks for them (a miss)."""

    def __init__(self, paths: Sequence[Path], datas: Sequence[bytes], limits: ImageLimits):
        self.paths, self.datas, self.limits = paths, datas, limits

    def __len__(self) -> int:
        return len(self.datas)

    def __getitem__(self, i: int) -> Image.Image:
        if not 0 <= i < len(self.datas):
            raise IndexError(i)
        return load_image(self.datas[i], limits=self.limits, name=str(self.paths[i])).image
