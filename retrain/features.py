"""Where a retrain gets its tower features: the embedding cache, never a fresh encode when avoidable.

:class:`FeatureSource` is what the job needs; :class:`PredictorFeatureSource` serves it from a
running :class:`mmapp.predictor.Predictor` (the app's, or one the CLI builds). Uploaded images are
looked up in the cache by the sha256 the prediction stored; only a cache miss decodes the blob and
runs the image tower. Tests inject a synthetic source instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from mmapp.encoders import ImageFeatures
from mmapp.training import PairFeatures


@dataclass(frozen=True)
class ImageRef:
    sha256: str  # content hash: the embedding cache key
    path: Path | None = None  # the blob to decode on a cache miss


@dataclass
class MemeSet:
    """The bootstrap (synthetic) meme set: features, label ids and the split of each example."""

    image: torch.Tensor  # (N, D_img)
    text: torch.Tensor  # (N, D_txt)
    labels: torch.Tensor  # (N,) index into the model's labels
    splits: np.ndarray  # (N,) 'train' | 'val' | 'test'


class FeatureSource(Protocol):
    identity: dict[str, str]  # encoder identities; a model trained on other encoders is refused

    def images(self, refs: Sequence[ImageRef]) -> ImageFeatures: ...

    def texts(self, texts: Sequence[str]) -> torch.Tensor: ...  # (B, D_txt) unit norm

    def corpus(self, split: str) -> PairFeatures: ...  # a split of the bootstrap corpus

    def memes(self) -> MemeSet | None: ...

    def guard(self) -> PairFeatures | None: ...  # real photos the served score mix must not worsen


class _LazyImages(Sequence):
    """Decodes a blob only when the cache asks for it (a miss); counts the decodes."""

    def __init__(self, refs: Sequence[ImageRef]):
        self.refs = list(refs)
        self.decoded = 0

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        from mmapp.imageio import load_image

        ref = self.refs[i]
        if ref.path is None:
            raise FileNotFoundError(f"image {ref.sha256} is not in the embedding cache and has no stored file")
        self.decoded += 1
        return load_image(ref.path, name=str(ref.path)).image


@dataclass
class PredictorFeatureSource:
    """Features through a predictor's embedder (cached by content hash) and the bootstrap dataset files."""

    predictor: object  # mmapp.predictor.Predictor
    config: object  # mmapp.config.Config
    encoded_on_miss: int = 0  # uploads that had to be decoded and encoded (cache misses)
    _corpus: dict[str, PairFeatures] = field(default_factory=dict, repr=False)
    _memes: MemeSet | None = field(default=None, repr=False)

    @property
    def identity(self) -> dict[str, str]:
        return self.predictor.embedder.identity

    def images(self, refs: Sequence[ImageRef]) -> ImageFeatures:
        lazy = _LazyImages(refs)
        out = self.predictor.embedder.images(lazy, [r.sha256 for r in refs])
        self.encoded_on_miss += lazy.decoded
        return out

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.predictor.embedder.texts(list(texts))

    def corpus(self, split: str) -> PairFeatures:
        if split not in self._corpus:
            from mmapp.data.pairs import read_pairs
            from mmapp.pipeline import dataset_dir, embed_pairs

            self._corpus[split] = embed_pairs(self.predictor.embedder,
                                              read_pairs(dataset_dir(self.config) / f"{split}.tsv")).features
        return self._corpus[split]

    def memes(self) -> MemeSet | None:
        if self._memes is None:
            from mmapp.pipeline import meme_features

            m = meme_features(self.predictor, self.config, progress=False)
            self._memes = MemeSet(m.image, m.text, m.labels, m.splits)
        return self._memes

    def guard(self) -> PairFeatures | None:
        from mmapp.pipeline import PHOTOS_TSV, embed_pairs_file

        if not PHOTOS_TSV.is_file():
            return None
        return embed_pairs_file(self.predictor.embedder, PHOTOS_TSV).features
