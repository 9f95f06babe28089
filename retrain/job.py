"""One retrain run: lock, select, clean, fine-tune, evaluate, gate, promote or refuse, report.

At most one run at a time across processes: a database lease (``locks`` row) taken together with
the ``retrain_runs`` row, renewed by a heartbeat thread that also stamps the run row. A worker
killed outright stops heartbeating; the next start marks its row failed and, once the lease has
expired, runs normally. Nothing is registered until the final promotion transaction
(:mod:`retrain.promotion`), so a crash never leaves a half-made version behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from feedback_db.models import RetrainRun
from mmapp.evaluation import subsample_candidates
from mmapp.model_store import ModelStore, ModelVersion, write_text_atomic
from mmapp.training import PairFeatures

from retrain.cleaning import REASONS, Candidate, CleaningConfig, CleaningResult, clean
from retrain.evaluation import (TARGET_LABELS, TARGET_PAIRS, EvalSets, evaluate_model, gate_metrics,
                                small_set_tolerances)
from retrain.features import FeatureSource, ImageRef
from retrain.gates import GateSpec, decide
from retrain.promotion import adopt_store_current, promote_version, sync_pointer
from retrain.selection import FeedbackItem, Selection, hash_fraction, load_feedback, replay_sample, split_items
from retrain.train import (FineTuneSettings, LabelledMemes, TrainingSet, fit_projections, fine_tune)

log = logging.getLogger(__name__)

STAGES = ("select", "features", "clean", "train", "evaluate", "promote", "report")
_STAGE_PROGRESS = {"select": 0.05, "features": 0.1, "clean": 0.2, "train": 0.3, "evaluate": 0.75,
                   "promote": 0.9, "report": 0.95}


@dataclass(frozen=True)
class JobSettings:
    lock_name: str = "retrain"
    lock_ttl_s: float = 300.0  # lease length; a killed worker's lease frees after this
    heartbeat_s: float = 15.0  # how often a live run renews its lease and stamps its row
    stale_after_s: float = 300.0  # a 'running' row without a heartbeat this long is marked failed
    n_bootstrap: int = 1000  # resamples for the metrics' 95% intervals
    min_rating: float = 4.0  # mean coherence/relevance at which a rated caption counts as a good pair
    agreement_bank: int = 256  # reference captions each pair's image-text agreement is standardised against
    clean_epochs: int = 4  # epochs of each cross-fitting model that scores agreement (0 = score with the current model)
    clean_lr_scale: float = 0.3  # its learning rate = train.lr * this (separates honest from random best in the sim)
    uploads_dir: str = "uploads"  # the app's blob store root, relative to the home folder (for cache misses)
    fine_tune: FineTuneSettings = field(default_factory=FineTuneSettings)


@dataclass
class RunOutcome:
    status: str  # busy | skipped | promoted | refused | failed
    run_id: Optional[int]
    message: str
    version: Optional[str] = None  # the candidate's name
    current_version: Optional[str] = None  # what serves after the run
    metrics: dict = field(default_factory=dict)  # {"current": flat, "candidate": flat}
    gate: Optional[dict] = None
    report: Optional[dict] = None  # {"html": path, "json": path}
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LeaseLost(RuntimeError):
    """Another worker took the retrain lease (ours expired): stop before writing anything."""


class RunHandle:
    """A started run: holds the lease, heartbeats in the background, reports progress."""

    def __init__(self, engine: Engine, run_id: int, owner: str, settings: JobSettings):
        self.engine, self.run_id, self.owner, self.settings = engine, run_id, owner, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"retrain-heartbeat-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                def refresh() -> bool:
                    with Session(self.engine) as s, s.begin():
                        held = repo.refresh_lock(s, self.settings.lock_name, self.owner, self.settings.lock_ttl_s)
                        if held:
                            repo.update_retrain_run(s, self.run_id)
                        return held
                if not retry_on_busy(refresh):
                    self.lost.set()
                    return
            except Exception:  # a heartbeat that fails now and then is survivable; the lease has slack
                log.exception("retrain heartbeat failed")

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"run {self.run_id} lost the {self.settings.lock_name!r} lease")

    def progress(self, fraction: float, message: str, stats: Optional[dict] = None) -> None:
        self.check()

        def write() -> None:
            with Session(self.engine) as s, s.begin():
                repo.update_retrain_run(s, self.run_id, progress=fraction, message=message, stats=stats)
        retry_on_busy(write)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

        def release() -> None:
            with Session(self.engine) as s, s.begin():
                repo.release_lock(s, self.settings.lock_name, self.owner)
        try:
            retry_on_busy(release)
        except Exception:  # it expires on its own
            log.exception("could not release the retrain lease")


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def expire_stale_runs(engine: Engine, settings: JobSettings = JobSettings()) -> int:
    """Mark runs whose worker stopped heartbeating as failed; returns how many."""
    def expire() -> int:
        with Session(engine) as s, s.begin():
            return repo.fail_stale_retrain_runs(s, older_than_s=settings.stale_after_s)
    return retry_on_busy(expire)


def begin_run(engine: Engine, *, trigger: str, settings: JobSettings = JobSettings(),
              owner: Optional[str] = None) -> Optional[RunHandle]:
    """Take the retrain lease and open a run row in one transaction; None if another run holds it."""
    owner = owner or new_owner()
    expire_stale_runs(engine, settings)

    def start() -> Optional[int]:
        with Session(engine) as s, s.begin():
            if not repo.try_acquire_lock(s, settings.lock_name, owner, settings.lock_ttl_s):
                return None
            return repo.start_retrain_run(s, trigger=trigger, owner=owner, message="starting").id
    run_id = retry_on_busy(start)
    return None if run_id is None else RunHandle(engine, run_id, owner, settings)


def running_run_id(engine: Engine) -> Optional[int]:
    def read() -> Optional[int]:
        with Session(engine) as s, s.begin():
            runs = [r for r in repo.recent_retrain_runs(s, limit=5) if r.status == "running"]
            return runs[0].id if runs else None
    return retry_on_busy(read)


def run_retrain(config, engine: Engine, *, trigger: str = "cli", features: Optional[FeatureSource] = None,
                settings: JobSettings = JobSettings(), force: bool = False,
                on_stage: Optional[Callable[[str], None]] = None) -> RunOutcome:
    """Run one retrain now if no other is running (else status 'busy'). Builds a predictor-backed
    feature source when none is given (the CLI does; the app passes its own)."""
    from mmapp.device import seed_everything

    seed_everything(config.train.seed)
    handle = begin_run(engine, trigger=trigger, settings=settings)
    if handle is None:
        other = running_run_id(engine)
        return RunOutcome("busy", other, f"a retrain is already running (run {other})")
    try:
        if features is None:
            try:
                features = default_features(config)
            except Exception as exc:
                fail_run(engine, handle.run_id, f"could not build the feature source: {type(exc).__name__}: {exc}")
                raise
        return execute_run(handle, config, features=features, force=force, on_stage=on_stage)
    finally:
        handle.close()


def fail_run(engine: Engine, run_id: int, message: str) -> None:
    """Record a run as failed (used when it dies before :func:`execute_run` can record anything)."""
    def write() -> None:
        with Session(engine) as s, s.begin():
            repo.finish_retrain_run(s, run_id, status="failed", message=message[:2000])
    retry_on_busy(write)


def default_features(config) -> FeatureSource:
    from mmapp.predictor import Predictor
    from retrain.features import PredictorFeatureSource

    return PredictorFeatureSource(Predictor.from_config(config), config)


# --- the run ----------------------------------------------------------------------------------


def execute_run(handle: RunHandle, config, *, features: FeatureSource, force: bool = False,
                on_stage: Optional[Callable[[str], None]] = None) -> RunOutcome:
    """Everything after the lease: never raises for a failed run (it is recorded and returned)."""
    started = time.monotonic()
    store = ModelStore(config.storage.home / "models")
    marks: list[tuple[str, float]] = []  # (stage, monotonic start)

    def stage(name: str) -> None:
        marks.append((name, time.monotonic()))
        if name != "report":  # the run row is final by then: keep its status message and progress
            handle.progress(_STAGE_PROGRESS[name], f"{name}…", stats={"stage": name})
        if on_stage is not None:
            on_stage(name)

    try:
        outcome = _run(handle, config, features, store, force, stage)
    except Exception as exc:  # recorded on the run row; the current model keeps serving
        log.exception("retrain run %s failed", handle.run_id)
        message = f"{type(exc).__name__}: {exc}"
        try:
            fail_run(handle.engine, handle.run_id, message)
            sync_pointer(handle.engine, store)
        except Exception:
            log.exception("could not record the failure of run %s", handle.run_id)
        outcome = RunOutcome("failed", handle.run_id, message)
    outcome.seconds = round(time.monotonic() - started, 2)
    ends = [t for _, t in marks[1:]] + [time.monotonic()]
    outcome.stats["stage_seconds"] = {name: round(end - t, 2) for (name, t), end in zip(marks, ends)}
    return outcome


def _run(handle: RunHandle, config, features: FeatureSource, store: ModelStore, force: bool,
         stage: Callable[[str], None]) -> RunOutcome:
    engine, run_id = handle.engine, handle.run_id
    stage("select")
    current_name = adopt_store_current(engine, store)
    if current_name is None:
        raise RuntimeError("no current model version: build the bootstrap model first (python -m mmapp build-bootstrap)")
    current = store.load(current_name)
    trained_on = current.meta.get("encoders")
    if trained_on and trained_on != features.identity:
        raise ValueError(f"current model {current_name!r} was trained on encoders {trained_on}, "
                         f"but the feature source has {features.identity}")

    def read_selection() -> Selection:
        with Session(engine) as s, s.begin():
            return load_feedback(s, min_rating=handle.settings.min_rating)
    selection = retry_on_busy(read_selection)
    min_new = max(1, config.retrain.min_new_items) if not force else 1
    if selection.new_training_items < min_new:
        message = f"nothing to learn from: {selection.new_training_items} new item(s), need {min_new}"
        _finish(engine, run_id, "succeeded", message, stats={"selection": _selection_stats(selection)})
        return RunOutcome("skipped", run_id, message, current_version=current_name,
                          stats={"selection": _selection_stats(selection)})

    stage("features")
    seed = config.train.seed
    corpus_train = features.corpus("train")
    replay_idx = replay_sample(corpus_train.image_features.shape[0], config.retrain.replay_size, seed)
    replay = corpus_train.subset_images(replay_idx)
    items = selection.train + selection.heldout
    item_feats = _item_features(items, features, config.storage.home / handle.settings.uploads_dir)
    handle.check()

    stage("clean")
    bank = _agreement_bank(replay, handle.settings.agreement_bank, seed)
    agreement, agreement_how = _cross_fit_agreement(current, items, item_feats, replay, bank, config,
                                                    handle.settings, seed)
    candidates = [Candidate(item.item_id, item.user, item.kind, item.image_sha256, item.text, item.label,
                            image_embedding=item_feats.image[i].numpy(), text_embedding=item_feats.text[i].numpy(),
                            agreement=float(agreement[i]) if item.kind == "pair" else float("nan"))
                  for i, item in enumerate(items)]
    cleaning = clean(candidates, CleaningConfig.from_retrain(config.retrain))
    by_id = {item.item_id: item for item in items}
    _record_rejections(engine, run_id, cleaning, by_id)
    accepted_ids = {c.item_id for c in cleaning.accepted}
    row_of = {item.item_id: i for i, item in enumerate(items)}
    labels = list(current.labels)
    train_items = [i for i in selection.train if i.item_id in accepted_ids]
    heldout_items = [i for i in selection.heldout if i.item_id in accepted_ids]
    unknown_labels = {i.item_id for i in train_items + heldout_items if i.kind == "label" and i.label not in labels}
    train_items = [i for i in train_items if i.item_id not in unknown_labels]
    heldout_items = [i for i in heldout_items if i.item_id not in unknown_labels]
    stats: dict[str, Any] = {"current_version": current_name, "selection": _selection_stats(selection),
                             "cleaning": {"candidates": len(candidates), "accepted": len(cleaning.accepted),
                                          "rejected": cleaning.counts(),
                                          "unknown_label": len(unknown_labels)},
                             "replay_images": int(len(replay_idx)), "agreement_scored_by": agreement_how,
                             "towers": _towers_note(config),
                             "encoded_on_cache_miss": getattr(features, "encoded_on_miss", None)}
    if not train_items:
        message = "nothing to learn from after cleaning: every new item was rejected or held back"
        _finish(engine, run_id, "succeeded", message, stats=stats, final_rejections=_final_rejections(cleaning, by_id))
        return RunOutcome("skipped", run_id, message, current_version=current_name, stats=stats)
    handle.progress(0.25, f"clean: {len(cleaning.accepted)} accepted, {len(cleaning.rejected)} rejected",
                    stats={"cleaning": stats["cleaning"]})

    stage("train")
    fit, tune = split_items(train_items)
    memes = features.memes()
    data = TrainingSet(
        replay=replay,
        val=_cap_images(features.corpus("val"), 1000, seed),
        user_pairs=_pairs_of([i for i in fit if i.kind == "pair"], row_of, item_feats),
        tune_pairs=_pairs_of([i for i in tune if i.kind == "pair"], row_of, item_feats),
        guard=features.guard(),
        memes=LabelledMemes.concat(_meme_split(memes, "train"),
                                   _labels_of([i for i in fit if i.kind == "label"], row_of, item_feats, labels)),
        memes_val=LabelledMemes.concat(_meme_split(memes, "val"),
                                       _labels_of([i for i in tune if i.kind == "label"], row_of, item_feats, labels)),
    )
    candidate = fine_tune(current, data, train_config=config.train, settings=handle.settings.fine_tune)
    handle.check()

    stage("evaluate")
    sets = EvalSets(bootstrap_test=features.corpus("test"),
                    heldout_pairs=_pairs_of([i for i in heldout_items if i.kind == "pair"], row_of, item_feats),
                    memes_test=_meme_split(memes, "test"),
                    heldout_labels=_labels_of([i for i in heldout_items if i.kind == "label"], row_of, item_feats,
                                              labels))
    nb = handle.settings.n_bootstrap
    nested = {"current": evaluate_model(current.space, current.fusion_head, labels, sets, n_bootstrap=nb),
              "candidate": evaluate_model(candidate.space, candidate.fusion_head, labels, sets, n_bootstrap=nb)}
    flat = {k: gate_metrics(v) for k, v in nested.items()}
    targets = tuple(t for t, used in ((TARGET_PAIRS, data.has_user_pairs), (TARGET_LABELS, data.has_user_labels))
                    if used)
    tolerance = config.retrain.tolerance
    decision = decide(flat["current"], flat["candidate"],
                      GateSpec(targets=targets, tolerance=tolerance, tolerances=small_set_tolerances(sets, tolerance)))
    handle.check()

    stage("promote")
    version = f"r{run_id:04d}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    manifest = _manifest(config, run_id=run_id, version=version, parent=current_name, selection=selection,
                         replay_idx=replay_idx, features=features, stats=stats, candidate_info=candidate.info,
                         flat=flat, decision=decision.to_dict(), cleaning=cleaning)
    run_dir = config.storage.home / "retrain" / "runs" / f"{run_id:04d}"
    write_text_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
    stats.update(gate=decision.to_dict(), metrics=nested, flat_metrics=flat, targets=list(targets),
                 training=_strip_history(candidate.info), manifest_path=str(run_dir / "manifest.json"),
                 data_snapshot_sha256=manifest["data"]["snapshot_sha256"])
    used_ids = [i.correction_id for i in train_items if i.correction_id is not None]
    final = _final_rejections(cleaning, by_id)
    if decision.promote:
        meta = {**{k: current.meta[k] for k in ("labels", "encoders") if k in current.meta},
                "caption_temperature": _caption_temperature(candidate.space, data.val, current),
                "metrics": nested["candidate"], "manifest": manifest, "parent": current_name,
                "fusion_name": (current.meta.get("fusion") or {}).get("name")}
        store.save(version, candidate.space, meta=meta, fusion_head=candidate.fusion_head,
                   fusion_config=current.fusion_config, fusion_name=meta["fusion_name"])
        handle.check()

        def bookkeeping(s: Session) -> None:
            repo.mark_corrections(s, used_ids, status="used", used_in_version=version)
            repo.mark_corrections(s, final, status="rejected")
            repo.finish_retrain_run(s, run_id, status="promoted", message=decision.reason,
                                    candidate_version=version, stats=stats)
        promote_version(engine, store, version=version, parent_version=current_name, metrics=nested["candidate"],
                        manifest=manifest, in_transaction=bookkeeping)
        status, serving = "promoted", version
    else:
        _finish(engine, run_id, "refused", decision.reason, stats=stats, candidate_version=version,
                final_rejections=final)
        status, serving = "refused", current_name

    outcome = RunOutcome(status, run_id, decision.reason, version=version, current_version=serving,
                         metrics=flat, gate=decision.to_dict(), stats=stats)
    stage("report")
    try:
        from retrain.report import build_report

        paths = build_report(config, engine, version=version)
        outcome.report = {k: str(v) for k, v in paths.items()}
        _set_report_path(engine, run_id, version if status == "promoted" else None, str(paths["html"]))
    except Exception as exc:  # the run's result stands without its report
        log.exception("report for run %s failed", run_id)
        outcome.report = {"error": f"{type(exc).__name__}: {exc}"}
    return outcome


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class _ItemFeatures:
    image: torch.Tensor  # (N_items, D_img) tower features of each item's image
    class_probs: torch.Tensor | None  # (N_items, C)
    text: torch.Tensor  # (N_items, D_txt)


def _item_features(items: list[FeedbackItem], features: FeatureSource, blob_root: Path) -> _ItemFeatures:
    if not items:
        return _ItemFeatures(torch.zeros(0, 1), None, torch.zeros(0, 1))
    unique = list(dict.fromkeys(i.image_sha256 for i in items))
    relpath = {i.image_sha256: i.image_relpath for i in items}
    img = features.images([ImageRef(sha, blob_root / relpath[sha]) for sha in unique])
    index = {sha: k for k, sha in enumerate(unique)}
    pos = torch.tensor([index[i.image_sha256] for i in items])
    text = features.texts([i.text for i in items])
    return _ItemFeatures(img.features[pos], None if img.class_probs is None else img.class_probs[pos], text)


def _agreement_bank(replay: PairFeatures, size: int, seed: int) -> torch.Tensor:
    return replay.text[subsample_candidates(replay.text.shape[0], size, seed + 1)]  # (B, D_txt)


def _cross_fit_agreement(current: ModelVersion, items: list[FeedbackItem], f: _ItemFeatures, replay: PairFeatures,
                         bank: torch.Tensor, config, settings: JobSettings, seed: int) -> tuple[np.ndarray, str]:
    """Agreement of each pair under a model that learned from the *other* new pairs (2-fold cross-fitting).

    The current model has never seen a new category, so its honest captions look as random as
    poison. Fine-tuned briefly on the other half of the batch, it learns whatever the honest pairs
    share, and their agreement rises; random captions share nothing and stay near 0 (the small-loss
    idea of learning with noisy labels, e.g. Co-teaching, Han et al. 2018). Folds are by image;
    only training-side items fit the scorers, held-out items are scored by both and averaged.
    """
    pair_rows = [i for i, item in enumerate(items) if item.kind == "pair"]
    train_rows = [i for i in pair_rows if not items[i].heldout]
    fold = {i: int(hash_fraction(items[i].image_sha256, "mmapp-clean-fold-v1") < 0.5) for i in train_rows}
    sizes = [sum(1 for i in train_rows if fold[i] == k) for k in (0, 1)]
    if settings.clean_epochs <= 0 or min(sizes) < 5:
        return _agreement(current.space, f, bank), "current model"
    out = np.full(len(items), np.nan)
    heldout_rows = [i for i in pair_rows if items[i].heldout]
    heldout_scores = []
    replay_fit = _cap_images(replay, 1000, seed + 4)
    joint_dim = current.space.model.config.joint_dim if current.space.model is not None else config.model.joint_dim
    row_of = {item.item_id: i for i, item in enumerate(items)}
    for k in (0, 1):
        fit_pairs = _pairs_of([items[i] for i in train_rows if fold[i] != k], row_of, f)  # one row per image
        scorer, _, _ = fit_projections(current.space, replay_fit, fit_pairs, config.train, settings.fine_tune,
                                       epochs=settings.clean_epochs, lr_scale=settings.clean_lr_scale,
                                       joint_dim=joint_dim)
        scorer.mix = 0.0  # projections only: the bridge part is what the current model already scored
        scored = [i for i in train_rows if fold[i] == k]
        out[scored] = _agreement(scorer, _subset(f, scored), bank)
        if heldout_rows:
            heldout_scores.append(_agreement(scorer, _subset(f, heldout_rows), bank))
    if heldout_rows:
        out[heldout_rows] = np.mean(heldout_scores, axis=0)
    return out, f"2-fold cross-fitted projections ({settings.clean_epochs} epochs)"


def _subset(f: _ItemFeatures, rows: list[int]) -> _ItemFeatures:
    idx = torch.tensor(rows, dtype=torch.long)
    return _ItemFeatures(f.image[idx], None if f.class_probs is None else f.class_probs[idx], f.text[idx])


def _agreement(space, feats: _ItemFeatures, bank: torch.Tensor) -> np.ndarray:
    """Each pair's served image–text score standardised against the same image's scores with the
    bank captions: about 0 for a random caption, several units for a fitting one."""
    if feats.text.shape[0] == 0:
        return np.zeros(0)
    iv = space.image_views(feats.image, feats.class_probs)
    own = space.similarity(iv, space.text_views(feats.text)).diagonal()  # (N,)
    ref = space.similarity(iv, space.text_views(bank))  # (N, B)
    return ((own - ref.mean(1)) / ref.std(1).clamp_min(1e-6)).numpy()


def _pairs_of(items: list[FeedbackItem], row_of: dict[str, int], f: _ItemFeatures) -> PairFeatures | None:
    """Pairs features for items; captions of one image share one image row."""
    if not items:
        return None
    image_rows: dict[str, int] = {}
    first_row: list[int] = []
    for item in items:
        if item.image_sha256 not in image_rows:
            image_rows[item.image_sha256] = len(image_rows)
            first_row.append(row_of[item.item_id])
    first = torch.tensor(first_row)
    rows = torch.tensor([row_of[i.item_id] for i in items])
    return PairFeatures(f.image[first], None if f.class_probs is None else f.class_probs[first], f.text[rows],
                        np.array([image_rows[i.image_sha256] for i in items], dtype=np.int64))


def _labels_of(items: list[FeedbackItem], row_of: dict[str, int], f: _ItemFeatures,
               labels: list[str]) -> LabelledMemes | None:
    if not items:
        return None
    rows = torch.tensor([row_of[i.item_id] for i in items])
    return LabelledMemes(f.image[rows], f.text[rows], torch.tensor([labels.index(i.label) for i in items]),
                         np.array(["user"] * len(items)))


def _meme_split(memes, split: str) -> LabelledMemes | None:
    if memes is None:
        return None
    mask = memes.splits == split
    if not mask.any():
        return None
    m = torch.as_tensor(mask)
    return LabelledMemes(memes.image[m], memes.text[m], memes.labels[m], np.array(["replay"] * int(mask.sum())))


def _cap_images(feats: PairFeatures, max_images: int, seed: int) -> PairFeatures:
    n = feats.image_features.shape[0]
    return feats if n <= max_images else feats.subset_images(subsample_candidates(n, max_images, seed + 3))


def _caption_temperature(space, val: PairFeatures, current: ModelVersion) -> float:
    try:
        from mmapp.pipeline import caption_temperature

        return caption_temperature(space, val)
    except Exception:  # keep the parent's calibration rather than fail a good candidate
        log.exception("caption temperature failed; keeping the parent's")
        return float(current.meta.get("caption_temperature", 0.05))


def _selection_stats(selection: Selection) -> dict:
    count = lambda items, kind: sum(1 for i in items if i.kind == kind)
    return {"train_pairs": count(selection.train, "pair"), "train_labels": count(selection.train, "label"),
            "heldout_pairs": count(selection.heldout, "pair"), "heldout_labels": count(selection.heldout, "label"),
            "ignored": selection.ignored}


def _final_rejections(cleaning: CleaningResult, by_id: dict[str, FeedbackItem]) -> list[int]:
    return [by_id[r.candidate.item_id].correction_id for r in cleaning.rejected
            if r.final and by_id[r.candidate.item_id].correction_id is not None]


def _record_rejections(engine: Engine, run_id: int, cleaning: CleaningResult, by_id: dict[str, FeedbackItem]) -> None:
    def write() -> None:
        with Session(engine) as s, s.begin():
            for r in cleaning.rejected:
                item = by_id[r.candidate.item_id]
                repo.record_rejected_item(s, run_id=run_id, reason=r.reason, correction_id=item.correction_id,
                                          detail={**r.detail, "item_id": item.item_id, "kind": item.kind,
                                                  "text": item.text, "label": item.label, "user": item.user,
                                                  "image_sha256": item.image_sha256, "final": REASONS[r.reason],
                                                  "heldout": item.heldout})
    retry_on_busy(write)


def _finish(engine: Engine, run_id: int, status: str, message: str, *, stats: dict,
            candidate_version: Optional[str] = None, final_rejections: list[int] = ()) -> None:
    def write() -> None:
        with Session(engine) as s, s.begin():
            repo.mark_corrections(s, final_rejections, status="rejected")
            repo.finish_retrain_run(s, run_id, status=status, message=message, stats=stats,
                                    candidate_version=candidate_version)
    retry_on_busy(write)


def _set_report_path(engine: Engine, run_id: int, version: Optional[str], path: str) -> None:
    def write() -> None:
        with Session(engine) as s, s.begin():
            run = s.get(RetrainRun, run_id)
            run.report_path = path
            if version is not None:
                row = repo.get_version(s, version)
                if row is not None:
                    row.report_path = path
    retry_on_busy(write)


def _towers_note(config) -> str:
    """What this run does with the encoder towers, said in the stats, manifest and report."""
    n = config.train.unfreeze_last_n
    if n <= 0:
        return "frozen (features from the embedding cache)"
    log.warning("train.unfreeze_last_n=%d is not applied by the retrain job: it trains on cached features "
                "with frozen towers (mmapp.finetune unfreezes blocks, outside this job)", n)
    return (f"frozen: train.unfreeze_last_n={n} is honoured by mmapp.finetune only, not by this job "
            "(a fine-tuned tower would need its own cache identity, re-encoded sets and fusion head)")


def _strip_history(info: dict) -> dict:
    """Training info without the per-epoch history and the mix search tables (too long for a manifest)."""
    def strip(d: dict) -> dict:
        out = {k: v for k, v in d.items() if k not in ("history", "mix_table")}
        if isinstance(out.get("local_mix"), dict):
            out["local_mix"] = {k: v for k, v in out["local_mix"].items() if k != "table"}
        return out
    return {part: strip(d) for part, d in info.items()}


def _manifest(config, *, run_id, version, parent, selection, replay_idx, features, stats, candidate_info, flat,
              decision, cleaning) -> dict:
    from mmapp.pipeline import code_version

    return {
        "run_id": run_id, "version": version, "parent_version": parent, "seed": config.train.seed,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "code_version": code_version(), "python": platform.python_version(), "torch": torch.__version__,
        "encoders": features.identity,
        "config": _jsonable(dataclasses.asdict(config)),
        "data": {"snapshot_sha256": selection.snapshot_hash(replay_idx), "replay_images": int(len(replay_idx)),
                 "train_items": [i.item_id for i in selection.train],
                 "heldout_items": [i.item_id for i in selection.heldout],
                 "rejected": {r.candidate.item_id: r.reason for r in cleaning.rejected}},
        "training": _strip_history(candidate_info),
        "metrics": flat, "gate": decision, "stats": {k: v for k, v in stats.items() if k != "metrics"},
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


