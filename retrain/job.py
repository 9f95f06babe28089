"""One retrain run, as named stages: select → [caption] → features → clean → train → evaluate → gate → promote → report.

The "caption" stage runs only when the profile has a generative captioner (:mod:`retrain.captioner_stage`:
it fine-tunes the captioner's text decoder and gates it on caption metrics); promotion then saves a
version when either part passed its gate, carrying what passed (the retrieval candidate or the current
space; the new decoder delta or the current one).

Each stage is a function with a typed input and output (the dataclasses below); :func:`_stages`
is the short driver that calls them in order, and :class:`RunContext.stage` records each stage's
timing and progress on the run row. Every trigger (the CLI, the nightly scheduler, the operator's
button) goes through :func:`start_run` and :func:`drive`.

At most one run at a time across processes: a database lease (``locks`` row) taken together with
the ``retrain_runs`` row, renewed by a heartbeat thread that also stamps the run row. A worker
killed outright stops heartbeating; the next start marks its row failed and, once the lease has
expired, runs normally. Nothing is registered until the final promotion transaction
(:mod:`retrain.promotion`), so a crash never leaves a half-made version behind.
Knobs: ``config.retrain`` (selection, cleaning, gates, lease) and ``config.finetune`` (training).
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
from collections import Counter
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
from mmapp.config import Config, RetrainConfig, redacted
from mmapp.evaluation import subsample_candidates
from mmapp.model_store import ModelStore, ModelVersion, VersionMeta, write_text_atomic
from mmapp.text_features import meme_text_features
from mmapp.training import MemeExamples, PairFeatures

from retrain import captioner_stage
from retrain.blind import BlindOutputs, make_pairs
from retrain.cleaning import ANONYMOUS_CAP, REASONS, Candidate, CleaningConfig, CleaningResult, clean
from retrain.evaluation import (TARGET_LABELS, TARGET_PAIRS, EvalSets, evaluate_model, gate_metrics,
                                small_set_tolerances)
from retrain.features import FeatureSource, ImageRef
from retrain.gates import GateDecision, GateSpec, decide
from retrain.promotion import adopt_store_current, hold_version, promote_version, sync_pointer
from retrain.selection import FeedbackItem, Selection, hash_fraction, load_feedback, replay_sample, split_items
from retrain.train import CandidateModel, TrainingSet, fine_tune, fit_scorer

log = logging.getLogger(__name__)

LOCK_NAME = "retrain"  # the run lease (locks row)
STAGES = ("select", "caption", "features", "clean", "train", "evaluate", "gate", "promote", "report")
_STAGE_PROGRESS = {"select": 0.05, "caption": 0.07, "features": 0.1, "clean": 0.2, "train": 0.3, "evaluate": 0.75, "gate": 0.85,
                   "promote": 0.9, "report": 0.95}


@dataclass
class RunOutcome:
    status: str  # busy | skipped | promoted | held (saved, waiting for blind votes) | refused | failed
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

    def __init__(self, engine: Engine, run_id: int, owner: str, settings: RetrainConfig):
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
                        held = repo.refresh_lock(s, LOCK_NAME, self.owner, self.settings.lock_ttl_s)
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
            raise LeaseLost(f"run {self.run_id} lost the {LOCK_NAME!r} lease")

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
                repo.release_lock(s, LOCK_NAME, self.owner)
        try:
            retry_on_busy(release)
        except Exception:  # it expires on its own
            log.exception("could not release the retrain lease")


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def expire_stale_runs(engine: Engine, settings: RetrainConfig) -> int:
    """Mark runs whose worker stopped heartbeating as failed; returns how many."""
    def expire() -> int:
        with Session(engine) as s, s.begin():
            return repo.fail_stale_retrain_runs(s, older_than_s=settings.stale_after_s)
    return retry_on_busy(expire)


def begin_run(engine: Engine, *, trigger: str, settings: RetrainConfig,
              owner: Optional[str] = None) -> Optional[RunHandle]:
    """Take the retrain lease and open a run row in one transaction; None if another run holds it."""
    owner = owner or new_owner()
    expire_stale_runs(engine, settings)

    def start() -> Optional[int]:
        with Session(engine) as s, s.begin():
            if not repo.try_acquire_lock(s, LOCK_NAME, owner, settings.lock_ttl_s):
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


def fail_run(engine: Engine, run_id: int, message: str) -> None:
    """Record a run as failed (used when it dies before :func:`execute_run` can record anything)."""
    def write() -> None:
        with Session(engine) as s, s.begin():
            repo.finish_retrain_run(s, run_id, status="failed", message=message[:2000])
    retry_on_busy(write)


def default_features(config: Config) -> FeatureSource:
    from mmapp.towers import Towers
    from retrain.features import TowerFeatureSource

    return TowerFeatureSource(Towers.from_config(config), config)


# --- triggers ---------------------------------------------------------------------------------

FeaturesFactory = Callable[[], FeatureSource]


def start_run(config: Config, engine: Engine, *, trigger: str) -> RunHandle | RunOutcome:
    """Take the lease and open the run row, or say who is running ('busy')."""
    handle = begin_run(engine, trigger=trigger, settings=config.retrain)
    if handle is None:
        other = running_run_id(engine)
        return RunOutcome("busy", other, f"a retrain is already running (run {other})")
    return handle


def drive(handle: RunHandle, config: Config, *, features: Optional[FeatureSource] = None,
          features_factory: Optional[FeaturesFactory] = None, force: bool = False,
          on_stage: Optional[Callable[[str], None]] = None) -> RunOutcome:
    """Everything after the lease, for every trigger: seed, get the feature source (``features``, else
    ``features_factory()``, else towers built from ``config``), run the stages, release the lease."""
    from mmapp.device import seed_everything

    try:
        seed_everything(config.train.seed)
        if features is None:
            try:
                features = features_factory() if features_factory is not None else default_features(config)
            except Exception as exc:
                message = f"could not build the feature source: {type(exc).__name__}: {exc}"
                log.exception("retrain run %s failed before it started", handle.run_id)
                fail_run(handle.engine, handle.run_id, message)
                return RunOutcome("failed", handle.run_id, message)
        return execute_run(handle, config, features=features, force=force, on_stage=on_stage)
    finally:
        handle.close()


def run_retrain(config: Config, engine: Engine, *, trigger: str = "cli", features: Optional[FeatureSource] = None,
                force: bool = False, on_stage: Optional[Callable[[str], None]] = None) -> RunOutcome:
    """Run one retrain now, in this thread, if no other is running (else status 'busy')."""
    handle = start_run(config, engine, trigger=trigger)
    if isinstance(handle, RunOutcome):
        return handle
    return drive(handle, config, features=features, force=force, on_stage=on_stage)


# --- the run ----------------------------------------------------------------------------------


class StopRun(Exception):
    """A stage found nothing to do: the run ends 'skipped' (its row 'succeeded') with this message."""

    def __init__(self, message: str, stats: dict, final_rejections: list[int] = ()):
        super().__init__(message)
        self.message, self.stats, self.final_rejections = message, stats, list(final_rejections)


@dataclass
class RunContext:
    handle: RunHandle
    config: Config
    features: FeatureSource
    store: ModelStore
    force: bool
    on_stage: Optional[Callable[[str], None]] = None
    marks: list[tuple[str, float]] = field(default_factory=list)  # (stage, monotonic start)

    @property
    def engine(self) -> Engine:
        return self.handle.engine

    @property
    def run_id(self) -> int:
        return self.handle.run_id

    def stage(self, name: str) -> None:
        self.handle.check()
        self.marks.append((name, time.monotonic()))
        if name != "report":  # the run row is final by then: keep its status message and progress
            self.handle.progress(_STAGE_PROGRESS[name], f"{name}…", stats={"stage": name})
        if self.on_stage is not None:
            self.on_stage(name)

    def stage_seconds(self) -> dict[str, float]:
        ends = [t for _, t in self.marks[1:]] + [time.monotonic()]
        return {name: round(end - t, 2) for (name, t), end in zip(self.marks, ends)}


def execute_run(handle: RunHandle, config: Config, *, features: FeatureSource, force: bool = False,
                on_stage: Optional[Callable[[str], None]] = None) -> RunOutcome:
    """The stages after the lease: never raises for a failed run (it is recorded and returned)."""
    started = time.monotonic()
    ctx = RunContext(handle, config, features, ModelStore(config.paths.models), force, on_stage)
    try:
        outcome = _stages(ctx)
    except StopRun as stop:
        _finish(ctx.engine, ctx.run_id, "succeeded", stop.message, stats=stop.stats,
                final_rejections=stop.final_rejections)
        outcome = RunOutcome("skipped", ctx.run_id, stop.message, current_version=stop.stats.get("current_version"),
                             stats=stop.stats)
    except Exception as exc:  # recorded on the run row; the current model keeps serving
        log.exception("retrain run %s failed", ctx.run_id)
        message = f"{type(exc).__name__}: {exc}"
        try:
            fail_run(ctx.engine, ctx.run_id, message)
            sync_pointer(ctx.engine, ctx.store)
        except Exception:
            log.exception("could not record the failure of run %s", ctx.run_id)
        outcome = RunOutcome("failed", ctx.run_id, message)
    outcome.seconds = round(time.monotonic() - started, 2)
    outcome.stats["stage_seconds"] = ctx.stage_seconds()
    return outcome


def _stages(ctx: RunContext) -> RunOutcome:
    """The driver: each stage in order, each output the next one's input."""
    ctx.stage("select")
    selected = select_feedback(ctx)
    captioned = None
    if captioner_stage.enabled(ctx.config):  # profiles without a generative captioner never get here
        ctx.stage("caption")
        captioned = fine_tune_captioner(ctx, selected)
    try:
        ctx.stage("features")
        feats = gather_features(ctx, selected)
        ctx.stage("clean")
        cleaned = clean_feedback(ctx, selected, feats)
        ctx.stage("train")
        trained = train_candidate(ctx, selected, feats, cleaned)
        ctx.stage("evaluate")
        evaluated = evaluate_candidate(ctx, selected, feats, cleaned, trained)
        ctx.stage("gate")
        gated = gate_candidate(ctx, trained, evaluated)
    except LeaseLost:
        raise
    except Exception as exc:  # the retrieval part stopped or failed: a captioner that passed its gate still ships
        if captioned is None:
            raise
        if isinstance(exc, StopRun):  # nothing for the retrieval part: the run is skipped, the captioner's word kept
            if not captioned.promote:
                exc.stats["captioner"] = captioned.to_dict()
                raise
        elif not captioned.promote:  # failed, with what the captioner part concluded beside the error
            log.exception("retrain run %s failed", ctx.run_id)
            message = f"{type(exc).__name__}: {exc} (and {captioned.message})"
            stats = {"current_version": selected.current_name, "captioner": captioned.to_dict()}
            _finish(ctx.engine, ctx.run_id, "failed", message, stats=stats)
            sync_pointer(ctx.engine, ctx.store)
            return RunOutcome("failed", ctx.run_id, message, current_version=selected.current_name, stats=stats)
        log.warning("run %s: retrieval part ended (%s: %s); promoting the captioner alone", ctx.run_id,
                    type(exc).__name__, exc)
        ctx.stage("promote")
        promoted = promote_captioner_only(ctx, selected, captioned, f"{type(exc).__name__}: {exc}")
        ctx.stage("report")
        promoted.outcome.report = write_report(ctx, promoted)
        return promoted.outcome
    ctx.stage("promote")
    promoted = promote_or_refuse(ctx, selected, feats, cleaned, trained, evaluated, gated, captioned)
    ctx.stage("report")
    promoted.outcome.report = write_report(ctx, promoted)
    return promoted.outcome


