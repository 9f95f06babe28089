"""The retrain's captioner stage: fine-tune a generative captioner's text decoder on users' caption pairs.

Runs only when the profile has a generative captioner (``model.captioner``); without one the retrain is
exactly what it was. From the run's selection (corrected captions and captions rated >= min_rating):

1. **trust**: untrusted feedback counts only when ``retrain.anonymous_rule`` is "open" (the captioner
   does not run the quorum/agreement confirmations of ``retrain.cleaning``: it learns from operators'
   and trusted annotators' pairs, or from everyone's when the operator opened it);
2. **clean**: each caption's likelihood under the current captioner, standardised against other captions
   of the same picture (``mmapp.captioner_tune.caption_agreement``), must reach
   ``retrain.captioner_min_agreement`` (a wrong caption fits its picture no better than a random one);
3. **train**: the text decoder from the current version's (vision encoder frozen), replaying pairs of
   ``retrain.captioner_replay_pairs``;
4. **evaluate and gate**: current vs candidate captions (greedy, as served) on the accepted held-out
   pairs (CIDEr-D must rise, BLEU-4 not fall) and on old-concept guard pairs
   (``retrain.captioner_guard_pairs``: neither may fall beyond the tolerances), with
   ``retrain.gates.decide``.

The result (:class:`CaptionerOutcome`) goes to promotion, which stores only the decoder's weights with
the base captioner's identity (``VersionMeta.captioner``). No UI; reads the upload store's files.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from mmapp.config import Config
from mmapp.model_store import ModelVersion

from retrain.gates import GateDecision, GateSpec, decide
from retrain.selection import FeedbackItem

log = logging.getLogger(__name__)

TARGET = "caption_heldout_cider_d"
METRICS = ("cider_d", "bleu4", "exact")


def enabled(config: Config) -> bool:
    """Whether a run has a captioner stage: only profiles with a generative captioner."""
    return bool(config.model.captioner)


@dataclass
class CaptionerOutcome:
    status: str  # "skipped" (nothing to learn, or not supported) | "promote" | "refused" | "failed"
    message: str
    base: str = ""  # the base captioner's identity
    delta: Optional[dict[str, torch.Tensor]] = None  # the candidate decoder (when status == "promote")
    decision: Optional[GateDecision] = None
    metrics: dict[str, Any] = field(default_factory=dict)  # {"current": {set: scores}, "candidate": {...}}
    stats: dict[str, Any] = field(default_factory=dict)
    used_correction_ids: list[int] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        return self.status == "promote"

    def meta(self, *, source_version: str) -> dict:
        """``VersionMeta.captioner`` for the version that carries this delta."""
        kind = "decoder+vision" if "text decoder + vision" in str(self.stats.get("training", {}).get("trained")) \
            else "decoder"
        return {"base": self.base, "kind": kind, "source_version": source_version,
                "training": self.stats.get("training", {}), "metrics": self.metrics.get("candidate", {})}

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "base": self.base,
                "gate": self.decision.to_dict() if self.decision else None, "metrics": self.metrics,
                "stats": self.stats}


def load_captioner(config: Config, current: ModelVersion):
    """The configured base captioner with the current version's decoder delta on it (if any)."""
    from mmapp.predictor import generative_captioner

    captioner = generative_captioner(config)
    delta = current.captioner_delta
    if delta is not None:
        if current.meta.captioner.get("base") != captioner.identity:
            raise ValueError(f"current version {current.version!r} fine-tuned the captioner "
                             f"{current.meta.captioner.get('base')}, but this profile loads {captioner.identity}")
        captioner.set_delta(delta, name=current.version)
    return captioner


def _pairs_file(config: Config, configured: str, split: str) -> Path:
    return Path(configured) if configured else config.paths.dataset() / f"{split}.tsv"


def _read_pairs(path: Path, limit: int, seed: int) -> list[tuple[Path, str]]:
    from mmapp.data.pairs import read_pairs

    if not path.is_file():
        return []
    pairs = [(Path(p.image_path), p.caption) for p in read_pairs(path)]
    if len(pairs) > limit:
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _scores(captioner, sets: dict[str, tuple[list[Image.Image], list[list[str]]]], n_bootstrap: int,
            seed: int) -> dict[str, Any]:
    """Greedy captions of every set, scored together (CIDEr-D's document frequencies over all references)."""
    from mmapp.caption_metrics import score_caption_sets

    texts = {}
    for name, (images, _) in sets.items():
        texts[name] = []
        for start in range(0, len(images), 32):
            texts[name] += [g.text for g in captioner.generate(images[start:start + 32])]
    scored = score_caption_sets({name: (texts[name], refs) for name, (_, refs) in sets.items()},
                                n_bootstrap=n_bootstrap, seed=seed)
    return {name: scored[name].summary() | {"examples": texts[name][:5]} for name in sets}


