"""Cleaning before a retrain: split candidate items into accepted ones and rejected-with-reason.

Pure functions over :class:`Candidate` values: no database, no model, no I/O. The caller computes
embeddings and image–text agreement scores and passes them in; every rejection keeps its reason
and the numbers behind it so the report can show why.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

# reason -> final? Final rejections are never trained on; held-back items stay "new" and are
# reconsidered by the next run (a second rater may bring the quorum, other users may dilute a share).
NO_QUORUM = "no_quorum"
LABEL_DISAGREEMENT = "label_disagreement"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
SIMILARITY_OUTLIER = "similarity_outlier"
CHANCE_AGREEMENT = "chance_agreement"
CHANCE_RATER = "chance_rater"  # the rater's pairs in this run, taken together, fit no better than random captions
USER_SHARE = "user_share"
ANONYMOUS_UNCONFIRMED = "anonymous_unconfirmed"  # no trusted rater (or, by rule, no quorum) agrees yet
ANONYMOUS_CAP = "anonymous_cap"  # over this run's cap on anonymous pictures: reconsidered next run
ANONYMOUS_CAP_EXPIRED = "anonymous_cap_expired"  # held by the cap in anonymous_cap_holds earlier runs already
ANONYMOUS_RULES = ("trusted_agreement", "quorum", "open")  # open: no trust rule (simulations, closed setups)
REASONS: dict[str, bool] = {
    ANONYMOUS_UNCONFIRMED: False,
    ANONYMOUS_CAP: False,
    ANONYMOUS_CAP_EXPIRED: True,
    NO_QUORUM: False,
    LABEL_DISAGREEMENT: True,
    EXACT_DUPLICATE: True,
    NEAR_DUPLICATE: True,
    SIMILARITY_OUTLIER: True,
    CHANCE_AGREEMENT: True,
    CHANCE_RATER: True,
    USER_SHARE: False,
}
KINDS = ("pair", "label")  # pair: image + caption for the joint space; label: meme image + text -> label
MIN_OUTLIER_REFERENCE = 5  # fewer reference scores than this and no robust spread can be estimated
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class CleaningConfig:
    label_quorum: int = 2  # raters that must agree on a label when several raters corrected one image
    max_user_share: float = 0.3  # at most this share of the accepted items may come from one user
    outlier_z: float = -2.5  # robust z of image–text agreement below which a pair is rejected
    near_duplicate_cos: float = 0.98  # image AND text cosine at or above this = near duplicate
    min_agreement: float = 1.0  # a caption must beat random captions of its image by this many SDs
    trusted_label_votes: int = 2  # votes one trusted rater's label counts for
    anonymous_rule: str = "trusted_agreement"  # how untrusted items are confirmed: one of ANONYMOUS_RULES
    anonymous_quorum: int = 3  # "quorum": distinct untrusted raters agreeing on one image
    anonymous_agree_cos: float = 0.8  # caption text cosine at which two captions of one image agree
    max_anonymous_per_run: int = 50  # "quorum": cap on pictures whose untrusted items a quorum accepts in one run
    anonymous_cap_holds: int = 1  # runs an item held back by that cap is reconsidered in; then rejected (final)
    trusted_chance_check: bool = False  # also apply the outlier and chance-agreement tests to trusted raters' pairs
    # The chance test per rater (see flag_chance_agreement): raters with at least this many tested pairs in the run
    # are judged on all of them together (0 = off, every pair alone).
    rater_min_items: int = 10
    rater_chance_alpha: float = 0.05  # a rater whose pairs do not beat random captions at this level loses them all
    rater_rescue_max_fail_share: float = 0.4  # a rater with at most this share of pairs under min_agreement ...
    rater_rescue_floor: float = 0.0  # ... keeps those whose agreement is at least this (0: above a random caption's mean)

    def __post_init__(self) -> None:
        if self.rater_min_items < 0 or not 0.0 < self.rater_chance_alpha < 1.0 \
                or not 0.0 <= self.rater_rescue_max_fail_share <= 1.0:
            raise ValueError("rater_min_items must be >= 0, rater_chance_alpha in (0, 1) and rater_rescue_max_fail_share "
                             f"in [0, 1], got {self.rater_min_items}, {self.rater_chance_alpha}, "
                             f"{self.rater_rescue_max_fail_share}")
        if self.anonymous_rule not in ANONYMOUS_RULES:
            raise ValueError(f"anonymous_rule must be one of {ANONYMOUS_RULES}, got {self.anonymous_rule!r}")
        if self.anonymous_cap_holds < 0:
            raise ValueError(f"anonymous_cap_holds must be >= 0, got {self.anonymous_cap_holds}")
        if self.trusted_label_votes < 1 or self.anonymous_quorum < 1 or self.max_anonymous_per_run < 0:
            raise ValueError("trusted_label_votes and anonymous_quorum must be >= 1 and max_anonymous_per_run >= 0, "
                             f"got {self.trusted_label_votes}, {self.anonymous_quorum}, {self.max_anonymous_per_run}")
        if self.label_quorum < 1:
            raise ValueError(f"label_quorum must be >= 1, got {self.label_quorum}")
        if not 0.0 < self.max_user_share <= 1.0:
            raise ValueError(f"max_user_share must be in (0, 1], got {self.max_user_share}")
        if not -1.0 <= self.near_duplicate_cos <= 1.0:
            raise ValueError(f"near_duplicate_cos must be a cosine in [-1, 1], got {self.near_duplicate_cos}")

    @classmethod
    def from_retrain(cls, retrain_config: Any) -> "CleaningConfig":
        """From ``mmapp.config.RetrainConfig`` (its cleaning knobs)."""
        return cls(label_quorum=retrain_config.label_quorum, max_user_share=retrain_config.max_user_share,
                   outlier_z=retrain_config.outlier_z, near_duplicate_cos=retrain_config.near_duplicate_cos,
                   min_agreement=retrain_config.min_agreement,
                   trusted_label_votes=retrain_config.trusted_label_votes,
                   anonymous_rule=retrain_config.anonymous_rule, anonymous_quorum=retrain_config.anonymous_quorum,
                   anonymous_agree_cos=retrain_config.anonymous_agree_cos,
                   max_anonymous_per_run=retrain_config.max_anonymous_per_run,
                   anonymous_cap_holds=retrain_config.anonymous_cap_holds,
                   trusted_chance_check=retrain_config.trusted_chance_check,
                   rater_min_items=retrain_config.rater_min_items,
                   rater_chance_alpha=retrain_config.rater_chance_alpha,
                   rater_rescue_max_fail_share=retrain_config.rater_rescue_max_fail_share,
                   rater_rescue_floor=retrain_config.rater_rescue_floor)


@dataclass(frozen=True)
class Candidate:
    """One item a user supplied, in the order it arrived."""

    item_id: str  # stable id, e.g. "correction:12" or "rating:7"
    user: str  # logged-in user or anonymous session id
    kind: str  # one of KINDS
    image_key: str  # sha256 of the image bytes
    text: str  # the caption (pair) or the meme text (label)
    label: str | None = None  # label items only
    image_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)  # (D_img,)
    text_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)  # (D_txt,)
    # Image–text agreement under the serving model (pairs only): the pair's score minus the mean
    # score of the same image with random reference captions, in units of their SD (about 0 for a
    # random caption).
    agreement: float = math.nan
    trusted: bool = False  # from an operator or trusted annotator account (decided by the server's login)
    cap_holds: int = 0  # earlier runs that held this item back by the anonymous cap (ANONYMOUS_CAP)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"candidate {self.item_id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "label" and not self.label:
            raise ValueError(f"candidate {self.item_id!r}: a label item needs a label, got {self.label!r}")


@dataclass(frozen=True)
class Rejection:
    candidate: Candidate
    reason: str  # one of REASONS
    detail: dict[str, Any]

    @property
    def final(self) -> bool:
        return REASONS[self.reason]

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"item_id": c.item_id, "user": c.user, "kind": c.kind, "text": c.text, "label": c.label,
                "image_key": c.image_key, "trusted": c.trusted, "reason": self.reason, "final": self.final, "detail": self.detail}


@dataclass
class CleaningResult:
    accepted: list[Candidate]
    rejected: list[Rejection]
    # Agreeing copies collapsed into one accepted example: copy item_id -> the item_id kept for it. A copy
    # is neither trained on separately nor rejected; it shares the kept item's fate (used / rejected).
    merged: dict[str, str] = field(default_factory=dict)
    # Pairs under min_agreement kept because their rater, judged on all their pairs, is reliable:
    # item_id -> its agreement and rater (the rater's counts are in ``raters``).
    rescued: dict[str, dict[str, Any]] = field(default_factory=dict)
    raters: dict[str, dict[str, Any]] = field(default_factory=dict)  # the per-rater chance test, by user

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejected))


Split = tuple[list[Candidate], list[Rejection]]


def normalize_text(text: str) -> str:
    """Case, punctuation and whitespace folded: what makes two captions "the same" for exact duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


