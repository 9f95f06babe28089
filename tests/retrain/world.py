"""A tiny synthetic world for retrain tests: concepts with image and text prototypes, a bootstrap
corpus of some of them, a bootstrap model trained on it, and helpers that put user feedback into a
real SQLite database. Seeded, CPU, well under a second to build.

Concepts 0..N_CORPUS-1 are in the bootstrap corpus; the others appear only in users' corrections,
so a retrain on them has something to learn (the flywheel in miniature).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import init_db, make_engine
from mmapp.config import load_config
from mmapp.encoders import ImageFeatures
from mmapp.joint import AlignmentConfig, AlignmentModel, JointSpace
from mmapp.model_store import ModelStore, VersionMeta
from mmapp.training import MemeExamples, PairFeatures, train_alignment, train_fusion_head, with_centers
from retrain.features import ImageRef

D_IMG, D_TXT, N_CONCEPTS, N_CORPUS = 32, 16, 30, 24
LABELS = ("positive", "sarcastic", "dark humor")
IDENTITY = {"image": "synthetic-image@1", "text": "synthetic-text@1"}
_requests = itertools.count()


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def image_sha(concept: int, i: int) -> str:
    return hashlib.sha256(f"concept{concept}-image{i}".encode()).hexdigest()


def caption(concept: int, i: int) -> str:
    return f"a drawing of concept {concept} number {i}"


@dataclass
class SyntheticSource:
    """A FeatureSource: image features by sha (registered concepts), text features from the caption."""

    registry_path: Path | None = None  # sha -> concept, shared with subprocesses
    identity: dict = field(default_factory=lambda: dict(IDENTITY))
    encoded_on_miss: int = 0

    def __post_init__(self) -> None:
        g = np.random.default_rng(1234)
        self.txt_proto = g.normal(size=(N_CONCEPTS, D_TXT)).astype(np.float32)
        # Images follow their text through one shared map plus a concept-specific part, so a model
        # trained on some concepts transfers partly to unseen ones (as real towers do).
        shared = g.normal(size=(D_TXT, D_IMG)).astype(np.float32) / np.sqrt(D_TXT)
        own = g.normal(size=(N_CONCEPTS, D_IMG)).astype(np.float32)
        self.img_proto = (2 * (self.txt_proto @ shared) + 0.5 * own).astype(np.float32)
        self.concept_of: dict[str, int] = {}
        if self.registry_path is not None and self.registry_path.is_file():
            self.concept_of = json.loads(self.registry_path.read_text())

    def register(self, concept: int, i: int) -> str:
        sha = image_sha(concept, i)
        self.concept_of[sha] = concept
        if self.registry_path is not None:
            self.registry_path.write_text(json.dumps(self.concept_of))
        return sha

    def image_vec(self, sha: str) -> np.ndarray:
        concept = self.concept_of.get(sha)
        noise = _rng(sha).normal(size=D_IMG).astype(np.float32)
        if concept is None:
            self.encoded_on_miss += 1
            return noise
        return self.img_proto[concept] + 0.6 * noise

    def text_vec(self, text: str) -> np.ndarray:
        noise = _rng("t:" + text).normal(size=D_TXT).astype(np.float32)
        words = text.split()
        if "concept" in words:
            k = int(words[words.index("concept") + 1])
            return self.txt_proto[k] + 0.4 * noise
        return noise

    def images(self, refs) -> ImageFeatures:
        return ImageFeatures(torch.from_numpy(np.stack([self.image_vec(r.sha256) for r in refs])), None)

    def texts(self, texts) -> torch.Tensor:
        return F.normalize(torch.from_numpy(np.stack([self.text_vec(t) for t in texts])), dim=-1)

    def corpus(self, split: str) -> PairFeatures:
        offset, per_concept = {"train": (0, 10), "val": (1000, 4), "test": (2000, 5)}[split]
        shas, caps = [], []
        for k in range(N_CORPUS):
            for i in range(offset, offset + per_concept):
                self.concept_of[image_sha(k, i)] = k
                shas.append(image_sha(k, i))
                caps.append(caption(k, i))
        img = self.images([ImageRef(s) for s in shas])
        return PairFeatures(img.features, None, self.texts(caps), np.arange(len(shas)))

    def memes(self) -> MemeExamples:
        g = np.random.default_rng(7)
        n = 240
        ci, ct = g.integers(0, N_CORPUS, n), g.integers(0, N_CORPUS, n)
        image = torch.from_numpy(np.stack([self.img_proto[k] + 0.6 * g.normal(size=D_IMG) for k in ci]).astype(np.float32))
        text = self.texts([f"meme about concept {k} take {j}" for j, k in enumerate(ct)])
        labels = torch.as_tensor((ct + (ci >= N_CORPUS // 2)) % len(LABELS))  # depends on both modalities
        splits = np.array(["train"] * 160 + ["val"] * 40 + ["test"] * 40)
        return MemeExamples(image, text, labels, splits, np.array(["bootstrap"] * n))

    def report_photos(self) -> PairFeatures:
        """Stands in for the held-out real photos (reported, never gated)."""
        return self.corpus("test")

    def guard(self) -> PairFeatures:
        """Stands in for the real photos (no bridge here, so no score mix is chosen against it)."""
        return self.corpus("val")


def make_config(home: Path, *, finetune: dict | None = None, **retrain):
    """Settings for tests: few epochs, few bootstrap resamples (override any ``retrain.*`` by keyword)."""
    # 120 test pairs resolve R@1 in steps of 0.008: a tolerance of 0.01 would be one query.
    # The synthetic users have no accounts; "open" keeps them counting as raters (tests of the trust
    # rules set anonymous_rule themselves).
    retrain = {"replay_size": 120, "min_new_items": 1, "cron": "0 3 * * *", "tolerance": 0.05, "n_bootstrap": 50,
               "anonymous_rule": "open", **retrain}
    return load_config("offline", env={}, storage={"home": str(home)}, retrain=retrain,
                       finetune={"epochs": 6, "fusion_epochs": 6, **(finetune or {})},
                       train={"epochs": 15, "batch_size": 64, "lr": 3e-3, "seed": 0})


def build_bootstrap_home(home: Path, source: SyntheticSource) -> None:
    """Train a bootstrap model on the synthetic corpus, save it as current, create the database."""
    torch.manual_seed(0)
    config = make_config(home)
    train, val = source.corpus("train"), source.corpus("val")
    init = AlignmentModel(AlignmentConfig(image_dim=D_IMG, text_dim=D_TXT, joint_dim=16, hidden_dim=64))
    result = train_alignment(train, val, class_text=None, top_t=10, config=config.train, joint_dim=16, init=init)
    space = with_centers(JointSpace(None, 10, result.model, mix=0.0), train)
    memes = source.memes()
    tr, va = (torch.as_tensor(memes.split == s) for s in ("train", "val"))
    fusion = train_fusion_head("concat", memes.image[tr], memes.text[tr], memes.labels[tr], num_labels=len(LABELS),
                               config=config.train, val=(memes.image[va], memes.text[va], memes.labels[va]), epochs=10)
    store = ModelStore(home / "models")
    store.save("bootstrap", space, meta=VersionMeta(labels=LABELS, encoders=IDENTITY, caption_temperature=0.05),
               fusion_head=fusion.head, fusion_config=fusion.config, fusion_name="concat")
    store.set_current("bootstrap")
    engine = make_engine(f"sqlite:///{home / 'mmapp.db'}")
    init_db(engine)
    engine.dispose()


def add_feedback(engine: Engine, source: SyntheticSource, *, concept: int, i: int, user: str,
                 text: str | None = None, field: str = "caption", kind: str = "caption",
                 label: str | None = None, meme_text: str | None = None) -> int:
    """An upload + prediction + correction, as the app would store them; returns the correction id."""
    sha = source.register(concept, i)
    with Session(engine) as s, s.begin():
        repo.record_upload(s, sha256=sha, relpath=f"{sha[:2]}/{sha}.png", format="png", width=8, height=8, n_bytes=10)
        outputs = {"caption": "something else"} if kind == "caption" else {"label": "positive", "scores": {}}
        p = repo.record_prediction(s, request_id=f"p-{next(_requests)}-{sha[:8]}-{user}", kind=kind, image_sha256=sha,
                                   model_version="bootstrap", outputs=outputs, latency_ms=1.0, session_id=f"s-{user}",
                                   user=user, input_text=meme_text)
        value = label if field == "label" else (text if text is not None else caption(concept, i))
        c = repo.record_correction(s, request_id=f"c-{next(_requests)}", prediction_id=p.id, field=field,
                                   value=value, session_id=f"s-{user}", user=user)
        return c.id


def add_rated_caption(engine: Engine, source: SyntheticSource, *, concept: int, i: int, scores: dict[str, int],
                      version: str = "bootstrap") -> int:
    """A caption prediction rated by several users (user -> 1..5 on every score); returns its id."""
    sha = source.register(concept, i)
    with Session(engine) as s, s.begin():
        repo.record_upload(s, sha256=sha, relpath=f"{sha[:2]}/{sha}.png", format="png", width=8, height=8, n_bytes=10)
        p = repo.record_prediction(s, request_id=f"p-{next(_requests)}", kind="caption", image_sha256=sha,
                                   model_version=version, outputs={"caption": caption(concept, i)}, latency_ms=1.0,
                                   session_id="s-first", user=None)
        for user, score in scores.items():
            repo.record_rating(s, request_id=f"r-{next(_requests)}", prediction_id=p.id, session_id=f"s-{user}",
                               user=user, coherence=score, relevance=score, detail=max(1, score - 1))
        return p.id


def feed_new_concepts(engine: Engine, source: SyntheticSource, n: int, *, users: int = 12, start: int = 0) -> None:
    """``n`` honest caption corrections of the concepts the bootstrap never saw, from many users."""
    for j in range(start, start + n):
        concept = N_CORPUS + j % (N_CONCEPTS - N_CORPUS)
        add_feedback(engine, source, concept=concept, i=5000 + j, user=f"user{j % users}")


def feed_poison(engine: Engine, source: SyntheticSource, n: int, *, users: int = 12, start: int = 0) -> None:
    """``n`` corrections whose captions are random text (no concept)."""
    for j in range(start, start + n):
        concept = N_CORPUS + j % (N_CONCEPTS - N_CORPUS)
        add_feedback(engine, source, concept=concept, i=9000 + j, user=f"troll{j % users}",
                     text=f"totally unrelated words {j} zebra lamp")