def _cross_fit_agreement(captioner, current: ModelVersion, pairs: list[FeedbackItem], images: list[Image.Image],
                         bank: list[str], replay: list, config: Config) -> tuple[np.ndarray, str]:
    """Each caption's agreement under a decoder that learned from the *other* half of the new pairs
    (2 folds by image, as ``retrain.job`` does for retrieval). The current captioner has never seen a
    new concept, so an honest caption with a new word scores *below* a random one under it (measured on
    the shapes world: -3 vs +0.5); fine-tuned briefly on the other half, it learns what the honest pairs
    share, and random captions share nothing. Held-out pairs never train a scorer: both score them."""
    from mmapp.captioner_tune import DecoderRecipe, caption_agreement, fine_tune_decoder
    from retrain.selection import hash_fraction

    settings = config.retrain
    train_rows = [k for k, i in enumerate(pairs) if not i.heldout]
    fold = {k: int(hash_fraction(pairs[k].image_sha256, "mmapp-caption-fold-v1") < 0.5) for k in train_rows}
    sizes = [sum(1 for k in train_rows if fold[k] == f) for f in (0, 1)]
    texts = [i.text for i in pairs]
    if settings.captioner_clean_epochs <= 0 or min(sizes) < 5:
        return caption_agreement(captioner, images, texts, bank), "current captioner"
    out = np.full(len(pairs), np.nan)
    heldout_rows = [k for k, i in enumerate(pairs) if i.heldout]
    heldout_scores = []
    recipe = DecoderRecipe(epochs=settings.captioner_clean_epochs, lr=settings.captioner_lr,
                           batch_size=settings.captioner_batch_size, train_vision=settings.captioner_train_vision,
                           seed=config.train.seed)
    for f in (0, 1):
        fit = [(images[k], texts[k]) for k in train_rows if fold[k] != f]
        state, _ = fine_tune_decoder(captioner, fit, replay, recipe=recipe, start=current.captioner_delta)
        scorer = captioner.with_delta(state)
        scored = [k for k in train_rows if fold[k] == f]
        out[scored] = caption_agreement(scorer, [images[k] for k in scored], [texts[k] for k in scored], bank)
        if heldout_rows:
            heldout_scores.append(caption_agreement(scorer, [images[k] for k in heldout_rows],
                                                    [texts[k] for k in heldout_rows], bank))
    if heldout_rows:
        out[heldout_rows] = np.mean(heldout_scores, axis=0)
    return out, f"2-fold cross-fitted decoders ({settings.captioner_clean_epochs} epochs)"


