"""The model server: captioning, meme analysis with modality ablation, one loaded model version.

Takes the frozen towers (:class:`mmapp.towers.Towers`, where device and dtype are chosen), keeps the
caption bank embedded, and swaps model versions without a restart (``load_version``).
No training, no database, no UI: callers pass decoded images and store what they want.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mmapp.batching import MicroBatcher
from mmapp.cache import text_key
from mmapp.captioning import (CaptionPolicy, PhraseSpace, QuotedWords, compose_caption, picture_halves,
                              same_saying, template_caption)
from mmapp.config import Config
from mmapp.device import cuda_auto_setting, resolve_placement
from mmapp.embedder import Embedder
from mmapp.encoders import ImageFeatures
from mmapp.encoders.image import imagenet_class_names
from mmapp.imageio import DecodedImage
from mmapp.joint import JointSpace
from mmapp.model_store import BRIDGE, ModelStore, ModelVersion, VersionMeta
from mmapp.text_features import meme_text_features
from mmapp.towers import Towers

ABLATIONS = (None, "image", "text")  # what is removed: nothing, the image, the text
LABEL_TEMPLATES = ("a photo of a {}.",)
UNCALIBRATED_TEMPERATURE = 0.1  # softmax temperature when a version has none fitted (the bridge)
AGREE_COS = 0.7  # MiniLM cosine above which two captions count as the same description


@dataclass(frozen=True)
class CaptionResult:
    caption: str
    alternatives: list[tuple[str, float]]  # (caption, confidence) for the next candidates
    confidence: float  # calibrated probability mass of the top caption among the candidates
    low_confidence: bool  # True when the match is weak: the UI must say so
    source: str  # where the top caption came from: "bank" | "correction" | "imagenet" | "composed" (two concepts) | "ocr"
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    embedding_ref: str = ""


@dataclass(frozen=True)
class MemeResult:
    text: str  # the text used (OCR or user-supplied)
    ocr_text: str | None  # what OCR read (None when the caller supplied the text)
    labels: tuple[str, ...]
    fused: dict[str, float]  # label -> probability with both modalities
    image_only: dict[str, float]
    text_only: dict[str, float]
    label: str  # predicted label under the requested ablation
    ablation: str | None  # None | "image" | "text": the modality removed for `label`
    deltas: dict[str, float]  # how removing each modality changes the predicted label's probability
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    embedding_ref: str = ""


def generative_captioner(config: Config):
    """The configured generative captioner (``model.captioner``), or None; a missing folder fails here, at start."""
    if not config.model.captioner:
        return None
    if config.model.captioner != "hf":
        raise ValueError(f"unknown model.captioner {config.model.captioner!r}; valid: '' (retrieval only), 'hf'")
    from mmapp.captioner import GenerativeCaptioner

    return GenerativeCaptioner(config.model.captioner_path, placement=resolve_placement(config.model.device),
                               max_new_tokens=config.model.captioner_max_new_tokens,
                               num_beams=config.model.captioner_num_beams)


def batching_wanted(setting: str, image_encoder) -> bool:
    """``model.batch_images``: on, off, or auto = on when the image tower runs on CUDA. On two CPU cores
    a batch costs as much per picture as single calls (docs/results.md, "Load test (issue 13)")."""
    return cuda_auto_setting(setting, getattr(image_encoder, "placement", None), knob="model.batch_images")


class Predictor:
    caption_policy: CaptionPolicy = CaptionPolicy()  # wording knobs (mmapp.captioning), chosen on the guard photos
    compose_captions: bool = True  # False: serve the top bank entry as is (the old behaviour, for benchmarks)

    def __init__(self, *, towers: Towers, store: ModelStore, caption_bank: Sequence[tuple[str, str]] = (),
                 confidence_floor: float = 0.1, captioner=None):
        self.towers = towers
        self.captioner = captioner  # a GenerativeCaptioner, or None: captions come from the bank only
        self.store = store
        self.confidence_floor = confidence_floor
        self._lock = threading.RLock()
        self._model: ModelVersion | None = None
        self._bank_texts: list[str] = []
        self._bank_sources: list[str] = []
        self._bank_views: dict[str, torch.Tensor] = {}
        self._bank_raw: torch.Tensor | None = None
        self._pending_bank = list(caption_bank)
        self.image_batcher: MicroBatcher | None = None  # set by enable_batching: concurrent tower calls share one
        self._phrase_space: PhraseSpace | None = None  # text-tower embeddings of class/group phrases, built once

    def enable_batching(self, *, max_size: int, max_wait_ms: float) -> None:
        """Run the image tower of concurrent requests as one batch (``model.batch_images``)."""
        self.image_batcher = MicroBatcher(self._encode_batch, max_size=max_size, max_wait_ms=max_wait_ms,
                                          name="image-tower")

    def encode_images(self, images: list) -> ImageFeatures:
        """The image tower on ``images`` (PIL), joined with other requests' pictures when batching is on."""
        if self.image_batcher is None:
            return self.embedder.image_encoder.encode(images)
        return self.image_batcher.submit(images)

    def _encode_batch(self, jobs: list[list]) -> list[ImageFeatures]:
        """One tower call for every job's pictures; each job gets its own rows back."""
        out = self.embedder.image_encoder.encode([image for job in jobs for image in job])
        results, start = [], 0
        for job in jobs:
            end = start + len(job)
            results.append(ImageFeatures(out.features[start:end],
                                         out.class_probs[start:end] if out.class_probs is not None else None))
            start = end
        return results

    def image_features(self, image: DecodedImage) -> ImageFeatures:
        """Features of one decoded picture: the embedding cache, else the (batched) tower."""
        return self.embedder.images([image.image], [image.sha256], encode=self.encode_images)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config, *, version: str | None = None, towers: Towers | None = None,
                    caption_bank: Sequence[tuple[str, str]] = ()) -> "Predictor":
        """Serve ``version`` (default: the derived ``current.json`` pointer, else the bridge)."""
        towers = towers or Towers.from_config(config)
        predictor = cls(towers=towers, store=ModelStore(config.paths.models),
                        caption_bank=caption_bank, confidence_floor=config.model.caption_confidence_floor,
                        captioner=generative_captioner(config))
        predictor.load_version(version or predictor.store.current() or BRIDGE)
        if batching_wanted(config.model.batch_images, towers.embedder.image_encoder):
            predictor.enable_batching(max_size=config.model.batch_max_size, max_wait_ms=config.model.batch_max_wait_ms)
        return predictor

    @property
    def embedder(self) -> Embedder:
        return self.towers.embedder

    @property
    def version(self) -> str:
        return self._model.version if self._model else BRIDGE

    @property
    def labels(self) -> tuple[str, ...]:
        return self._model.labels if self._model else ()

    @property
    def space(self) -> JointSpace:
        return self._model.space if self._model else self.towers.bridge_space()

    def load_version(self, version: str, *, expected_sha256: str | None = None) -> None:
        """Load ``version`` (or the bridge) and project the caption bank into its space; atomic for readers.
        ``expected_sha256``: the registry's hash of the weights, verified before anything is swapped in."""
        if version == BRIDGE:
            model = ModelVersion(BRIDGE, self.towers.bridge_space(), None, None, VersionMeta())
        else:
            model = self.store.load(version, expected_sha256=expected_sha256)
            identity = model.meta.encoders
            if identity and identity != self.embedder.identity:
                raise ValueError(f"model version {version!r} was trained on encoders {identity}, "
                                 f"but this server runs {self.embedder.identity}")
        delta = model.captioner_delta if self.captioner is not None else None
        if delta is not None and model.meta.captioner.get("base") != self.captioner.identity:
            raise ValueError(f"model version {version!r} fine-tuned the captioner {model.meta.captioner.get('base')}, "
                             f"but this server runs {self.captioner.identity}")
        with self._lock:
            if self.captioner is not None:  # base + the version's decoder delta (or the base alone)
                self.captioner.set_delta(delta, name=version if delta is not None else None)
            self._model = model
            if self._bank_raw is None or self._pending_bank:
                bank = list(zip(self._bank_texts, self._bank_sources)) + self._pending_bank
                self._pending_bank = []
                self._set_bank(bank)
            else:  # same texts, new projections: no need to read 3,500 embeddings back from the cache
                self._bank_views = model.space.text_views(self._bank_raw)

    # ---- caption bank -------------------------------------------------------------------------
    def set_caption_bank(self, captions: Sequence[tuple[str, str]]) -> None:
        """Replace the bank with (caption, source) pairs; ImageNet templates are always added."""
        with self._lock:
            self._set_bank(list(captions))

    def add_to_caption_bank(self, captions: Sequence[tuple[str, str]]) -> None:
        """Append (caption, source) pairs the bank lacks (whitespace-normalised), embedded in one batch."""
        with self._lock:
            new: dict[str, str] = {}
            for text, source in captions:
                text = " ".join(text.split())
                if text and text not in new and text not in self._bank_texts:
                    new[text] = source
            if not new:
                return
            raw = self.embedder.texts(list(new))
            self._bank_texts = self._bank_texts + list(new)  # new lists: a caption() snapshot stays consistent
            self._bank_sources = self._bank_sources + list(new.values())
            self._bank_raw = torch.cat([self._bank_raw, raw]) if self._bank_raw is not None else raw
            views = self.space.text_views(raw)
            self._bank_views = {k: torch.cat([self._bank_views[k], v]) for k, v in views.items()} \
                if self._bank_views else views

    def _set_bank(self, captions: list[tuple[str, str]]) -> None:
        seen: dict[str, str] = {}
        for text, source in captions:
            text = " ".join(text.split())
            if text and text not in seen:
                seen[text] = source
        # ImageNet class prompts: with ConSE towers, and with pre-aligned towers (their native cosine
        # ranks prompts zero-shot, as CLIP does)
        if self.towers.shares_embedding_space or self.towers.class_text() is not None:
            for name in imagenet_class_names():
                seen.setdefault(template_caption(name), "imagenet")
        self._bank_texts = list(seen)
        self._bank_sources = list(seen.values())
        self._bank_raw = self.embedder.texts(self._bank_texts) if self._bank_texts else None
        self._bank_views = self.space.text_views(self._bank_raw) if self._bank_raw is not None else {}

    # ---- inference ----------------------------------------------------------------------------
    def caption(self, image: DecodedImage, *, k: int = 4) -> CaptionResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with self._lock:  # one consistent version + bank; the encoding below runs outside the lock
            model, bank_views, texts, sources = self._model, self._bank_views, self._bank_texts, self._bank_sources
            bank_raw = self._bank_raw
        if not texts:
            raise RuntimeError("the caption bank is empty: build the bootstrap model first (python app.py does)")
        feats = self.image_features(image)
        views = model.space.image_views(feats.features, feats.class_probs)
        timings["encode_image"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        scores = model.space.similarity(views, bank_views)[0]  # (N_bank,)
        fitted = model.meta.caption_temperature
        temperature = float(fitted if fitted is not None else UNCALIBRATED_TEMPERATURE)
        probs = torch.softmax(scores / temperature, dim=0)
        top = probs.topk(min(k, len(texts)))
        idx = top.indices.tolist()
        # Confidence = probability mass on captions that say the same thing as the top one (raw text
        # cosine >= AGREE_COS): a bank full of near-synonyms ("tiger cat", "tiger, a big cat") must not
        # split the mass of one right answer, while an image matching nothing spreads it thin.
        agree = (bank_raw @ bank_raw[idx[0]]) >= AGREE_COS  # (N_bank,)
        confidence = float(probs[agree].sum().clamp(max=1.0))
        caption, source = texts[idx[0]], sources[idx[0]]
        alternatives = [(texts[i], float(probs[i])) for i in idx[1:]]
        low_confidence = confidence < self.confidence_floor
        timings["rank"] = (time.perf_counter() - t1) * 1e3
        if self.captioner is not None:
            # generated caption first, the bank's best matches beside it; an empty generation
            # (nothing but special tokens) falls back to the bank
            t2 = time.perf_counter()
            generated = self.captioner.generate([image.image])[0]
            timings["generate"] = (time.perf_counter() - t2) * 1e3
            if generated.text:
                return CaptionResult(
                    caption=generated.text, alternatives=[(texts[i], float(probs[i])) for i in idx],
                    confidence=generated.confidence, low_confidence=generated.confidence < self.confidence_floor,
                    source="generated", model_version=model.version, timings_ms=timings,
                    embedding_ref=self.embedder.cache.ref(self.embedder.image_encoder.identity, image.sha256)
                    if self.embedder.cache else "")
        if self.compose_captions and feats.class_probs is not None:
            t2 = time.perf_counter()
            words = self._compose(scores, probs, texts, sources, feats.class_probs[0], image, confidence)
            caption, source = words.caption, words.source
            # The wording's next concept first, then the served ranking (users' corrections among it).
            ranked = (words.alternatives[:1] + [(texts[i], float(probs[i])) for i in idx if sources[i] != "imagenet"]
                      + words.alternatives[1:])
            backfill = [(texts[i], float(probs[i])) for i in probs.topk(min(len(texts), 4 * k)).indices.tolist()]
            alternatives, said = [], {same_saying(caption)}
            for text, conf in ranked + backfill:  # the served ranking fills what the wording did not offer
                key = same_saying(text)  # "a photo of a bee." and the bank's "a bee" are one offer
                if key not in said:
                    said.add(key)
                    alternatives.append((text, conf))
            alternatives = alternatives[:k - 1]
            confidence = words.confidence if words.source in ("imagenet", "composed", "ocr") else confidence
            low_confidence = words.hedged or confidence < self.confidence_floor
            timings["compose"] = (time.perf_counter() - t2) * 1e3  # halves of the picture; OCR for pictures of text
        return CaptionResult(
            caption=caption, alternatives=alternatives, confidence=confidence, low_confidence=low_confidence,
            source=source, model_version=model.version, timings_ms=timings,
            embedding_ref=self.embedder.cache.ref(self.embedder.image_encoder.identity, image.sha256)
            if self.embedder.cache else "")

    def _compose(self, scores, probs, texts, sources, class_probs, image: DecodedImage, bank_confidence: float):
        """The served wording (mmapp.captioning): ImageNet concepts, or the bank when it leads clearly."""
        is_template = torch.tensor([s == "imagenet" for s in sources])
        bank_best = imagenet_best = None
        if bool((~is_template).any()):
            i = int(scores.masked_fill(is_template, -float("inf")).argmax())
            bank_best = (texts[i], sources[i], float(scores[i]))
        if bool(is_template.any()):
            imagenet_best = float(scores.masked_fill(~is_template, -float("inf")).max())
        policy = self.caption_policy
        extra = []
        if policy.mbr_temperature > 0 and policy.mbr_bank > 0 and bool((~is_template).any()):
            bank_raw = self._bank_raw
            top = scores.masked_fill(is_template, -float("inf")).topk(min(policy.mbr_bank, int((~is_template).sum())))
            extra = [(texts[i], bank_raw[i].numpy()) for i in top.indices.tolist()]
        return compose_caption(class_probs.numpy(), image.image, bank_best=bank_best,
                               imagenet_best_score=imagenet_best, policy=policy,
                               bank_confidence=bank_confidence, served_confidence_low=bank_confidence < self.confidence_floor,
                               read_text=lambda until: self.read_text(image, until),
                               phrase_space=self.phrase_space() if policy.mbr_temperature > 0 else None, mbr_extra=extra,
                               part_probs=lambda: self.encode_images(picture_halves(image.image)).class_probs.numpy())

    def phrase_space(self) -> PhraseSpace:
        """Class and WordNet-group phrases embedded by the served text tower (once: the tower never changes)."""
        with self._lock:
            if self._phrase_space is None:
                # the fixed phrases through the embedding cache; caption-time sentences ("a X or a Y") straight
                # through the tower, so serving does not grow the cache
                self._phrase_space = PhraseSpace.build(
                    lambda texts: self.embedder.texts(texts).float().numpy(),
                    embed=lambda texts: self.embedder.text_encoder.encode(list(texts)).float().numpy())
            return self._phrase_space

    def read_text(self, image: DecodedImage, until: QuotedWords | None = None) -> str:
        """OCR text (cached by image content; ``until``: stop early; see :meth:`Towers.read_text`)."""
        return self.towers.read_text(image, until)

    def analyze_meme(self, image: DecodedImage, text: str | None = None, *,
                     ablate: str | None = None) -> MemeResult:
        if ablate not in ABLATIONS:
            raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
        timings: dict[str, float] = {}
        ocr_text = None
        if text is None:
            t = time.perf_counter()
            ocr_text = self.read_text(image)
            timings["ocr"] = (time.perf_counter() - t) * 1e3
            text = ocr_text
        with self._lock:
            model = self._model
        if model is None or model.fusion_head is None:
            raise RuntimeError(f"model version {self.version!r} has no meme head: build the bootstrap model first")
        t = time.perf_counter()
        feats = self.image_features(image)
        timings["encode_image"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        # the head's text input, as its version was trained (mmapp.text_features; "" = embedding alone)
        text_emb = meme_text_features([text], model.meta.meme_text_features, self.embedder.texts) \
            if text.strip() else None
        timings["encode_text"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        with torch.inference_mode():
            head = model.fusion_head
            img = feats.features
            fused = head(img, text_emb).logits.softmax(-1)[0] if text_emb is not None else None
            image_only = head(img, None).logits.softmax(-1)[0]
            text_only = head(None, text_emb).logits.softmax(-1)[0] if text_emb is not None else None
        timings["fusion"] = (time.perf_counter() - t) * 1e3
        labels = model.labels
        as_dict = lambda p: {l: float(v) for l, v in zip(labels, p)} if p is not None else {}
        # Without text there is nothing to fuse: the fused view is the image-only one.
        fused_d, image_d, text_d = as_dict(fused if fused is not None else image_only), as_dict(image_only), as_dict(text_only)
        chosen = {None: fused_d, "image": text_d or fused_d, "text": image_d}[ablate]
        label = max(chosen, key=chosen.get)
        top = max(fused_d, key=fused_d.get)
        deltas = {"without_image": (text_d.get(top, fused_d[top]) - fused_d[top]),
                  "without_text": image_d[top] - fused_d[top]}
        return MemeResult(text=text, ocr_text=ocr_text, labels=labels, fused=fused_d, image_only=image_d,
                          text_only=text_d, label=label, ablation=ablate, deltas=deltas,
                          model_version=model.version, timings_ms=timings,
                          embedding_ref=(self.embedder.cache.ref(self.embedder.image_encoder.identity, image.sha256)
                                         + ";" + self.embedder.cache.ref(self.embedder.text_encoder.identity, text_key(text)))
                          if self.embedder.cache else "")