# --- rules ------------------------------------------------------------------------------------


def check_label_quorum(candidates: Sequence[Candidate], quorum: int, trusted_votes: int = 1) -> Split:
    """Where several raters corrected the label of one image, keep the label with at least ``quorum``
    votes (a strict plurality); the others disagree. Without such a label all are held back.
    One rater's repeated votes count once (their latest). Items seen by one rater pass untouched.
    A trusted rater's vote counts ``trusted_votes`` times, and where any trusted rater voted only
    trusted votes count: untrusted sessions, however many, cannot outvote a trusted annotator."""
    by_image: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if c.kind == "label":
            by_image[c.image_key].append(c)
    verdict: dict[str, tuple[str, dict[str, Any]] | None] = {}
    for image_key, items in by_image.items():
        latest = {c.user: (c.label, c.trusted) for c in items}  # dict keeps the last vote per user
        if len(latest) < 2:
            continue
        any_trusted = any(trusted for _, trusted in latest.values())
        votes: Counter[str] = Counter()
        for label, trusted in latest.values():
            if trusted or not any_trusted:
                votes[label] += trusted_votes if trusted else 1
        ranked = votes.most_common()
        top_label, top_votes = ranked[0]
        tie = len(ranked) > 1 and ranked[1][1] == top_votes
        detail = {"votes": dict(votes), "raters": len(latest), "quorum": quorum, "trusted_voted": any_trusted}
        for c in items:
            if tie or top_votes < quorum:
                verdict[c.item_id] = (NO_QUORUM, detail)
            elif c.label != top_label:
                verdict[c.item_id] = (LABEL_DISAGREEMENT, {**detail, "agreed_label": top_label})
    return _apply(candidates, verdict)


