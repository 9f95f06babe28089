"""The promotion gate: a candidate replaces the current model only if a target metric improves and
no metric regresses beyond a tolerance. Pure: two dicts of flat metrics in, a decision out.

Every metric is "higher is better" (recalls, macro-F1, AUROC, ablation gains); callers negate
anything else (ranks) before passing it in.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class GateSpec:
    targets: tuple[str, ...]  # metrics this run tried to improve; at least one must rise
    tolerance: float = 0.01  # largest allowed drop of any metric (absolute; metrics are fractions)
    min_improvement: float = 0.0  # a target must rise by more than this, and by more than its tolerance
    tolerances: Mapping[str, float] = field(default_factory=dict)  # per-metric overrides of `tolerance`

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.min_improvement < 0:
            raise ValueError(f"tolerance and min_improvement must be >= 0, got {self.tolerance}, {self.min_improvement}")
        bad = {k: v for k, v in self.tolerances.items() if v < 0}
        if bad:
            raise ValueError(f"per-metric tolerances must be >= 0, got {bad}")

    def tolerance_for(self, metric: str) -> float:
        return self.tolerances.get(metric, self.tolerance)


@dataclass(frozen=True)
class GateCheck:
    metric: str
    role: str  # "target" | "guard"
    current: float | None
    candidate: float | None
    delta: float | None  # candidate - current
    tolerance: float
    passed: bool  # no regression beyond tolerance
    improved: bool  # (targets) rose by more than min_improvement
    note: str = ""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: tuple[GateCheck, ...]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def _value(metrics: Mapping[str, float | None], name: str) -> float | None:
    v = metrics.get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def decide(current: Mapping[str, float | None], candidate: Mapping[str, float | None], spec: GateSpec) -> GateDecision:
    """Compare ``candidate`` with ``current`` metric by metric.

    * A metric the current model has and the candidate lacks fails (it cannot be shown not to regress).
    * A metric only the candidate has (a new held-out set) or undefined for both is noted and skipped.
    * Promote iff some target improved by more than ``min_improvement`` and its tolerance, and every
      check passed.
    """
    checks = []
    for name in sorted(set(current) | set(candidate) | set(spec.targets)):
        role = "target" if name in spec.targets else "guard"
        cur, cand = _value(current, name), _value(candidate, name)
        tol = spec.tolerance_for(name)
        if cur is None and cand is None:
            checks.append(GateCheck(name, role, None, None, None, tol, True, False, "undefined for both"))
        elif cand is None:
            checks.append(GateCheck(name, role, cur, None, None, tol, False, False, "candidate lacks this metric"))
        elif cur is None:
            checks.append(GateCheck(name, role, None, cand, None, tol, True, False, "new metric: nothing to compare"))
        else:
            delta = cand - cur
            passed = delta >= -tol - 1e-12
            # The noise band is symmetric: a change within the tolerance is neither a regression nor a gain.
            improved = role == "target" and delta > max(spec.min_improvement, tol) + 1e-12
            note = "" if passed else f"regressed by {-delta:.4f} > tolerance {tol:.4f}"
            checks.append(GateCheck(name, role, cur, cand, delta, tol, passed, improved, note))

    failures = [c for c in checks if not c.passed]
    improved = [c for c in checks if c.improved]
    comparable_targets = [c for c in checks if c.role == "target" and c.delta is not None]
    if failures:
        worst = min(failures, key=lambda c: c.delta if c.delta is not None else -math.inf)
        reason = f"refused: {len(failures)} metric(s) regressed, worst {worst.metric}: {worst.note}"
        return GateDecision(False, reason, tuple(checks))
    if not comparable_targets:
        return GateDecision(False, f"refused: no held-out data for any target {list(spec.targets)}", tuple(checks))
    if not improved:
        best = max(comparable_targets, key=lambda c: c.delta)
        needs = max(spec.min_improvement, best.tolerance)
        return GateDecision(False, f"refused: no target improved (best {best.metric} {best.delta:+.4f}, "
                                   f"needs > {needs:+.4f})", tuple(checks))
    names = ", ".join(f"{c.metric} {c.delta:+.4f}" for c in improved)
    return GateDecision(True, f"promoted: {names}; no metric regressed beyond tolerance", tuple(checks))