# --- stage: select ----------------------------------------------------------------------------


@dataclass
class Selected:
    current_name: str
    current: ModelVersion
    selection: Selection


def select_feedback(ctx: RunContext) -> Selected:
    """The current version and the feedback not yet used; stops when there is too little of it."""
    current_name = adopt_store_current(ctx.engine, ctx.store)
    if current_name is None:
        raise RuntimeError("no current model version: build the bootstrap model first (python -m mmapp build-bootstrap)")
    current = ctx.store.load(current_name)
    trained_on = current.meta.encoders
    if trained_on and trained_on != ctx.features.identity:
        raise ValueError(f"current model {current_name!r} was trained on encoders {trained_on}, "
                         f"but the feature source has {ctx.features.identity}")

    def read_selection() -> Selection:
        with Session(ctx.engine) as s, s.begin():
            return load_feedback(s, min_rating=ctx.config.retrain.min_rating)
    selection = retry_on_busy(read_selection)
    min_new = max(1, ctx.config.retrain.min_new_items) if not ctx.force else 1
    if selection.new_training_items < min_new:
        raise StopRun(f"nothing to learn from: {selection.new_training_items} new item(s), need {min_new}",
                      stats={"selection": _selection_stats(selection), "current_version": current_name})
    return Selected(current_name, current, selection)


