"""Blind before/after human evaluation (issue 10, item 4): make comparison pairs, score the votes, decide held candidates.

A retrain run writes, for a sample of accepted held-out items, what the current and the candidate
version answer, in a random order per pair (:func:`make_pairs`); raters pick the better one in the
Compare tab; :func:`win_rate` turns the votes into the candidate's win rate with a Wilson 95%
interval; :func:`decide_held` promotes a held candidate (``retrain.blind_required``) once enough votes
are in and the interval's lower bound clears ``retrain.blind_min_win_rate``, or rejects it, through
:mod:`retrain.promotion` (the one authority for the current version).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from mmapp.config import Config
from mmapp.joint import JointSpace
from mmapp.model_store import ModelStore
from retrain.promotion import promote_version
from retrain.selection import FeedbackItem, hash_fraction

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927); ``successes`` may be fractional (ties count 1/2).
    n = 0 says nothing: (0, 1)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    candidate: int  # votes for the candidate's output
    current: int  # votes for the current version's output
    same: int  # "same" votes, counted as half a win each
    votes: int
    pairs: int
    raters: int
    rate: Optional[float]  # (candidate + same/2) / votes; None without votes
    low: float  # Wilson 95% interval of the rate
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate(tally: dict[str, int]) -> WinRate:
    """The candidate's win rate from :func:`feedback_db.repository.blind_tally`'s counts."""
    votes = tally["candidate"] + tally["current"] + tally["same"]
    wins = tally["candidate"] + 0.5 * tally["same"]
    low, high = wilson_interval(wins, votes)
    return WinRate(tally["candidate"], tally["current"], tally["same"], votes, tally.get("pairs", 0),
                   tally.get("raters", 0), wins / votes if votes else None, low, high)


def read_win_rate(engine: Engine, candidate_version: str) -> WinRate:
    def read() -> WinRate:
        with Session(engine) as s, s.begin():
            return win_rate(repo.blind_tally(s, candidate_version))
    return retry_on_busy(read)


# --- making pairs (no database here) -----------------------------------------------------------


@dataclass(frozen=True)
class BlindOutputs:
    pairs: list[dict[str, str]]  # rows for repository.add_blind_pairs
    identical: int  # sampled items where both versions said the same (not shown: nothing to judge)
    pool: int  # captions both versions chose from


def make_pairs(*, current: JointSpace, candidate: JointSpace, items: Sequence[FeedbackItem],
               image_features: torch.Tensor, class_probs: Optional[torch.Tensor], pool_texts: Sequence[str],
               texts: Callable[[list[str]], torch.Tensor], n: int, seed: int) -> BlindOutputs:
    """Each version's top caption from one shared pool for up to ``n`` held-out items (one per image),
    A/B order drawn per pair from ``seed`` and the image hash.

    ``image_features``/``class_probs``: one row per item in ``items``; ``texts`` embeds captions.
    """
    if n <= 0 or not items or not pool_texts:
        return BlindOutputs([], 0, len(pool_texts))
    first_of_image: dict[str, int] = {}
    for row, item in enumerate(items):
        first_of_image.setdefault(item.image_sha256, row)
    rows = sorted(first_of_image.values(), key=lambda r: hash_fraction(items[r].image_sha256, f"mmapp-blind-{seed}"))
    rows = rows[:n]
    pool = list(dict.fromkeys(pool_texts))
    pool_feats = texts(pool)  # (P, D_txt)
    idx = torch.tensor(rows, dtype=torch.long)
    feats = image_features[idx]  # (n, D_img)
    probs = None if class_probs is None else class_probs[idx]
    picks = {}
    with torch.inference_mode():
        for name, space in (("current", current), ("candidate", candidate)):
            scores = space.similarity(space.image_views(feats, probs), space.text_views(pool_feats))  # (n, P)
            picks[name] = scores.argmax(dim=1).tolist()
    rng = np.random.default_rng(seed)
    pairs, identical = [], 0
    for k, row in enumerate(rows):
        cur, cand = pool[picks["current"][k]], pool[picks["candidate"][k]]
        if cur == cand:
            identical += 1
            continue
        side = "a" if rng.random() < 0.5 else "b"
        item = items[row]
        a, b = (cand, cur) if side == "a" else (cur, cand)
        pairs.append({"item_id": item.item_id[:64], "image_sha256": item.image_sha256,
                      "image_relpath": item.image_relpath, "output_a": a, "output_b": b, "candidate_side": side})
    return BlindOutputs(pairs, identical, len(pool))


# --- deciding held candidates ------------------------------------------------------------------


@dataclass(frozen=True)
class BlindDecision:
    version: str
    action: str  # promoted | rejected | waiting
    reason: str
    win_rate: dict

    def to_dict(self) -> dict:
        return asdict(self)


def judge(result: WinRate, *, min_votes: int, min_win_rate: float) -> tuple[str, str]:
    """(action, reason) for a held candidate: wait for votes, then promote if the lower bound clears the bar."""
    if result.votes < min_votes:
        return "waiting", f"{result.votes} of {min_votes} blind votes"
    verdict = "promoted" if result.low >= min_win_rate else "rejected"
    return verdict, (f"blind win rate {result.rate:.2f} (95% CI {result.low:.2f}–{result.high:.2f}, {result.votes} votes): "
                     f"lower bound {'≥' if verdict == 'promoted' else '<'} {min_win_rate:.2f}")


def decide_held(config: Config, engine: Engine, *, store: Optional[ModelStore] = None) -> list[BlindDecision]:
    """Promote or reject every held candidate that has enough blind votes (the worker calls this each
    poll; the operator's "Decide pending candidates" too). A held candidate whose parent is no longer the
    current version is rejected as stale: its comparison was against a model that no longer serves."""
    settings = config.retrain
    store = store or ModelStore(config.paths.models)

    def read() -> list[tuple[str, Optional[str], dict, WinRate, Optional[str]]]:
        with Session(engine) as s, s.begin():
            current = repo.current_version(s)
            return [(v.version, v.parent_version, dict(v.manifest or {}), win_rate(repo.blind_tally(s, v.version)),
                     current.version if current else None) for v in repo.held_candidates(s)]

    decisions = []
    for version, parent, manifest, result, current in retry_on_busy(read):
        if parent != current:
            action, reason = "rejected", f"stale: compared against {parent!r}, but {current!r} is current now"
        else:
            action, reason = judge(result, min_votes=settings.blind_min_votes,
                                   min_win_rate=settings.blind_min_win_rate)
        if action == "promoted":
            used = [int(i) for i in manifest.get("blind_hold", {}).get("used_correction_ids", [])]
            run_id = manifest.get("run_id")

            def bookkeeping(s: Session, used=used, version=version, run_id=run_id, reason=reason) -> None:
                repo.mark_corrections(s, used, status="used", used_in_version=version)
                if run_id is not None:
                    repo.finish_retrain_run(s, run_id, status="promoted", message=f"after blind evaluation: {reason}")
            promote_version(engine, store, version=version, parent_version=parent, metrics={}, manifest=manifest,
                            in_transaction=bookkeeping)
        elif action == "rejected":
            def reject(version=version, run_id=manifest.get("run_id"), reason=reason) -> None:
                with Session(engine) as s, s.begin():
                    repo.reject_version(s, version)
                    if run_id is not None:
                        repo.finish_retrain_run(s, run_id, status="refused", message=f"after blind evaluation: {reason}")
            retry_on_busy(reject)
        if action != "waiting":
            log.info("held candidate %s %s: %s", version, action, reason)
        decisions.append(BlindDecision(version, action, reason, result.to_dict()))
    return decisions