def _agreement_matrix(rows: Sequence[Candidate], cols: Sequence[Candidate], min_cos: float) -> np.ndarray:
    """(len(rows), len(cols)) bool: the two items answer one image the same way — equal label, or
    captions equal after normalising or with text cosine >= ``min_cos`` (cosine only when every item
    has a text embedding). All items share one image and one kind."""
    if not rows or not cols:
        return np.zeros((len(rows), len(cols)), dtype=bool)
    if rows[0].kind == "label":
        return np.array([[r.label == c.label for c in cols] for r in rows], dtype=bool)
    same = np.array([[normalize_text(r.text)] for r in rows]) == np.array([[normalize_text(c.text) for c in cols]])
    if all(x.text_embedding is not None for x in (*rows, *cols)):
        cos = _unit_rows([r.text_embedding for r in rows]) @ _unit_rows([c.text_embedding for c in cols]).T
        same |= cos >= min_cos
    return same


def confirm_untrusted(candidates: Sequence[Candidate], config: CleaningConfig,
                      references: Sequence[Candidate] = ()) -> Split:
    """Anti-sybil rule: an item from an anonymous session or an untrusted account is kept only when

    * a trusted rater gave an agreeing answer for the same image in this run or in an earlier one
      (``references``: trusted items earlier runs used; they only confirm, they are not candidates), or
    * rule "quorum": at least ``anonymous_quorum`` distinct untrusted raters agree on it, and the run
      has not yet let in ``max_anonymous_per_run`` *pictures* this way (earliest first; all agreeing
      items of a picture that is let in pass, and :func:`drop_exact_duplicates` collapses them).

    Everything else is held back (not final): a trusted rater may confirm it in a later run. An item
    over the cap (ANONYMOUS_CAP) is reconsidered by the next ``anonymous_cap_holds`` runs, earliest
    first, and then rejected for good (ANONYMOUS_CAP_EXPIRED): a burst over the cap is not lost at
    once, but a flood cannot queue up and trickle in night after night. Under "trusted_agreement" a
    script with any number of sessions gets nothing in by itself; under "quorum" at most the cap per
    run; "open" turns the rule off (every session counts as a rater, as before accounts existed: for
    simulations and deployments where every client is known).
    """
    if config.anonymous_rule == "open":
        return list(candidates), []
    trusted_by_image: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    untrusted_by_image: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in candidates:
        (trusted_by_image if c.trusted else untrusted_by_image)[(c.kind, c.image_key)].append(c)
    for c in references:
        trusted_by_image[(c.kind, c.image_key)].append(c)
    confirmed: set[str] = set()  # untrusted items a trusted rater agrees with
    agreeing: dict[str, int] = {}  # untrusted item -> distinct untrusted raters giving the same answer
    for key, items in untrusted_by_image.items():
        by_trusted = _agreement_matrix(items, trusted_by_image.get(key, []), config.anonymous_agree_cos)
        confirmed.update(c.item_id for c, row in zip(items, by_trusted) if row.any())
        if config.anonymous_rule == "quorum":
            among = _agreement_matrix(items, items, config.anonymous_agree_cos)  # (n, n), diagonal True
            users = np.array([c.user for c in items])
            agreeing.update((c.item_id, len(set(users[row]))) for c, row in zip(items, among))
    verdict: dict[str, tuple[str, dict[str, Any]] | None] = {}
    by_quorum: set[tuple[str, str]] = set()  # pictures (kind, image) let in by quorum: the cap counts these
    for c in candidates:
        if c.trusted or c.item_id in confirmed:
            continue
        if config.anonymous_rule == "quorum":
            n = agreeing[c.item_id]
            picture = (c.kind, c.image_key)
            if n >= config.anonymous_quorum and (picture in by_quorum or len(by_quorum) < config.max_anonymous_per_run):
                by_quorum.add(picture)
            elif n >= config.anonymous_quorum:
                detail = {"cap": config.max_anonymous_per_run, "agreeing_raters": n, "earlier_holds": c.cap_holds,
                          "max_holds": config.anonymous_cap_holds}
                expired = c.cap_holds >= config.anonymous_cap_holds
                verdict[c.item_id] = (ANONYMOUS_CAP_EXPIRED if expired else ANONYMOUS_CAP, detail)
            else:
                verdict[c.item_id] = (ANONYMOUS_UNCONFIRMED, {"rule": "quorum", "agreeing_raters": n,
                                                              "quorum": config.anonymous_quorum})
            continue
        verdict[c.item_id] = (ANONYMOUS_UNCONFIRMED, {"rule": "trusted_agreement", "trusted_items_on_image":
                                                      len(trusted_by_image.get((c.kind, c.image_key), []))})
    return _apply(candidates, verdict)