# --- stage: caption (only with a generative captioner) ----------------------------------------


def fine_tune_captioner(ctx: RunContext, selected: Selected) -> captioner_stage.CaptionerOutcome:
    """The captioner's own trust → clean → train → evaluate → gate (:mod:`retrain.captioner_stage`); a
    failure there is recorded (status "failed") and the retrieval part runs on."""
    try:
        outcome = captioner_stage.run_captioner_stage(ctx.config, selected.current, selected.selection.train,
                                                      selected.selection.heldout)
    except LeaseLost:
        raise
    except Exception as exc:  # the captioner's trouble must not stop the retrieval part of the run
        log.exception("run %s: captioner stage failed", ctx.run_id)
        outcome = captioner_stage.CaptionerOutcome("failed", f"captioner stage failed: {type(exc).__name__}: {exc}")
    ctx.handle.progress(_STAGE_PROGRESS["caption"], outcome.message[:500],
                        stats={"captioner": {"status": outcome.status, "message": outcome.message}})
    return outcome


def promote_captioner_only(ctx: RunContext, selected: Selected, captioned: captioner_stage.CaptionerOutcome,
                           retrieval_ended: str) -> "Promoted":
    """A version with the current space and fusion head and the captioner's new decoder, made current."""
    config, run_id, current = ctx.config, ctx.run_id, selected.current
    version = f"r{run_id:04d}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    reason = f"{captioned.message}; retrieval part not run to its gate ({retrieval_ended})"
    stats = {"current_version": selected.current_name, "selection": _selection_stats(selected.selection),
             "captioner": captioned.to_dict(), "retrieval_ended": retrieval_ended}
    metrics = {"captioner": captioned.metrics.get("candidate", {})}
    from mmapp.pipeline import code_version

    manifest = {"run_id": run_id, "version": version, "parent_version": selected.current_name,
                "seed": config.train.seed, "created_at": datetime.now(timezone.utc).isoformat(),
                "code_version": code_version(), "config": redacted(config), "captioner": captioned.to_dict(),
                "retrieval_ended": retrieval_ended,
                "data": {"train_items": [i.item_id for i in selected.selection.train],
                         "heldout_items": [i.item_id for i in selected.selection.heldout]}}
    write_text_atomic(config.paths.run_dir(run_id) / "manifest.json", json.dumps(manifest, indent=2, default=str))
    meta = VersionMeta(labels=current.meta.labels, encoders=current.meta.encoders,
                       meme_text_features=current.meta.meme_text_features,
                       caption_temperature=current.meta.caption_temperature, parent=selected.current_name,
                       metrics=metrics, manifest=manifest, training={"captioner": captioned.stats.get("training", {})},
                       captioner=captioned.meta(source_version=version))
    ctx.handle.check()
    ctx.store.save(version, current.space, meta=meta, fusion_head=current.fusion_head,
                   fusion_config=current.fusion_config, fusion_name=current.meta.fusion_name,
                   captioner_delta=captioned.delta)

    def bookkeeping(s: Session) -> None:
        repo.mark_corrections(s, captioned.used_correction_ids, status="used", used_in_version=version)
        repo.finish_retrain_run(s, run_id, status="promoted", message=reason[:2000], candidate_version=version,
                                stats=stats)
    promote_version(ctx.engine, ctx.store, version=version, parent_version=selected.current_name,
                    metrics=metrics, manifest=manifest, in_transaction=bookkeeping)
    gate = captioned.decision.to_dict() if captioned.decision else None
    return Promoted(RunOutcome("promoted", run_id, reason, version=version, current_version=version,
                               metrics={"captioner": captioned.metrics}, gate=gate, stats=stats), version)


