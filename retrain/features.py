"""Where a retrain gets its tower features: the embedding cache, never a fresh encode when avoidable.

:class:`FeatureSource` is what the job needs; :class:`TowerFeatureSource` serves it from
:class:`mmapp.towers.Towers` (the app's, shared read-only, or ones the CLI builds). Uploaded images are
looked up in the cache by the sha256 the prediction stored; only a cache miss decodes the blob and
runs the image tower. Tests inject a synthetic source instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from mmapp.encoders import ImageFeatures
from mmapp.training import MemeExamples, PairFeatures


@dataclass(frozen=True)
class ImageRef:
    sha256: str  # content hash: the embedding cache key
    path: Path | None = None  # the blob to decode on a cache miss


class FeatureSource(Protocol):
    identity: dict[str, str]  # encoder identities; a model trained on other encoders is refused

    def images(self, refs: Sequence[ImageRef]) -> ImageFeatures: ...

    def texts(self, texts: Sequence[str]) -> torch.Tensor: ...  # (B, D_txt) unit norm

    def corpus(self, split: str) -> PairFeatures: ...  # a split of the bootstrap corpus

    def memes(self, text_features: str = "") -> MemeExamples | None: ...  # the bootstrap meme set (every split)

    def guard(self) -> PairFeatures: ...  # real photos the served score mix must not worsen

    def report_photos(self) -> PairFeatures | None: ...  # real photos no choice sees (reported only)


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
class TowerFeatureSource:
    """Features through the towers' embedder (cached by content hash) and the bootstrap dataset files."""

    towers: object  # mmapp.towers.Towers
    config: object  # mmapp.config.Config
    encoded_on_miss: int = 0  # uploads that had to be decoded and encoded (cache misses)
    _corpus: dict[str, PairFeatures] = field(default_factory=dict, repr=False)
    _memes: dict[str, MemeExamples] = field(default_factory=dict, repr=False)

    @property
    def identity(self) -> dict[str, str]:
        return self.towers.identity

    def images(self, refs: Sequence[ImageRef]) -> ImageFeatures:
        lazy = _LazyImages(refs)
        out = self.towers.embedder.images(lazy, [r.sha256 for r in refs])
        self.encoded_on_miss += lazy.decoded
        return out

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.towers.embedder.texts(list(texts))

    def corpus(self, split: str) -> PairFeatures:
        if split not in self._corpus:
            from mmapp.data.pairs import read_pairs
            from mmapp.pipeline import embed_pairs

            self._corpus[split] = embed_pairs(self.towers.embedder,
                                              read_pairs(self.config.paths.dataset() / f"{split}.tsv")).features
        return self._corpus[split]

    def memes(self, text_features: str = "") -> MemeExamples | None:
        """The bootstrap meme set with the text side a head of kind ``text_features`` reads
        (``mmapp.text_features``; "" = the tower embedding alone, as versions before it were trained)."""
        if text_features not in self._memes:
            from mmapp.pipeline import meme_examples

            self._memes[text_features] = meme_examples(self.towers, self.config, progress=False,
                                                       text_features=text_features)
        return self._memes[text_features]

    def guard(self) -> PairFeatures:
        from mmapp.pipeline import guard_pairs

        return guard_pairs(self.config, self.towers.embedder)

    def report_photos(self) -> PairFeatures | None:
        from mmapp.pipeline import report_pairs

        return report_pairs(self.config, self.towers.embedder)
