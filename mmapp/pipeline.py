"""Workflows over the library pieces: import the corpus, embed pairs, evaluate, build the bootstrap version.

These are the functions the CLI (``python -m mmapp``), the app's start-up and the retrain job call.
Training itself is :mod:`mmapp.training` (the one recipe); the towers are :class:`mmapp.towers.Towers`.
Saving a version is here; making it current is the registry's job (``retrain.promotion``).
No database and no UI here.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmapp.config import Config, redacted
from mmapp.data.pairs import Pair, read_pairs, write_pairs_tsv
from mmapp.device import seed_everything
from mmapp.evaluation import classification_metrics, retrieval_metrics, select_candidates, subsample_candidates
from mmapp.joint import JointSpace
from mmapp.model_store import BRIDGE, ModelStore, VersionMeta
from mmapp.towers import Towers
from mmapp.training import FittedSpace, MemeExamples, PairFeatures, SpaceData, fit_meme_head, fit_space

VAL_FRACTION, TEST_FRACTION = 0.1, 0.45


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- corpus import -----------------------------------------------------------------------------

def import_openclipart(config: Config, *, progress: bool = True) -> dict[str, Path]:
    """Fetch (apt) and filter the Open Clip Art corpus; write train/val/test TSVs and items.jsonl."""
    from mmapp.data.openclipart import ensure_openclipart, load_openclipart

    root = ensure_openclipart(config.paths.corpus, progress=progress)
    # ~2.5k drawings survive the filters; a held-out test split of >= 1000 pairs needs ~45% of them.
    items, report = load_openclipart(root, val=VAL_FRACTION, test=TEST_FRACTION, progress=progress)
    out = config.paths.dataset()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val", "test"):
        pairs = [Pair(image_path=Path(i.png_path), caption=i.caption, group=i.item_id, source=i.item_id)
                 for i in items if i.split == split]
        paths[split] = out / f"{split}.tsv"
        write_pairs_tsv(pairs, paths[split])
    tmp = out / ".items.jsonl.tmp"
    with open(tmp, "w") as fh:
        for i in items:
            fh.write(json.dumps({"item_id": i.item_id, "png_path": str(i.png_path), "category": i.category,
                                 "title": i.title, "keywords": list(i.keywords), "caption": i.caption,
                                 "split": i.split}) + "\n")
    os.replace(tmp, out / "items.jsonl")
    (out / "filter_report.json").write_text(json.dumps({
        "kept": report.kept, "paths": report.paths, "drawings": report.drawings,
        "dropped": dict(report.dropped), "splits": dict(report.splits),
        "examples": {k: list(v) for k, v in report.examples.items()}}, indent=2, default=str))
    paths["items"] = out / "items.jsonl"
    return paths


def load_items(config: Config) -> list[dict]:
    path = config.paths.dataset() / "items.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- features ----------------------------------------------------------------------------------

@dataclass
class EmbeddedPairs:
    features: PairFeatures
    image_paths: list[Path]
    image_keys: list[str]
    captions: list[str]


def embed_pairs(embedder, pairs: Sequence[Pair], *, progress: bool = False) -> EmbeddedPairs:
    """Cached tower features for pairs; several captions of one image share one image row."""
    if not pairs:
        raise ValueError("no pairs to embed")
    image_index: dict[Path, int] = {}
    for p in pairs:
        image_index.setdefault(Path(p.image_path), len(image_index))
    image_paths = list(image_index)
    img, keys = embedder.image_files(image_paths, progress=progress)
    captions = [p.caption for p in pairs]
    text = embedder.texts(captions, progress=progress)
    t2i = np.array([image_index[Path(p.image_path)] for p in pairs], dtype=np.int64)
    return EmbeddedPairs(PairFeatures(img.features, img.class_probs, text, t2i), image_paths, keys, captions)


def embed_pairs_file(embedder, path: Path, *, progress: bool = False) -> EmbeddedPairs:
    return embed_pairs(embedder, read_pairs(Path(path)), progress=progress)


def guard_pairs(config: Config, embedder, *, path: Path | None = None) -> PairFeatures:
    """The real-photo guard set (``data.guard_photos``, shipped with the app): every score mix is
    checked against it. Missing is an error, never a silent skip."""
    path = Path(path or config.data.guard_photos)
    if not path.is_file():
        raise FileNotFoundError(f"the real-photo guard set {path} is missing (data.guard_photos): the score mix "
                                "cannot be checked against real photos without it")
    return embed_pairs_file(embedder, path).features


def report_pairs(config: Config, embedder) -> PairFeatures | None:
    """The real-photo report set (``data.report_photos``): evaluated and reported, never used for a
    choice (score mix, gate, caption wording). None when the file is absent (an install without it)."""
    path = Path(config.data.report_photos)
    return embed_pairs_file(embedder, path).features if path.is_file() else None


# ---- evaluation --------------------------------------------------------------------------------

def evaluate_retrieval(space: JointSpace, feats: PairFeatures, *, max_images: int = 1000,
                       n_bootstrap: int = 1000, seed: int = 0, mix: float | None = None) -> dict:
    """R@1/5/10 both ways, median rank, bootstrap 95% intervals, over at most ``max_images`` candidates.

    ``mix`` overrides the served score mix for every image (e.g. 0.0: projections only)."""
    n_img = feats.image_features.shape[0]
    idx = subsample_candidates(n_img, max_images=max_images, seed=seed)
    text_idx, t2i = select_candidates(idx, feats.text_to_image)
    img_views = space.image_views(feats.image_features[idx],
                                  None if feats.class_probs is None else feats.class_probs[idx])
    txt_views = space.text_views(feats.text[text_idx])
    sim = space.similarity(img_views, txt_views, mix=mix).numpy()
    report = retrieval_metrics(sim, t2i, n_bootstrap=n_bootstrap, seed=seed).to_dict()
    report["n_images_total"] = int(n_img)
    return report


def resolve_space(towers: Towers, store: ModelStore, model: str) -> tuple[str, JointSpace]:
    """'bridge'/'baseline' (the zero-training baseline, ConSE or native), 'native' (pre-aligned
    towers' own cosine), 'current' (the derived pointer) or a version name -> (version, JointSpace)."""
    if model in (BRIDGE, "baseline"):
        return BRIDGE, towers.bridge_space()
    if model == "native":
        if not towers.shares_embedding_space:
            raise ValueError("--model native needs pre-aligned towers (e.g. the clip profile); these towers "
                             f"({', '.join(towers.identity.values())}) do not share an embedding space: use 'bridge'")
        return "native", towers.bridge_space()
    version = store.current() if model == "current" else model
    if version is None:
        raise ValueError("no current model version yet: run `python -m mmapp build-bootstrap` (or python app.py)")
    return version, store.load(version).space


# ---- training ----------------------------------------------------------------------------------

def fit_corpus_space(towers: Towers, config: Config, train: PairFeatures, val: PairFeatures,
                     guard: PairFeatures | None, *, progress: bool = True) -> FittedSpace:
    """A joint space from scratch on corpus pairs (bootstrap, ``train-alignment``): best epoch and
    score mix chosen on ``val``, the mix guarded by the real photos, captions calibrated on ``val``."""
    data = SpaceData(fit=train, early_stop=val, heldout=[("val", val)],
                     guard=("photos", guard) if guard is not None else None, calibration=val)
    native = towers.baseline_kind == "native"
    return fit_space(data, config=config.train, joint_dim=config.model.joint_dim, class_text=towers.class_text(),
                     top_t=config.model.bridge_top_t, progress=progress, native=native)


# ---- memes -------------------------------------------------------------------------------------

def meme_examples(towers: Towers, config: Config, *, progress: bool = True,
                  text_features: str | None = None) -> MemeExamples:
    """Render (once) the synthetic meme set (generator ``mmapp.data.memes.GENERATOR_VERSION``) from the
    bootstrap corpus and photographs, embed it (cached), and add the memes imported with
    ``python -m mmapp import memes`` when there are any (train/val only, source "bootstrap").

    ``text_features`` is what the head reads as text (``mmapp.text_features``; default
    ``config.model.meme_text_features``): pass the kind of the version a head is fine-tuned from."""
    from mmapp.data.memes import GENERATOR_VERSION, build_meme_specs_v2, render_meme_set
    from mmapp.text_features import meme_text_features

    kind = config.model.meme_text_features if text_features is None else text_features

    @dataclass(frozen=True)
    class _Item:
        item_id: str
        png_path: Path
        category: str
        keywords: tuple
        title: str
        split: str

    items = [_Item(d["item_id"], Path(d["png_path"]), d["category"], tuple(d["keywords"]), d["title"], d["split"])
             for d in load_items(config)]
    labels = list(config.model.meme_labels)
    specs = build_meme_specs_v2(items, labels=labels, seed=config.train.seed)
    paths = render_meme_set(specs, config.paths.dataset(f"memes-{GENERATOR_VERSION}"), size=384)
    img, _ = towers.embedder.image_files(paths, progress=progress, desc="memes")
    texts = [s.text for s in specs]
    y, splits = [labels.index(s.label) for s in specs], [s.split for s in specs]
    imported = read_user_memes(config, labels)
    if imported:
        user_img, _ = towers.embedder.image_files([m.image_path for m in imported], progress=progress,
                                                  desc="imported memes")
        image = torch.cat([img.features, user_img.features])
        texts += [m.text for m in imported]
        y += [labels.index(m.label) for m in imported]
        splits += [m.split for m in imported]
    else:
        image = img.features
    text = meme_text_features(texts, kind, lambda t: towers.embedder.texts(t, progress=progress))
    return MemeExamples(image, text, torch.tensor(y), np.array(splits), np.array(["bootstrap"] * len(y)))


def read_user_memes(config: Config, labels: Sequence[str]):
    """The memes imported with ``python -m mmapp import memes`` (empty when none; rows whose label this
    model does not have, or whose image is gone, are skipped)."""
    from mmapp.data.meme_import import read_normalised

    path = config.paths.dataset("user_memes") / "memes.jsonl"
    if not path.is_file():
        return []
    return [m for m in read_normalised(path) if m.label in labels and m.image_path.is_file()]


def evaluate_memes(head, feats: MemeExamples, labels: Sequence[str], split: str = "test",
                   n_bootstrap: int = 1000) -> dict:
    """Macro-F1/AUROC for fused, image-only and text-only predictions on one split."""
    part = feats.where(feats.split == split)
    return ablation_metrics(head, part.image, part.text, part.labels, labels, n_bootstrap=n_bootstrap)


def ablation_metrics(head, image: torch.Tensor, text: torch.Tensor, y: torch.Tensor, labels: Sequence[str], *,
                     n_bootstrap: int = 1000) -> dict:
    """Macro-F1/AUROC of ``head`` fused, image-only and text-only, and the deltas between them."""
    from mmapp.evaluation import ablation_deltas

    out = {}
    head.eval()
    with torch.inference_mode():
        for mode, (a, b) in {"fused": (image, text), "image_only": (image, None), "text_only": (None, text)}.items():
            probs = head(a, b).logits.softmax(-1).numpy()
            out[mode] = classification_metrics(probs, y.numpy(), list(labels), n_bootstrap=n_bootstrap)
    out["ablation"] = ablation_deltas(out)
    out["n"] = len(y)
    return out


# ---- the bootstrap model -----------------------------------------------------------------------

def build_bootstrap(config: Config, towers: Towers, *, version: str = "bootstrap",
                    progress: bool = True) -> tuple[str, VersionMeta]:
    """Everything a fresh machine needs: corpus, embeddings, projections, meme head, a saved version.
    The caller makes it current through the registry (``retrain.promotion.promote_version``)."""
    seed_everything(config.train.seed)
    started = time.monotonic()
    say = (lambda msg: print(f"[bootstrap] {msg}", flush=True)) if progress else (lambda msg: None)
    ds = config.paths.dataset()
    if not (ds / "items.jsonl").is_file():
        say("importing the Open Clip Art corpus (Debian openclipart-svg/-png)")
        import_openclipart(config, progress=progress)
    say("embedding the corpus with the frozen towers (cached)")
    splits = {s: embed_pairs_file(towers.embedder, ds / f"{s}.tsv", progress=progress)
              for s in ("train", "val", "test")}
    photos = guard_pairs(config, towers.embedder)
    say("training the projections (InfoNCE, towers frozen)")
    fitted = fit_corpus_space(towers, config, splits["train"].features, splits["val"].features, photos,
                              progress=progress)
    space = fitted.space
    say("rendering and embedding the synthetic meme set; training the fusion head")
    memes = meme_examples(towers, config, progress=progress)
    labels = list(config.model.meme_labels)
    fusion = fit_meme_head(memes.split_of("train"), val=memes.split_of("val"), name=config.model.fusion_head,
                           num_labels=len(labels), config=config.train, epochs=config.train.meme_epochs)
    baseline = towers.bridge_space()  # zero training: ConSE, or the towers' native cosine
    metrics = {
        "retrieval": {"test": evaluate_retrieval(space, splits["test"].features),
                      "test_baseline": evaluate_retrieval(baseline, splits["test"].features),
                      "photos": evaluate_retrieval(space, photos),
                      "photos_baseline": evaluate_retrieval(baseline, photos),
                      "baseline": towers.baseline_kind},
        "memes": evaluate_memes(fusion.head, memes, labels),
    }
    report = report_pairs(config, towers.embedder)
    if report is not None:  # after every choice is made: nothing above sees these photos
        metrics["retrieval"]["photos_report"] = evaluate_retrieval(space, report)
        metrics["retrieval"]["photos_report_baseline"] = evaluate_retrieval(baseline, report)
    meta = VersionMeta(
        labels=tuple(labels), encoders=towers.identity, caption_temperature=fitted.caption_temperature,
        meme_text_features=config.model.meme_text_features,
        metrics=metrics, training=fitted.info, history=fitted.history,
        config={k: redacted(config)[k] for k in ("model", "train")},
        code_version=code_version(), python=platform.python_version(), torch=torch.__version__,
        data={**{s: len(e.captions) for s, e in splits.items()}, "memes": len(memes),
              "memes_generator": _meme_generator()})
    ModelStore(config.paths.models).save(version, space, meta=meta, fusion_head=fusion.head,
                                         fusion_config=fusion.config, fusion_name=config.model.fusion_head)
    say(f"saved model version {version!r} in {time.monotonic() - started:.0f} s")
    return version, meta


def _meme_generator() -> str:
    from mmapp.data.memes import GENERATOR_VERSION

    return GENERATOR_VERSION


def bank_from_items(config: Config) -> list[tuple[str, str]]:
    """The bootstrap corpus as caption-bank entries: titles made into captions a person reads
    (mmapp.captioning.bank_captions); the training captions, with their keyword tags, stay as they are."""
    from mmapp.captioning import bank_captions

    try:
        return bank_captions(load_items(config))
    except FileNotFoundError:
        return []