# --- stage: features --------------------------------------------------------------------------


@dataclass
class GatheredFeatures:
    replay_idx: np.ndarray  # bootstrap train images in the replay sample
    replay: PairFeatures
    items: list[FeedbackItem]  # selection.train + selection.heldout, in that order
    item_feats: "_ItemFeatures"  # one row per item
    row_of: dict[str, int]  # item_id -> row
    reference_text: Optional[torch.Tensor] = None  # text embeddings of selection.references, one row each


def gather_features(ctx: RunContext, selected: Selected) -> GatheredFeatures:
    """Tower features of the replay sample and of every selected item (cache first; a miss decodes the upload)."""
    corpus_train = ctx.features.corpus("train")
    replay_idx = replay_sample(corpus_train.image_features.shape[0], ctx.config.retrain.replay_size,
                               ctx.config.train.seed)
    items = selected.selection.train + selected.selection.heldout
    item_feats = _item_features(items, ctx.features, ctx.config.paths.uploads)
    references = selected.selection.references
    reference_text = ctx.features.texts([r.text for r in references]) if references else None
    return GatheredFeatures(replay_idx, corpus_train.subset_images(replay_idx), items, item_feats,
                            {item.item_id: i for i, item in enumerate(items)}, reference_text)


# --- stage: clean -----------------------------------------------------------------------------


@dataclass
class Cleaned:
    cleaning: CleaningResult
    train_items: list[FeedbackItem]  # accepted, to learn from
    heldout_items: list[FeedbackItem]  # accepted, to evaluate on
    by_id: dict[str, FeedbackItem]
    stats: dict[str, Any]  # the run's stats so far (selection, cleaning, replay, towers)


