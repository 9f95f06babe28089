"""What a retrain learns from and is judged on: users' feedback from the database, split for good.

* Training side: corrections not yet used (status 'new') and well-rated captions since the current
  version was promoted.
* Held-out side: a fixed share of images, chosen by a hash of the image bytes, never trained on and
  used by the gate to compare candidate and current model on the same items, run after run.
* Replay: a seeded sample of the bootstrap corpus mixed into every fine-tune, so that a few hundred
  new pairs cannot wreck what the model already knew.
Reads the database; trains nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Sequence

import numpy as np
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from mmapp.evaluation import subsample_candidates

HELDOUT_FRACTION = 0.2  # of images; changing it reshuffles the held-out set, so it is a constant
TUNE_FRACTION = 0.15  # of the training side: picks the score mix and the fusion head's best epoch
_HELDOUT_SALT = "mmapp-heldout-v1"
_TUNE_SALT = "mmapp-tune-v1"
TRUSTED_ROLES = ("operator", "trusted")  # account roles whose feedback counts fully (retrain.cleaning)


@dataclass(frozen=True)
class FeedbackItem:
    """One thing users told us, ready to become a cleaning candidate."""

    item_id: str  # "correction:<id>" or "rated:<prediction id>"
    kind: str  # "pair" (image + caption) | "label" (meme image + text -> label)
    prediction_id: int
    correction_id: Optional[int]  # None for rated pairs
    image_sha256: str
    image_relpath: str
    text: str  # caption, or the meme text
    label: Optional[str]
    user: str  # user name, else the anonymous session id
    created_at: datetime
    predicted: str  # what the model had said (caption or label)
    model_version: str  # which version said it
    trusted: bool = False  # ``user`` is an enabled operator or trusted-annotator account

    @property
    def heldout(self) -> bool:
        return hash_fraction(self.image_sha256, _HELDOUT_SALT) < HELDOUT_FRACTION

    @property
    def tune(self) -> bool:
        return not self.heldout and hash_fraction(self.image_sha256, _TUNE_SALT) < TUNE_FRACTION


def hash_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same image lands on the same side forever."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass
class Selection:
    train: list[FeedbackItem]  # not held out (includes the tune share)
    heldout: list[FeedbackItem]
    ignored: dict[str, int]  # why some feedback is no training item, e.g. {"ocr_text": 3}
    # Trusted raters' corrections used by earlier runs, of the images the new untrusted items show: they can
    # confirm those items (retrain.cleaning.confirm_untrusted) and are never trained on again.
    references: list[FeedbackItem] = field(default_factory=list)

    @property
    def new_training_items(self) -> int:
        return len(self.train)

    def snapshot_hash(self, replay: np.ndarray) -> str:
        """sha256 over exactly what the run saw: items (ids, images, texts, labels) and the replay indices."""
        h = hashlib.sha256()
        for item in sorted(self.train + self.heldout, key=lambda i: i.item_id):
            h.update(f"{item.item_id}\t{item.image_sha256}\t{item.text}\t{item.label}\t{item.heldout}\n".encode())
        h.update(np.asarray(replay, dtype=np.int64).tobytes())
        return h.hexdigest()


def _who(user: Optional[str], session_id: str) -> str:
    return user or f"session:{session_id}"


def load_feedback(s: Session, *, min_rating: float = 4.0) -> Selection:
    """Corrections with status 'new' (label corrections take the meme text from the latest OCR-text
    correction of the same prediction, else the text the prediction used) and caption predictions
    whose mean coherence/relevance rating is at least ``min_rating`` and that nobody corrected.
    Rated pairs count for training only if rated after the current version was promoted."""
    items: list[FeedbackItem] = []
    ignored: dict[str, int] = {}
    roles = repo.rater_roles(s)  # the role now: a demoted or disabled account's unused items lose their trust
    trusted = lambda user: roles.get(user or "") in TRUSTED_ROLES
    rows = repo.corrections_since(s, None, statuses=("new",))
    ocr_fix = repo.latest_ocr_text(s, {r["prediction_id"] for r in rows if r["field"] == "label"})
    for r in rows:
        if r["field"] == "ocr_text":
            ignored["ocr_text (used as the meme text of label corrections)"] = \
                ignored.get("ocr_text (used as the meme text of label corrections)", 0) + 1
            continue
        if r["field"] == "label":
            text = ocr_fix.get(r["prediction_id"]) or (r["input_text"] or "").strip()
            if not text:
                ignored["label without meme text"] = ignored.get("label without meme text", 0) + 1
                continue
            kind, label, predicted = "label", r["value"], str(r["outputs"].get("label", ""))
        else:
            kind, label, text, predicted = "pair", None, r["value"], str(r["outputs"].get("caption", ""))
        items.append(FeedbackItem(
            item_id=f"correction:{r['correction_id']}", kind=kind, prediction_id=r["prediction_id"],
            correction_id=r["correction_id"], image_sha256=r["image_sha256"], image_relpath=r["image_relpath"],
            text=text, label=label, user=_who(r["user"], r["session_id"]), created_at=r["created_at"],
            predicted=predicted, model_version=r["model_version"], trusted=trusted(r["user"])))

    current = repo.current_version(s)
    since = current.promoted_at if current is not None else None
    for item, rated_at in _rated_pairs(s, min_rating, roles):
        if item.heldout or since is None or rated_at > since:
            items.append(item)

    train = [i for i in items if not i.heldout]
    heldout = [i for i in items if i.heldout]
    return Selection(train, heldout, ignored, _trusted_references(s, items, roles))


def _trusted_references(s: Session, items: list[FeedbackItem], roles: dict[str, str]) -> list[FeedbackItem]:
    """Caption and label corrections that earlier runs used, by raters trusted *now* (``roles``: enabled
    accounts' roles), of the images that the new untrusted items show: a trusted answer from last week
    confirms an anonymous one today."""
    images = {i.image_sha256 for i in items if not i.trusted}
    names = [name for name, role in roles.items() if role in TRUSTED_ROLES]
    if not images or not names:
        return []
    refs = []
    for r in repo.corrections_since(s, None, statuses=("used",), users=names, images=images):
        if r["field"] not in ("caption", "label"):
            continue
        kind, label = ("label", r["value"]) if r["field"] == "label" else ("pair", None)
        text = (r["input_text"] or "").strip() if kind == "label" else r["value"]
        refs.append(FeedbackItem(
            item_id=f"reference:{r['correction_id']}", kind=kind, prediction_id=r["prediction_id"],
            correction_id=r["correction_id"], image_sha256=r["image_sha256"], image_relpath=r["image_relpath"],
            text=text, label=label, user=_who(r["user"], r["session_id"]), created_at=r["created_at"],
            predicted="", model_version=r["model_version"], trusted=True))
    return refs


def _rated_pairs(s: Session, min_rating: float, roles: dict[str, str]) -> list[tuple[FeedbackItem, datetime]]:
    """Caption predictions rated well on average (coherence and relevance), with no caption correction."""
    out = []
    for r in repo.well_rated_captions(s, min_rating=min_rating):
        caption = r["outputs"].get("caption")
        if not isinstance(caption, str) or not caption.strip():
            continue
        out.append((FeedbackItem(
            item_id=f"rated:{r['prediction_id']}", kind="pair", prediction_id=r["prediction_id"], correction_id=None,
            image_sha256=r["image_sha256"], image_relpath=r["image_relpath"], text=caption, label=None,
            user=_who(r["user"], r["session_id"]), created_at=r["rated_at"], predicted=caption,
            model_version=r["model_version"], trusted=roles.get(r["user"] or "") in TRUSTED_ROLES), r["rated_at"]))
    return out


def replay_sample(n_images: int, size: int, seed: int) -> np.ndarray:
    """Sorted image indices of the bootstrap train split to replay: ``size`` of them, seeded."""
    if size <= 0 or n_images == 0:
        return np.zeros(0, dtype=np.int64)
    return subsample_candidates(n_images, size, seed)


def split_items(items: Sequence[FeedbackItem]) -> tuple[list[FeedbackItem], list[FeedbackItem]]:
    """(fit, tune) of the training side."""
    return [i for i in items if not i.tune], [i for i in items if i.tune]