def run_captioner_stage(config: Config, current: ModelVersion, train: list[FeedbackItem],
                        heldout: list[FeedbackItem], *, captioner=None) -> CaptionerOutcome:
    """Trust → clean → fine-tune → evaluate → gate for the captioner (see the module docstring)."""
    from mmapp.captioner_tune import DecoderRecipe, caption_agreement, fine_tune_decoder

    settings, seed = config.retrain, config.train.seed
    open_to_all = settings.anonymous_rule == "open"
    pairs = [i for i in train + heldout if i.kind == "pair"]
    untrusted = [i for i in pairs if not (i.trusted or open_to_all)]
    pairs = [i for i in pairs if i.trusted or open_to_all]
    stats: dict[str, Any] = {"pairs": len(pairs) + len(untrusted), "untrusted_skipped": len(untrusted)}
    if not any(not i.heldout for i in pairs):
        return CaptionerOutcome("skipped", "captioner: no trusted caption pairs to learn from", stats=stats)
    captioner = captioner or load_captioner(config, current)
    if not (hasattr(captioner.model, "vision_model") and hasattr(captioner.model, "text_decoder")):
        return CaptionerOutcome("skipped", f"captioner: fine-tuning {type(captioner.model).__name__} is not supported "
                                           "(BLIP-style models only); it is served as it is", stats=stats)
    uploads = config.paths.uploads
    images = [_open(uploads / i.image_relpath) for i in pairs]

    # clean: likelihood of each caption vs other captions, under scorers that learned from the *other* pairs
    replay_all = _read_pairs(_pairs_file(config, settings.captioner_replay_pairs, "train"),
                             settings.captioner_replay_size, seed)
    replay = [(_open(p), c) for p, c in replay_all if p.is_file()]
    rng = random.Random(seed + 7)
    bank_pool = sorted({c for _, c in replay_all} | {i.text for i in pairs})
    bank = rng.sample(bank_pool, min(settings.captioner_agreement_bank, len(bank_pool)))
    if len(bank) < 2:
        return CaptionerOutcome("skipped", "captioner: too few captions to score agreement against", stats=stats)
    agreement, how = _cross_fit_agreement(captioner, current, pairs, images, bank, replay, config)
    keep = agreement >= settings.captioner_min_agreement
    stats["cleaning"] = {"accepted": int(keep.sum()), "rejected_low_agreement": int((~keep).sum()),
                         "min_agreement": settings.captioner_min_agreement, "scored_by": how,
                         "agreement_median": float(np.median(agreement)) if len(agreement) else None,
                         "rejected": [{"item_id": i.item_id, "text": i.text, "agreement": round(float(a), 3)}
                                      for i, a, k in zip(pairs, agreement, keep) if not k][:50]}
    fit = [(im, i) for im, i, k in zip(images, pairs, keep) if k and not i.heldout]
    held = [(im, i) for im, i, k in zip(images, pairs, keep) if k and i.heldout]
    stats.update(train_pairs=len(fit), heldout_pairs=len(held))
    if not fit:
        return CaptionerOutcome("skipped", f"captioner: nothing to learn after cleaning "
                                           f"({int((~keep).sum())} caption(s) fit their pictures no better than "
                                           "random captions)", base=captioner.identity, stats=stats)

    # train: the text decoder from the current one, with replay
    recipe = DecoderRecipe(epochs=settings.captioner_epochs, lr=settings.captioner_lr,
                           batch_size=settings.captioner_batch_size, train_vision=settings.captioner_train_vision,
                           seed=seed)
    delta, training = fine_tune_decoder(captioner, [(im, i.text) for im, i in fit], replay, recipe=recipe,
                                        start=current.captioner_delta)
    stats["training"] = training
    candidate = captioner.with_delta(delta)

    # evaluate: both on the same held-out corrections and old-concept guard pairs
    guard = _read_pairs(_pairs_file(config, settings.captioner_guard_pairs, "val"), settings.captioner_guard_size,
                        seed + 1)
    sets: dict[str, tuple[list[Image.Image], list[list[str]]]] = {}
    if held:
        refs: dict[str, list[str]] = {}
        first: dict[str, Image.Image] = {}
        for im, item in held:  # one entry per picture, every accepted caption of it a reference
            refs.setdefault(item.image_sha256, []).append(item.text)
            first.setdefault(item.image_sha256, im)
        sets["heldout"] = ([first[k] for k in refs], list(refs.values()))
    guard = [(p, c) for p, c in guard if p.is_file()]
    if guard:
        sets["guard"] = ([_open(p) for p, _ in guard], [[c] for _, c in guard])
    nb = settings.n_bootstrap
    metrics = {name: _scores(model, sets, nb, seed) for name, model in (("current", captioner),
                                                                          ("candidate", candidate))}
    flat = {name: {f"caption_{s}_{m}": v[m] for s, v in per_set.items() for m in ("cider_d", "bleu4")}
            for name, per_set in metrics.items()}
    tolerances = {k: settings.captioner_cider_tolerance if k.endswith("cider_d") else settings.captioner_bleu_tolerance
                  for k in flat["current"]}
    if len(held) < settings.captioner_min_heldout:
        decision = GateDecision(False, f"refused: {len(held)} accepted held-out caption pair(s), the captioner gate "
                                       f"needs {settings.captioner_min_heldout}", ())
    else:
        decision = decide(flat["current"], flat["candidate"],
                          GateSpec(targets=(TARGET,), tolerance=settings.captioner_bleu_tolerance,
                                   tolerances=tolerances))
    used = [i.correction_id for _, i in fit if i.correction_id is not None]
    status = "promote" if decision.promote else "refused"
    return CaptionerOutcome(status, f"captioner {decision.reason}", base=captioner.identity,
                            delta=delta if decision.promote else None, decision=decision, metrics=metrics,
                            stats=stats, used_correction_ids=used)