def clean_feedback(ctx: RunContext, selected: Selected, feats: GatheredFeatures) -> Cleaned:
    """Score each pair's agreement (cross-fitted), apply the cleaning rules, record every rejection."""
    seed = ctx.config.train.seed
    items, item_feats = feats.items, feats.item_feats
    bank = _agreement_bank(feats.replay, ctx.config.retrain.agreement_bank, seed)
    agreement, agreement_how = _cross_fit_agreement(selected.current, items, item_feats, feats.replay, bank,
                                                    ctx.config, seed)
    holds = _cap_holds(ctx.engine, items)
    candidates = [Candidate(item.item_id, item.user, item.kind, item.image_sha256, item.text, item.label,
                            image_embedding=item_feats.image[i].numpy(), text_embedding=item_feats.text[i].numpy(),
                            agreement=float(agreement[i]) if item.kind == "pair" else float("nan"),
                            trusted=item.trusted, cap_holds=holds.get(item.correction_id, 0))
                  for i, item in enumerate(items)]
    references = [Candidate(r.item_id, r.user, r.kind, r.image_sha256, r.text, r.label,
                            text_embedding=feats.reference_text[k].numpy(), trusted=True)
                  for k, r in enumerate(selected.selection.references)]
    cleaning = clean(candidates, CleaningConfig.from_retrain(ctx.config.retrain), references=references)
    by_id = {item.item_id: item for item in items}
    _record_rejections(ctx.engine, ctx.run_id, cleaning, by_id)
    accepted_ids = {c.item_id for c in cleaning.accepted}
    labels = list(selected.current.labels)
    train_items = [i for i in selected.selection.train if i.item_id in accepted_ids]
    heldout_items = [i for i in selected.selection.heldout if i.item_id in accepted_ids]
    unknown_labels = {i.item_id for i in train_items + heldout_items if i.kind == "label" and i.label not in labels}
    train_items = [i for i in train_items if i.item_id not in unknown_labels]
    heldout_items = [i for i in heldout_items if i.item_id not in unknown_labels]
    stats: dict[str, Any] = {"current_version": selected.current_name,
                             "selection": _selection_stats(selected.selection),
                             "cleaning": {"candidates": len(candidates), "accepted": len(cleaning.accepted),
                                          "rejected": cleaning.counts(), "merged_copies": len(cleaning.merged),
                                          "rescued_by_rater": len(cleaning.rescued),
                                          "earlier_trusted_references": len(references),
                                          "unknown_label": len(unknown_labels)},
                             "chance_test_by_rater": cleaning.raters,
                             "replay_images": int(len(feats.replay_idx)), "agreement_scored_by": agreement_how,
                             "towers": _towers_note(ctx.config),
                             "encoded_on_cache_miss": getattr(ctx.features, "encoded_on_miss", None)}
    if not train_items:
        raise StopRun("nothing to learn from after cleaning: every new item was rejected or held back", stats,
                      final_rejections=_final_rejections(cleaning, by_id))
    ctx.handle.progress(0.25, f"clean: {len(cleaning.accepted)} accepted, {len(cleaning.rejected)} rejected",
                        stats={"cleaning": stats["cleaning"]})
    return Cleaned(cleaning, train_items, heldout_items, by_id, stats)


# --- stage: train -----------------------------------------------------------------------------


@dataclass
class Trained:
    data: TrainingSet
    candidate: CandidateModel
    memes: MemeExamples | None  # the bootstrap meme set (its test split is evaluated)


def train_candidate(ctx: RunContext, selected: Selected, feats: GatheredFeatures, cleaned: Cleaned) -> Trained:
    """Fine-tune a candidate from the current version (``retrain.train.fine_tune``)."""
    labels = list(selected.current.labels)
    fit, tune = split_items(cleaned.train_items)
    kind = selected.current.meta.meme_text_features  # the replay must feed the head what it was trained on
    memes = ctx.features.memes(text_features=kind) if kind else ctx.features.memes()
    pairs = lambda chosen: _pairs_of([i for i in chosen if i.kind == "pair"], feats.row_of, feats.item_feats)
    user_labels = lambda chosen: _labels_of([i for i in chosen if i.kind == "label"], feats.row_of, feats.item_feats,
                                            labels, kind, ctx.features.texts)
    data = TrainingSet(
        replay=feats.replay,
        val=_cap_images(ctx.features.corpus("val"), 1000, ctx.config.train.seed),
        guard=ctx.features.guard(),
        user_pairs=pairs(fit),
        tune_pairs=pairs(tune),
        memes=MemeExamples.concat(memes.split_of("train") if memes is not None else None, user_labels(fit)),
        memes_val=MemeExamples.concat(memes.split_of("val") if memes is not None else None, user_labels(tune)),
    )
    return Trained(data, fine_tune(selected.current, data, ctx.config), memes)


# --- stage: evaluate --------------------------------------------------------------------------


@dataclass
class Evaluated:
    sets: EvalSets
    nested: dict[str, dict]  # {"current": ..., "candidate": ...} full metrics with intervals
    flat: dict[str, dict[str, float | None]]  # the same, flattened to what the gate compares
    blind: BlindOutputs  # current vs candidate outputs on held-out items, for raters (retrain.blind)


def evaluate_candidate(ctx: RunContext, selected: Selected, feats: GatheredFeatures, cleaned: Cleaned,
                       trained: Trained) -> Evaluated:
    """Current and candidate on the same fixed held-out sets."""
    labels = list(selected.current.labels)
    current_kind = selected.current.meta.meme_text_features  # candidate heads read the same (fine-tuned from it)
    heldout = cleaned.heldout_items
    sets = EvalSets(bootstrap_test=ctx.features.corpus("test"),
                    heldout_pairs=_pairs_of([i for i in heldout if i.kind == "pair"], feats.row_of, feats.item_feats),
                    memes_test=trained.memes.split_of("test") if trained.memes is not None else None,
                    heldout_labels=_labels_of([i for i in heldout if i.kind == "label"], feats.row_of,
                                              feats.item_feats, labels, current_kind, ctx.features.texts),
                    report_photos=ctx.features.report_photos())
    nb = ctx.config.retrain.n_bootstrap
    current, candidate = selected.current, trained.candidate
    nested = {"current": evaluate_model(current.space, current.fusion_head, labels, sets, n_bootstrap=nb),
              "candidate": evaluate_model(candidate.space, candidate.fusion_head, labels, sets, n_bootstrap=nb)}
    return Evaluated(sets, nested, {k: gate_metrics(v) for k, v in nested.items()},
                     _blind_outputs(ctx, selected, feats, cleaned, trained))