def drop_exact_duplicates(candidates: Sequence[Candidate]) -> Split:
    """The same image with the same (normalised) text and label again: keep the first. A repeat by the
    same rater is rejected (EXACT_DUPLICATE); see :func:`collapse_agreeing_copies` for other raters'."""
    kept, rejected, _ = collapse_agreeing_copies(candidates)
    return kept, rejected


def collapse_agreeing_copies(candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[Rejection], dict[str, str]]:
    """Exact duplicates (same image, same normalised text and label): the first is kept. A copy from
    the same rater is rejected (EXACT_DUPLICATE); a copy from another rater is that rater agreeing (a
    quorum's copies, say) and is collapsed into the first: merged, not rejected. Either way the
    example is trained on once. Returns (kept, rejected, merged {copy item_id: kept item_id})."""
    groups: dict[tuple, list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[(c.kind, c.image_key, normalize_text(c.text), c.label)].append(c)
    verdict, merged = {}, {}
    for items in groups.values():
        # a trusted rater's copy is the one kept where there is one: it carries the trust onwards
        keep = next((c for c in items if c.trusted), items[0])
        for c in items:
            if c is keep:
                continue
            if c.user == keep.user:
                verdict[c.item_id] = (EXACT_DUPLICATE, {"duplicate_of": keep.item_id})
            else:
                merged[c.item_id] = keep.item_id
    kept, rejected = _apply([c for c in candidates if c.item_id not in merged], verdict)
    return kept, rejected, merged


def drop_near_duplicates(candidates: Sequence[Candidate], min_cos: float) -> Split:
    """An item whose image and text embeddings both have cosine >= ``min_cos`` with an earlier kept
    item of the same kind (and label) is a near duplicate: re-encoded copies, trivially edited captions."""
    verdict = {}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, c in enumerate(candidates):
        if c.image_embedding is not None and c.text_embedding is not None:
            groups[(c.kind, c.label)].append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        img = _unit_rows([candidates[i].image_embedding for i in idx])  # (n, D_img)
        txt = _unit_rows([candidates[i].text_embedding for i in idx])  # (n, D_txt)
        cos_img, cos_txt = img @ img.T, txt @ txt.T  # (n, n) each
        close = (cos_img >= min_cos) & (cos_txt >= min_cos)
        kept: list[int] = []
        for a in range(len(idx)):
            match = next((b for b in kept if close[a, b]), None)
            if match is None:
                kept.append(a)
            else:
                verdict[candidates[idx[a]].item_id] = (NEAR_DUPLICATE, {
                    "duplicate_of": candidates[idx[match]].item_id,
                    "image_cos": round(float(cos_img[a, match]), 4), "text_cos": round(float(cos_txt[a, match]), 4)})
    return _apply(candidates, verdict)


def robust_z(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(values - median(reference)) / (1.4826 * MAD(reference)); returns (z, median, scale).
    A reference with zero spread gives z = 0 (no outliers can be told apart)."""
    med = float(np.median(reference))
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(reference - med)))
    if not scale > 1e-12:
        return np.zeros_like(values, dtype=float), med, scale
    return (values - med) / scale, med, scale


def flag_similarity_outliers(candidates: Sequence[Candidate], z_threshold: float,
                             reference: np.ndarray | None = None, *, skip_trusted: bool = False) -> Split:
    """Reject pairs whose image–text agreement is a low outlier: robust z below ``-|z_threshold|``.

    The spread comes from ``reference`` (agreement of trusted pairs, e.g. the replay sample) when
    given, else from the pair candidates themselves. Label items are never judged this way: a meme's
    text may contradict its picture on purpose (that is what sarcasm is). ``skip_trusted``: trusted
    raters' pairs are neither judged nor part of the spread.
    """
    pairs = [c for c in candidates if c.kind == "pair" and math.isfinite(c.agreement) and not (skip_trusted and c.trusted)]
    values = np.array([c.agreement for c in pairs], dtype=float)
    ref = values if reference is None else np.asarray(reference, dtype=float)
    ref = ref[np.isfinite(ref)]
    if len(ref) < MIN_OUTLIER_REFERENCE or not len(pairs):
        return list(candidates), []
    z, med, scale = robust_z(values, ref)
    threshold = -abs(z_threshold)
    verdict = {c.item_id: (SIMILARITY_OUTLIER, {"agreement": round(float(a), 4), "robust_z": round(float(zi), 3),
                                                "median": round(med, 4), "scale": round(scale, 4),
                                                "threshold": threshold,
                                                "reference": "trusted pairs" if reference is not None else "candidates"})
               for c, a, zi in zip(pairs, values, z) if zi < threshold}
    return _apply(candidates, verdict)


def flag_chance_agreement(candidates: Sequence[Candidate], min_agreement: float, *, skip_trusted: bool = False,
                          rater_min_items: int = 0, rater_alpha: float = 0.05, rescue_max_fail_share: float = 0.4,
                          rescue_floor: float = 0.0, rescued: dict[str, dict[str, Any]] | None = None,
                          raters: dict[str, dict[str, Any]] | None = None) -> Split:
    """Reject pairs whose caption fits its image no better than random captions do (agreement below
    ``min_agreement``). Unlike :func:`flag_similarity_outliers` this needs no clean majority: a batch
    made entirely of random captions is caught too. ``skip_trusted``: a trusted rater's pairs are not
    tested (a new domain's honest captions often look like chance to a model that never saw it).

    Per rater (``rater_min_items`` > 0), for each rater with at least that many tested pairs in the
    run. The agreement is a z-score against random captions of the same image, so a random caption
    falls under ``min_agreement`` with probability p0 = Phi(min_agreement) (0.84 at 1 SD):

    * a rater whose number of pairs under the bar is not significantly below p0 (one-sided binomial
      test at ``rater_alpha``) answers like random captions taken together: all their pairs are
      rejected (CHANCE_RATER), also the few that cleared the bar by luck;
    * a rater with at most ``rescue_max_fail_share`` of their pairs under the bar is reliable in this
      run: their pairs under it are kept when the agreement is at least ``rescue_floor`` (better than
      an average random caption), recorded in ``rescued``. On a new domain honest captions often miss
      the bar singly (about a fifth in the simulation) while the rater's batch as a whole is clearly
      not random.

    Raters with fewer pairs (a script's throwaway sessions, say) are judged pair by pair, as before.
    What it cannot tell apart: a rater who mixes some wrong captions into mostly right ones keeps the
    wrong ones that land between ``rescue_floor`` and ``min_agreement`` (docs/flywheel.md).
    ``raters`` receives each judged rater's counts and verdict."""
    tested = [c for c in candidates if c.kind == "pair" and math.isfinite(c.agreement)
              and not (skip_trusted and c.trusted)]
    by_user: dict[str, list[Candidate]] = defaultdict(list)
    for c in tested:
        by_user[c.user].append(c)
    p0 = 0.5 * (1.0 + math.erf(min_agreement / math.sqrt(2.0)))
    verdict: dict[str, tuple[str, dict[str, Any]] | None] = {}
    for user, items in by_user.items():
        fails = [c for c in items if c.agreement < min_agreement]
        judged_as = None  # the rater's verdict when there are enough pairs to judge them as a whole
        if rater_min_items > 0 and len(items) >= rater_min_items:
            share, p_value = len(fails) / len(items), _binom_cdf(len(fails), len(items), p0)
            judged_as = "chance" if p_value >= rater_alpha else \
                "reliable" if share <= rescue_max_fail_share else "pair by pair"
            summary = {"pairs": len(items), "under_bar": len(fails), "fail_share": round(share, 4),
                       "chance_fail_share": round(p0, 4), "p_value": round(p_value, 6), "verdict": judged_as}
            if raters is not None:
                raters[user] = summary
            if judged_as == "chance":
                for c in items:
                    verdict[c.item_id] = (CHANCE_RATER, {"agreement": round(c.agreement, 4), **summary,
                                                         "alpha": rater_alpha})
                continue
        for c in fails:
            if judged_as == "reliable" and c.agreement >= rescue_floor:
                if rescued is not None:
                    rescued[c.item_id] = {"agreement": round(c.agreement, 4), "rater": user}
                continue
            verdict[c.item_id] = (CHANCE_AGREEMENT, {"agreement": round(c.agreement, 4), "min_agreement": min_agreement})
    return _apply(candidates, verdict)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(k + 1)))


def user_quota(counts: Iterable[int], max_share: float) -> int | None:
    """Largest per-user count k with k <= max_share * sum(min(n_u, k)): the most any one user may keep
    so that no user exceeds ``max_share`` of what is kept. None = no cap needed. At least 1, so that
    with fewer than 1/max_share contributors each still counts once."""
    counts = sorted(counts, reverse=True)
    if not counts or max_share >= 1.0:
        return None
    if counts[0] <= max_share * sum(counts):
        return None
    for k in range(counts[0], 0, -1):
        if k <= max_share * sum(min(n, k) for n in counts) + 1e-9:
            return k
    return 1


def cap_user_share(candidates: Sequence[Candidate], max_share: float) -> Split:
    """Poisoning guard: keep each untrusted user's earliest items up to the quota from :func:`user_quota`.
    Trusted raters are never capped; their items count in the total the shares are measured against."""
    per_user = Counter(c.user for c in candidates if not c.trusted)
    n_trusted = sum(1 for c in candidates if c.trusted)
    k = user_quota([*per_user.values(), *([1] * n_trusted)], max_share) if per_user else None
    if k is None:
        return list(candidates), []
    seen: Counter[str] = Counter()
    verdict = {}
    for c in candidates:
        if c.trusted:
            continue
        seen[c.user] += 1
        if seen[c.user] > k:
            verdict[c.item_id] = (USER_SHARE, {"user_items": per_user[c.user], "quota": k,
                                               "max_share": max_share, "total": len(candidates)})
    return _apply(candidates, verdict)


def clean(candidates: Sequence[Candidate], config: CleaningConfig, *,
          reference_agreement: np.ndarray | None = None, references: Sequence[Candidate] = ()) -> CleaningResult:
    """All rules in order: label quorum, confirmation of untrusted items (anonymous rules; ``references``:
    trusted answers earlier runs used, which can confirm but are not candidates), exact
    duplicates (other raters' agreeing copies collapsed into one example, ``merged``), near duplicates,
    agreement outliers (against the other candidates, or ``reference_agreement`` of trusted pairs when
    given) and agreement no better than chance, per rater where a rater has ``rater_min_items`` pairs
    (``rescued``, ``raters``; both tests skipped for trusted raters' pairs unless
    ``trusted_chance_check``), user share. The share cap runs last, so shares are measured over clean items."""
    ids = [c.item_id for c in candidates]
    if len(set(ids)) != len(ids):
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        raise ValueError(f"candidate item_ids must be unique, got repeats {dupes[:5]}")
    kept, rejected = list(candidates), []
    merged: dict[str, str] = {}
    rescued: dict[str, dict[str, Any]] = {}
    raters: dict[str, dict[str, Any]] = {}
    skip = not config.trusted_chance_check

    def collapse(cs: Sequence[Candidate]) -> Split:
        k, r, m = collapse_agreeing_copies(cs)
        merged.update(m)
        return k, r
    for rule in (lambda cs: check_label_quorum(cs, config.label_quorum, config.trusted_label_votes),
                 lambda cs: confirm_untrusted(cs, config, references),
                 collapse,
                 lambda cs: drop_near_duplicates(cs, config.near_duplicate_cos),
                 lambda cs: flag_similarity_outliers(cs, config.outlier_z, reference_agreement, skip_trusted=skip),
                 lambda cs: flag_chance_agreement(cs, config.min_agreement, skip_trusted=skip,
                                                  rater_min_items=config.rater_min_items,
                                                  rater_alpha=config.rater_chance_alpha,
                                                  rescue_max_fail_share=config.rater_rescue_max_fail_share,
                                                  rescue_floor=config.rater_rescue_floor, rescued=rescued,
                                                  raters=raters),
                 lambda cs: cap_user_share(cs, config.max_user_share)):
        kept, out = rule(kept)
        rejected.extend(out)
    return CleaningResult(kept, rejected, merged, rescued, raters)


# --- helpers ----------------------------------------------------------------------------------


def _apply(candidates: Sequence[Candidate], verdict: dict[str, tuple[str, dict[str, Any]] | None]) -> Split:
    kept, rejected = [], []
    for c in candidates:
        v = verdict.get(c.item_id)
        if v is None:
            kept.append(c)
        else:
            rejected.append(Rejection(c, v[0], v[1]))
    return kept, rejected


def _unit_rows(rows: list[np.ndarray]) -> np.ndarray:
    m = np.stack([np.asarray(r, dtype=np.float64).ravel() for r in rows])
    return m / np.clip(np.linalg.norm(m, axis=1, keepdims=True), 1e-12, None)
