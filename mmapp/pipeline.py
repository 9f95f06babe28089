"""Workflows over the library pieces: import the corpus, embed pairs, train, evaluate, bootstrap.

These are the functions the CLI (``python -m mmapp``), the app's start-up and the retrain job call.
No database and no UI here.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmapp.config import Config
from mmapp.data.pairs import Pair, read_pairs, write_pairs_tsv
from mmapp.device import seed_everything
from mmapp.evaluation import classification_metrics, retrieval_metrics, select_candidates, subsample_candidates
from mmapp.joint import JointSpace
from mmapp.model_store import BRIDGE, ModelStore
from mmapp.training import PairFeatures, choose_mix, train_alignment, train_fusion_head, with_centers

VAL_FRACTION, TEST_FRACTION = 0.1, 0.45
PHOTOS_TSV = Path(__file__).resolve().parent.parent / "tests" / "data" / "photos" / "captions.tsv"


def dataset_dir(config: Config, name: str = "openclipart") -> Path:
    return config.storage.home / "datasets" / name


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

    root = ensure_openclipart(config.storage.home / "corpus" / "openclipart", progress=progress)
    # ~2.5k drawings survive the filters; a held-out test split of >= 1000 pairs needs ~45% of them.
    items, report = load_openclipart(root, val=VAL_FRACTION, test=TEST_FRACTION, progress=progress)
    out = dataset_dir(config)
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
    path = dataset_dir(config) / "items.jsonl"
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


def resolve_space(predictor, model: str) -> tuple[str, JointSpace]:
    """'bridge', 'current' or a version name -> (version, JointSpace)."""
    if model == BRIDGE:
        return BRIDGE, predictor.bridge_space()
    version = predictor.store.current() if model == "current" else model
    if version is None:
        raise ValueError("no current model version yet: run `python -m mmapp build-bootstrap` (or python app.py)")
    return version, predictor.store.load(version).space


# ---- training ----------------------------------------------------------------------------------

def train_joint_space(predictor, train: PairFeatures, val: PairFeatures, *, config: Config,
                      guard: PairFeatures | None = None, init=None, epochs: int | None = None,
                      progress: bool = True) -> tuple[JointSpace, dict]:
    """Projections trained with InfoNCE, centers set, bridge/projection mix chosen on held-out data."""
    class_text = predictor.class_text()
    result = train_alignment(train, val, class_text=class_text, top_t=config.model.bridge_top_t,
                             config=config.train, joint_dim=config.model.joint_dim, init=init,
                             progress=progress, epochs=epochs)
    space = with_centers(JointSpace(class_text, config.model.bridge_top_t, result.model), train)
    mix, table = choose_mix(space, [("val", val)], guard=("photos", guard) if guard is not None else None)
    space.mix = mix
    return space, {"history": result.history, "best_epoch": result.best_epoch, "seconds": result.seconds,
                   "mix": mix, "mix_table": table}


def caption_temperature(space: JointSpace, feats: PairFeatures) -> float:
    """Softmax temperature over caption scores minimising the NLL of the true caption (held-out)."""
    vi = space.image_views(feats.image_features, feats.class_probs)
    vt = space.text_views(feats.text)
    sim = space.similarity(vi, vt)  # (N_img, N_txt)
    first_caption = {}
    for j, i in enumerate(feats.text_to_image):
        first_caption.setdefault(int(i), j)
    rows = torch.tensor(list(first_caption))
    cols = torch.tensor(list(first_caption.values()))
    best_t, best_nll = 0.05, float("inf")
    for t in np.geomspace(0.005, 0.5, 40):
        nll = float(-(torch.log_softmax(sim[rows] / t, dim=1)[torch.arange(len(rows)), cols]).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


# ---- memes -------------------------------------------------------------------------------------

@dataclass
class MemeFeatures:
    image: torch.Tensor  # (N, D_img)
    text: torch.Tensor  # (N, D_txt)
    labels: torch.Tensor  # (N,)
    splits: np.ndarray  # (N,) 'train' | 'val' | 'test'


def meme_features(predictor, config: Config, *, progress: bool = True) -> MemeFeatures:
    """Render (once) the synthetic meme set from the bootstrap corpus and embed it (cached)."""
    from mmapp.data.memes import build_meme_specs, render_meme_set

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
    specs = build_meme_specs(items, labels=labels, per_item=2, seed=config.train.seed)
    paths = render_meme_set(specs, config.storage.home / "datasets" / "memes", size=384)
    img, _ = predictor.embedder.image_files(paths, progress=progress, desc="memes")
    text = predictor.embedder.texts([s.text for s in specs], progress=progress)
    return MemeFeatures(img.features, text, torch.tensor([labels.index(s.label) for s in specs]),
                        np.array([s.split for s in specs]))


def evaluate_memes(head, feats: MemeFeatures, labels: Sequence[str], split: str = "test",
                   n_bootstrap: int = 1000) -> dict:
    """Macro-F1/AUROC for fused, image-only and text-only predictions on one split."""
    mask = torch.as_tensor(feats.splits == split)
    return ablation_metrics(head, feats.image[mask], feats.text[mask], feats.labels[mask], labels,
                            n_bootstrap=n_bootstrap)


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


def train_meme_head(feats: MemeFeatures, config: Config, *, init=None, epochs: int = 40):
    tr = torch.as_tensor(feats.splits == "train")
    va = torch.as_tensor(feats.splits == "val")
    return train_fusion_head(config.model.fusion_head, feats.image[tr], feats.text[tr], feats.labels[tr],
                             num_labels=len(config.model.meme_labels), config=config.train,
                             val=(feats.image[va], feats.text[va], feats.labels[va]), init=init, epochs=epochs)


# ---- the bootstrap model -----------------------------------------------------------------------

def build_bootstrap(config: Config, predictor, *, version: str = "bootstrap", progress: bool = True,
                    make_current: bool = True) -> tuple[str, dict]:
    """Everything a fresh machine needs: corpus, embeddings, projections, meme head, a saved version."""
    seed_everything(config.train.seed)
    started = time.monotonic()
    say = (lambda msg: print(f"[bootstrap] {msg}", flush=True)) if progress else (lambda msg: None)
    ds = dataset_dir(config)
    if not (ds / "items.jsonl").is_file():
        say("importing the Open Clip Art corpus (Debian openclipart-svg/-png)")
        import_openclipart(config, progress=progress)
    say("embedding the corpus with the frozen towers (cached)")
    splits = {s: embed_pairs_file(predictor.embedder, ds / f"{s}.tsv", progress=progress)
              for s in ("train", "val", "test")}
    photos = embed_pairs_file(predictor.embedder, PHOTOS_TSV, progress=False) if PHOTOS_TSV.is_file() else None
    say("training the projections (InfoNCE, towers frozen)")
    space, train_info = train_joint_space(predictor, splits["train"].features, splits["val"].features,
                                          config=config, guard=photos.features if photos else None,
                                          progress=progress)
    temperature = caption_temperature(space, splits["val"].features)
    say("rendering and embedding the synthetic meme set; training the fusion head")
    memes = meme_features(predictor, config, progress=progress)
    fusion = train_meme_head(memes, config)
    labels = list(config.model.meme_labels)
    metrics = {
        "retrieval": {"test": evaluate_retrieval(space, splits["test"].features),
                      "test_bridge": evaluate_retrieval(predictor.bridge_space(), splits["test"].features)},
        "memes": evaluate_memes(fusion.head, memes, labels),
    }
    if photos is not None:
        metrics["retrieval"]["photos"] = evaluate_retrieval(space, photos.features)
        metrics["retrieval"]["photos_bridge"] = evaluate_retrieval(predictor.bridge_space(), photos.features)
    meta = {
        "labels": labels, "encoders": predictor.embedder.identity, "caption_temperature": temperature,
        "metrics": metrics, "train": {k: v for k, v in train_info.items() if k != "history"},
        "history": train_info["history"], "config": {"model": asdict(config.model), "train": asdict(config.train)},
        "code_version": code_version(), "python": platform.python_version(), "torch": torch.__version__,
        "data": {s: len(e.captions) for s, e in splits.items()},
    }
    store = ModelStore(config.storage.home / "models")
    store.save(version, space, meta=meta, fusion_head=fusion.head, fusion_config=fusion.config,
               fusion_name=config.model.fusion_head)
    if make_current:
        store.set_current(version)
    say(f"saved model version {version!r} in {time.monotonic() - started:.0f} s")
    return version, meta


def bank_from_items(config: Config) -> list[tuple[str, str]]:
    """The bootstrap corpus captions as caption-bank entries."""
    try:
        return [(d["caption"], "bank") for d in load_items(config)]
    except FileNotFoundError:
        return []