def _blind_outputs(ctx: RunContext, selected: Selected, feats: GatheredFeatures, cleaned: Cleaned,
                   trained: Trained) -> BlindOutputs:
    """Both versions' caption for accepted held-out pairs, chosen from one pool: the accepted captions of
    this run and what the model served for them (the predictions users corrected)."""
    pairs = [i for i in cleaned.train_items + cleaned.heldout_items if i.kind == "pair"]
    heldout = [i for i in cleaned.heldout_items if i.kind == "pair"]
    if ctx.config.retrain.blind_pairs <= 0 or not heldout:
        return BlindOutputs([], 0, 0)
    rows = torch.tensor([feats.row_of[i.item_id] for i in heldout], dtype=torch.long)
    f = feats.item_feats
    pool = [i.text for i in pairs] + [i.predicted for i in pairs if i.predicted]
    return make_pairs(current=selected.current.space, candidate=trained.candidate.space, items=heldout,
                      image_features=f.image[rows], class_probs=None if f.class_probs is None else f.class_probs[rows],
                      pool_texts=pool, texts=lambda texts: ctx.features.texts(texts),
                      n=ctx.config.retrain.blind_pairs, seed=ctx.config.train.seed + ctx.run_id)


# --- stage: gate ------------------------------------------------------------------------------


@dataclass
class Gated:
    decision: GateDecision
    targets: tuple[str, ...]  # the metrics users' data should raise


def gate_candidate(ctx: RunContext, trained: Trained, evaluated: Evaluated) -> Gated:
    """Promote only if what users taught improved and nothing else regressed beyond the tolerance."""
    data = trained.data
    targets = tuple(t for t, used in ((TARGET_PAIRS, data.has_user_pairs), (TARGET_LABELS, data.has_user_labels))
                    if used)
    tolerance = ctx.config.retrain.tolerance
    return Gated(decide(evaluated.flat["current"], evaluated.flat["candidate"],
                        GateSpec(targets=targets, tolerance=tolerance,
                                 tolerances=small_set_tolerances(evaluated.sets, tolerance))), targets)


# --- stage: promote ---------------------------------------------------------------------------


@dataclass
class Promoted:
    outcome: RunOutcome
    version: str  # the candidate's name (saved only when promoted)


def promote_or_refuse(ctx: RunContext, selected: Selected, feats: GatheredFeatures, cleaned: Cleaned,
                      trained: Trained, evaluated: Evaluated, gated: Gated,
                      captioned: Optional[captioner_stage.CaptionerOutcome] = None) -> Promoted:
    """Write the manifest; save and promote the candidate in one registry transaction, or refuse it.
    With a captioner outcome, a version is saved when either part passed: what failed stays as it was."""
    config, run_id = ctx.config, ctx.run_id
    version = f"r{run_id:04d}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    candidate, current, cleaning, decision = trained.candidate, selected.current, cleaned.cleaning, gated.decision
    retrieval_promotes = decision.promote
    if captioned is not None:
        evaluated.nested["candidate"]["captioner"] = captioned.metrics.get("candidate", {})
        evaluated.nested["current"]["captioner"] = captioned.metrics.get("current", {})
        if captioned.promote and not decision.promote:  # the captioner alone passed: keep the current space
            candidate = CandidateModel(current.space, current.fusion_head, current.meta.caption_temperature,
                                       info={})
            decision = GateDecision(True, f"{captioned.message}; retrieval {decision.reason}", decision.checks)
        elif decision.promote:
            decision = GateDecision(True, f"{decision.reason}; {captioned.message}", decision.checks)
    manifest = _manifest(config, run_id=run_id, version=version, parent=selected.current_name,
                         selection=selected.selection, replay_idx=feats.replay_idx, features=ctx.features,
                         stats=cleaned.stats, candidate_info=candidate.info, flat=evaluated.flat,
                         decision=decision.to_dict(), cleaning=cleaning)
    run_dir = config.paths.run_dir(run_id)
    write_text_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
    stats = cleaned.stats
    if captioned is not None:
        stats["captioner"] = captioned.to_dict()
    stats.update(gate=decision.to_dict(), metrics=evaluated.nested, flat_metrics=evaluated.flat,
                 targets=list(gated.targets), training=_strip_history(candidate.info), manifest_path=str(run_dir / "manifest.json"),
                 data_snapshot_sha256=manifest["data"]["snapshot_sha256"])
    used_ids = _with_copies([i.item_id for i in cleaned.train_items], cleaning, cleaned.by_id)
    if captioned is not None and captioned.promote:  # what the promoted parts learned from is used up
        used_ids = sorted((set(used_ids) if retrieval_promotes else set()) | set(captioned.used_correction_ids))
    final = _final_rejections(cleaning, cleaned.by_id)
    blind = evaluated.blind
    stats["blind"] = {"pairs": len(blind.pairs), "identical": blind.identical, "pool": blind.pool,
                      "required": config.retrain.blind_required}
    # A run with nothing to show raters (labels only, or both versions chose the same caption on every sampled
    # item) is decided by the metric gate alone, even when retrain.blind_required is on.
    hold = retrieval_promotes and config.retrain.blind_required and bool(blind.pairs)

    def add_pairs(s: Session) -> None:
        repo.add_blind_pairs(s, run_id=run_id, candidate_version=version, current_version=selected.current_name,
                             pairs=blind.pairs)

    def save_candidate() -> None:
        # the captioner: the new decoder when it passed its gate, else the current version's (if any)
        new_captioner = captioned is not None and captioned.promote
        meta = VersionMeta(labels=current.meta.labels, encoders=current.meta.encoders,
                           meme_text_features=current.meta.meme_text_features,
                           caption_temperature=candidate.caption_temperature, parent=selected.current_name,
                           metrics=evaluated.nested["candidate"], manifest=manifest,
                           training=_strip_history(candidate.info),
                           captioner=captioned.meta(source_version=version) if new_captioner
                           else dict(current.meta.captioner))
        ctx.store.save(version, candidate.space, meta=meta, fusion_head=candidate.fusion_head,
                       fusion_config=current.fusion_config, fusion_name=current.meta.fusion_name,
                       captioner_delta=captioned.delta if new_captioner else current.captioner_delta)
        ctx.handle.check()
    ctx.handle.check()
    if hold:  # saved and registered, not current: retrain.blind.decide_held promotes or rejects it on the votes
        manifest["blind_hold"] = {"used_correction_ids": used_ids, "min_votes": config.retrain.blind_min_votes,
                                  "min_win_rate": config.retrain.blind_min_win_rate}
        save_candidate()
        message = (f"{decision.reason}; held for blind evaluation: {len(blind.pairs)} pair(s), needs "
                   f"{config.retrain.blind_min_votes} votes")

        def held_bookkeeping(s: Session) -> None:
            add_pairs(s)
            repo.mark_corrections(s, final, status="rejected")
            repo.finish_retrain_run(s, run_id, status="succeeded", message=message, candidate_version=version,
                                    stats=stats)
        hold_version(ctx.engine, ctx.store, version=version, parent_version=selected.current_name,
                     metrics=evaluated.nested["candidate"], manifest=manifest, in_transaction=held_bookkeeping)
        return Promoted(RunOutcome("held", run_id, message, version=version, current_version=selected.current_name,
                                   metrics=evaluated.flat, gate=decision.to_dict(), stats=stats), version)
    if decision.promote:
        save_candidate()

        def bookkeeping(s: Session) -> None:
            repo.mark_corrections(s, used_ids, status="used", used_in_version=version)
            repo.mark_corrections(s, final, status="rejected")
            repo.finish_retrain_run(s, run_id, status="promoted", message=decision.reason,
                                    candidate_version=version, stats=stats)
            add_pairs(s)  # votes after the fact: reported, they block nothing (retrain.blind_required is off)
        promote_version(ctx.engine, ctx.store, version=version, parent_version=selected.current_name,
                        metrics=evaluated.nested["candidate"], manifest=manifest, in_transaction=bookkeeping)
        status, serving = "promoted", version
    else:
        _finish(ctx.engine, run_id, "refused", decision.reason, stats=stats, candidate_version=version,
                final_rejections=final)
        status, serving = "refused", selected.current_name
    return Promoted(RunOutcome(status, run_id, decision.reason, version=version, current_version=serving,
                               metrics=evaluated.flat, gate=decision.to_dict(), stats=stats), version)


# --- stage: report ----------------------------------------------------------------------------


def write_report(ctx: RunContext, promoted: Promoted) -> dict:
    """The human-eval report (HTML + JSON); a failure here leaves the run's result standing."""
    try:
        from retrain.report import build_report

        paths = build_report(ctx.config, ctx.engine, version=promoted.version)
        _set_report_path(ctx.engine, ctx.run_id, promoted.version if promoted.outcome.status == "promoted" else None,
                         str(paths["html"]))
        return {k: str(v) for k, v in paths.items()}
    except Exception as exc:
        log.exception("report for run %s failed", ctx.run_id)
        return {"error": f"{type(exc).__name__}: {exc}"}


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
                         bank: torch.Tensor, config: Config, seed: int) -> tuple[np.ndarray, str]:
    """Agreement of each pair under a model that learned from the *other* new pairs (k-fold cross-fitting,
    ``retrain.clean_folds``; 2 by default).

    The current model has never seen a new category, so its honest captions look as random as
    poison. Fine-tuned briefly on the other folds of the batch, it learns whatever the honest pairs
    share, and their agreement rises; random captions share nothing and stay near 0 (the small-loss
    idea of learning with noisy labels, e.g. Co-teaching, Han et al. 2018). Folds are by image;
    only training-side items fit the scorers, held-out items are scored by each and averaged.
    """
    settings = config.retrain
    k_folds = max(2, settings.clean_folds)
    pair_rows = [i for i, item in enumerate(items) if item.kind == "pair"]
    train_rows = [i for i in pair_rows if not items[i].heldout]
    fold = {i: min(int(hash_fraction(items[i].image_sha256, "mmapp-clean-fold-v1") * k_folds), k_folds - 1)
            for i in train_rows}
    sizes = [sum(1 for i in train_rows if fold[i] == k) for k in range(k_folds)]
    if settings.clean_epochs <= 0 or min(sizes) < 5:
        return _agreement(current.space, f, bank), "current model"
    out = np.full(len(items), np.nan)
    heldout_rows = [i for i in pair_rows if items[i].heldout]
    heldout_scores = []
    replay_fit = _cap_images(replay, 1000, seed + 4)
    row_of = {item.item_id: i for i, item in enumerate(items)}
    for k in range(k_folds):
        fit_pairs = _pairs_of([items[i] for i in train_rows if fold[i] != k], row_of, f)  # one row per image
        scorer = fit_scorer(current.space, replay_fit, fit_pairs, config, epochs=settings.clean_epochs,
                            lr_scale=settings.clean_lr_scale)
        scored = [i for i in train_rows if fold[i] == k]
        out[scored] = _agreement(scorer, _subset(f, scored), bank)
        if heldout_rows:
            heldout_scores.append(_agreement(scorer, _subset(f, heldout_rows), bank))
    if heldout_rows:
        out[heldout_rows] = np.mean(heldout_scores, axis=0)
    return out, f"{k_folds}-fold cross-fitted projections ({settings.clean_epochs} epochs)"


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
               labels: list[str], text_features: str = "", embed=None) -> MemeExamples | None:
    """Label corrections as meme-head examples; the text side through ``mmapp.text_features`` with the
    kind the current version's head reads (the tower embeddings already gathered are reused)."""
    if not items:
        return None
    rows = torch.tensor([row_of[i.item_id] for i in items])
    text = meme_text_features([i.text for i in items], text_features, embed, raw=f.text[rows]) \
        if text_features else f.text[rows]
    return MemeExamples(f.image[rows], text, torch.tensor([labels.index(i.label) for i in items]),
                        np.array(["train"] * len(items)), np.array(["user"] * len(items)))


def _cap_images(feats: PairFeatures, max_images: int, seed: int) -> PairFeatures:
    n = feats.image_features.shape[0]
    return feats if n <= max_images else feats.subset_images(subsample_candidates(n, max_images, seed + 3))


def _selection_stats(selection: Selection) -> dict:
    count = lambda items, kind: sum(1 for i in items if i.kind == kind)
    return {"train_pairs": count(selection.train, "pair"), "train_labels": count(selection.train, "label"),
            "heldout_pairs": count(selection.heldout, "pair"), "heldout_labels": count(selection.heldout, "label"),
            "ignored": selection.ignored}


def _with_copies(item_ids: list[str], cleaning: CleaningResult, by_id: dict[str, FeedbackItem]) -> list[int]:
    """Correction ids of ``item_ids`` and of the agreeing copies collapsed into them (they share the fate)."""
    chosen = set(item_ids)
    ids = item_ids + [copy for copy, kept in cleaning.merged.items() if kept in chosen]
    return [by_id[i].correction_id for i in ids if by_id[i].correction_id is not None]


def _final_rejections(cleaning: CleaningResult, by_id: dict[str, FeedbackItem]) -> list[int]:
    return _with_copies([r.candidate.item_id for r in cleaning.rejected if r.final], cleaning, by_id)


def _cap_holds(engine: Engine, items: list[FeedbackItem]) -> dict[int, int]:
    """correction id -> earlier runs that held it back by the anonymous cap (cleaning.ANONYMOUS_CAP)."""
    ids = [i.correction_id for i in items if i.correction_id is not None and not i.trusted]
    if not ids:
        return {}

    def read() -> dict[int, int]:
        with Session(engine) as s, s.begin():
            rows = repo.rejected_items(s, correction_ids=ids)
            return dict(Counter(r.correction_id for r in rows if r.reason == ANONYMOUS_CAP))
    return retry_on_busy(read)


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
            repo.set_run_report_path(s, run_id, path, version=version)
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
        for part in ("local_mix", "caption_memory"):
            if isinstance(out.get(part), dict):
                out[part] = {k: v for k, v in out[part].items() if k != "table"}
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
        "config": redacted(config),
        "data": {"snapshot_sha256": selection.snapshot_hash(replay_idx), "replay_images": int(len(replay_idx)),
                 "train_items": [i.item_id for i in selection.train],
                 "heldout_items": [i.item_id for i in selection.heldout],
                 "rejected": {r.candidate.item_id: r.reason for r in cleaning.rejected}},
        "training": _strip_history(candidate_info),
        "metrics": flat, "gate": decision, "stats": {k: v for k, v in stats.items() if k != "metrics"},
    }
