"""Human-eval report per model version, as JSON (the numbers) and self-contained HTML (plots inline).

Sections: the run and its gate, rating distributions and means per model version with 95%
intervals, inter-rater agreement (Krippendorff's alpha, ordinal) where items have several ratings,
correction rates, retrieval R@K over versions, the blind before/after win rate with a Wilson 95%
interval (``retrain.blind``), the modality ablation, rejected items with their
reasons, and example corrections. Written to ``<home>/reports/<version>/report.{json,html}``.
Reads the database and run manifests; trains and changes nothing.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.engine import retry_on_busy
from feedback_db.models import ModelVersion, RetrainRun
from mmapp.model_store import write_text_atomic
from retrain.blind import win_rate

from retrain.evaluation import REPORT_PHOTOS

SCORES = ("coherence", "relevance", "detail")
SECTIONS = ("summary", "gate", "ratings", "agreement", "corrections", "retrieval", "blind", "ablation", "rejected",
            "examples")
N_EXAMPLES = 12
N_REJECTED_SHOWN = 100


def report_dir(config, version: str) -> Path:
    return config.paths.reports / version


def build_report(config, engine: Engine, version: Optional[str] = None) -> dict[str, Path]:
    """Write the report of ``version`` (default: the current one); returns {"html": path, "json": path}."""
    data = retry_on_busy(lambda: collect(engine, version))
    folder = report_dir(config, data["version"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "html": folder / "report.html"}
    write_text_atomic(paths["json"], json.dumps(data, indent=2, default=str))
    write_text_atomic(paths["html"], render_html(data))
    return paths


def list_reports(config) -> list[dict[str, Any]]:
    """Reports on disk, newest first: version, paths, when written."""
    root = config.paths.reports
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        html_path, json_path = folder / "report.html", folder / "report.json"
        if html_path.is_file():
            out.append({"version": folder.name, "html": str(html_path),
                        "json": str(json_path) if json_path.is_file() else None,
                        "written_at": datetime.fromtimestamp(html_path.stat().st_mtime, timezone.utc).isoformat()})
    return sorted(out, key=lambda r: r["written_at"], reverse=True)


# --- data -------------------------------------------------------------------------------------


def collect(engine: Engine, version: Optional[str] = None) -> dict[str, Any]:
    with Session(engine) as s, s.begin():
        if version is None:
            row = repo.current_version(s)
            if row is None:
                raise ValueError("no current model version to report on; pass a version")
            version = row.version
        row = repo.get_version(s, version)
        run = repo.latest_run_for_candidate(s, version)
        if row is None and run is None:
            known = [v.version for v in repo.list_versions(s)]
            raise ValueError(f"unknown model version {version!r}: neither registered nor a run's candidate; "
                             f"registered: {known}")
        stats = dict(run.stats or {}) if run is not None else {}
        ratings = _ratings(s)
        data = {
            "version": version,
            "generated_at": datetime.now(timezone.utc).isoformat(),
            "summary": _summary(row, run),
            "gate": stats.get("gate"),
            "ratings": ratings_summary(ratings),
            "agreement": agreement_summary(ratings),
            "raters": rater_summary(ratings, _label_votes(s), repo.feedback_counts_per_rater(s)),
            "rater_chance_test": [{"rater": rater, **verdict}
                                  for rater, verdict in (stats.get("chance_test_by_rater") or {}).items()],
            "corrections": _correction_rates(s),
            "retrieval": _retrieval_over_versions(s, version, run),
            "captioner": _captioner_over_versions(s, version, run),
            "blind": _blind(s, version, stats),
            "ablation": _ablation(stats),
            "rejected": _rejected(s, run),
            "examples": _examples(s, version, run, stats),
        }
    return data


def _summary(row: Optional[ModelVersion], run: Optional[RetrainRun]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if row is not None:
        out.update(registered=True, status=row.status, is_current=row.is_current, parent_version=row.parent_version,
                   created_at=row.created_at, promoted_at=row.promoted_at, sha256=row.sha256, path=row.path,
                   data_snapshot_sha256=(row.manifest or {}).get("data", {}).get("snapshot_sha256"),
                   code_version=(row.manifest or {}).get("code_version"), seed=(row.manifest or {}).get("seed"))
    else:
        out.update(registered=False, status="refused" if run is not None and run.status == "refused" else "unregistered")
    if run is not None:
        st = run.stats or {}
        out.update(run_id=run.id, run_status=run.status, trigger=run.trigger, message=run.message,
                   started_at=run.started_at, finished_at=run.finished_at, selection=st.get("selection"),
                   cleaning=st.get("cleaning"), parent_version=out.get("parent_version") or st.get("current_version"),
                   data_snapshot_sha256=out.get("data_snapshot_sha256") or st.get("data_snapshot_sha256"),
                   stage_seconds=st.get("stage_seconds"), manifest_path=st.get("manifest_path"),
                   towers=st.get("towers"))
        alignment = (st.get("training") or {}).get("alignment") or {}
        if "mix" in alignment:  # the served score: bridge weight everywhere, and near the taught images
            out["score_mix"] = {"bridge_weight": alignment["mix"], "near_taught_images": alignment.get("local_mix")}
    return out


def _ratings(s: Session) -> list[dict[str, Any]]:
    # The rated *item* is what the raters saw: one image, one model version, one output. Two people
    # who upload the same picture get separate prediction rows but rate the same thing.
    return [{"prediction_id": r["prediction_id"], "version": r["model_version"], "kind": r["kind"],
             "item": f"{r['image_sha256']}|{r['model_version']}|{r['ablation']}|{r['output']}",
             "rater": r["user"] or f"session:{r['session_id']}", **{score: r[score] for score in SCORES}}
            for r in repo.ratings_with_outputs(s)]


def _label_votes(s: Session) -> list[dict[str, Any]]:
    return [{"image": r["image_sha256"], "rater": r["user"] or f"session:{r['session_id']}", "label": r["value"]}
            for r in repo.corrections_since(s, None) if r["field"] == "label"]


def rater_summary(ratings: list[dict[str, Any]], label_votes: list[dict[str, Any]],
                  counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per account (anonymous sessions pooled as "(anonymous)"): role, feedback counts, and agreement
    with the consensus of the *other* raters — the share of the rater's scores within 1 point of the
    others' median on the same item, and the share of label corrections equal to the others' majority
    label of the same image (None where nobody else rated the same thing)."""
    def who(rater: str) -> str:
        return "(anonymous)" if rater.startswith("session:") else rater

    close: dict[str, list[bool]] = defaultdict(list)
    by_item: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for r in ratings:
        for score in SCORES:
            if r[score] is not None:
                by_item[(r["item"], score)][r["rater"]] = r[score]
    for votes in by_item.values():
        for rater, x in votes.items():
            others = [y for o, y in votes.items() if o != rater]
            if others:
                close[who(rater)].append(abs(x - float(np.median(others))) <= 1.0)
    same_label: dict[str, list[bool]] = defaultdict(list)
    by_image: dict[str, dict[str, str]] = defaultdict(dict)
    for v in label_votes:
        by_image[v["image"]][v["rater"]] = v["label"]
    for votes in by_image.values():
        for rater, label in votes.items():
            others = Counter(lab for o, lab in votes.items() if o != rater).most_common(1)
            if others:
                same_label[who(rater)].append(label == others[0][0])

    def share(flags: list[bool]) -> Optional[float]:
        return round(sum(flags) / len(flags), 3) if flags else None

    return [{**c, "score_agreement": share(close.get(c["user"], [])), "scores_compared": len(close.get(c["user"], [])),
             "label_agreement": share(same_label.get(c["user"], [])),
             "labels_compared": len(same_label.get(c["user"], []))} for c in counts]


def mean_interval(values: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_bootstrap, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def ratings_summary(ratings: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model version and score: n, mean with 95% interval, and the 1..5 distribution."""
    by_version: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in ratings:
        for score in SCORES:
            if r[score] is not None:
                by_version[r["version"]][score].append(r[score])
    out = {}
    for version, scores in sorted(by_version.items()):
        out[version] = {}
        for score in SCORES:
            v = np.array(scores.get(score, []), dtype=float)
            if not len(v):
                continue
            lo, hi = mean_interval(v)
            counts = Counter(int(x) for x in v)
            out[version][score] = {"n": int(len(v)), "mean": float(v.mean()), "ci": [lo, hi],
                                   "distribution": {str(k): counts.get(k, 0) for k in range(1, 6)}}
    return out


def agreement_summary(ratings: list[dict[str, Any]]) -> dict[str, Any]:
    """Krippendorff's alpha (ordinal) per score over items (image + version + output) rated by two or more raters."""
    import krippendorff

    out: dict[str, Any] = {}
    for score in SCORES:
        by_item: dict[Any, dict[str, int]] = defaultdict(dict)
        for r in ratings:
            if r[score] is not None:
                by_item[r.get("item", r["prediction_id"])][r["rater"]] = r[score]  # a rater's latest rating
        items = {pid: v for pid, v in by_item.items() if len(v) >= 2}
        raters = sorted({rater for v in items.values() for rater in v})
        entry: dict[str, Any] = {"items_with_several_ratings": len(items), "raters": len(raters), "alpha": None}
        values = [x for v in items.values() for x in v.values()]
        if len(items) >= 2 and len(set(values)) >= 2:
            matrix = np.full((len(raters), len(items)), np.nan)  # (raters, units)
            col = {pid: j for j, pid in enumerate(items)}
            row = {rater: i for i, rater in enumerate(raters)}
            for pid, v in items.items():
                for rater, x in v.items():
                    matrix[row[rater], col[pid]] = x
            entry["alpha"] = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal"))
        else:
            entry["note"] = "needs at least two items rated by several raters, with some disagreement in values"
        out[score] = entry
    return out


def _correction_rates(s: Session) -> dict[str, Any]:
    out = {}
    for v, counts in repo.correction_counts_per_version(s).items():
        n, k = counts["predictions"], counts["corrected_predictions"]
        lo, hi = _wilson(k, n)
        out[v] = {"predictions": n, "corrected_predictions": k, "rate": k / n if n else None, "ci": [lo, hi],
                  "by_field": counts["by_field"]}
    return out


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[Optional[float], Optional[float]]:
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _retrieval_summary(nested: dict) -> Optional[dict]:
    test = (nested or {}).get("bootstrap_test")
    if not test:
        return None
    return {d: {f"R@{k}": test[d][f"R@{k}"] for k in (1, 5, 10)} | {f"R@{k}_ci": test[d].get(f"R@{k}_ci")
                                                                     for k in (1, 5, 10)}
            for d in ("image_to_text", "text_to_image")}


def _retrieval_over_versions(s: Session, version: str, run: Optional[RetrainRun]) -> dict[str, Any]:
    """Bootstrap test split R@K (a fixed set, so comparable) for every version evaluated so far."""
    series: dict[str, dict] = {}
    registered = sorted(repo.list_versions(s), key=lambda r: r.id)
    for row in registered:
        summary = _retrieval_summary(row.metrics)
        if summary:
            series[row.version] = summary
    for r in repo.all_retrain_runs(s):
        st = r.stats or {}
        cur, metrics = st.get("current_version"), st.get("metrics") or {}
        if cur and cur not in series and _retrieval_summary(metrics.get("current")):
            series[cur] = _retrieval_summary(metrics["current"])
    if version not in series and run is not None:
        cand = _retrieval_summary(((run.stats or {}).get("metrics") or {}).get("candidate"))
        if cand:
            series[version] = cand
    order = {row.version: i for i, row in enumerate(registered)}
    series = dict(sorted(series.items(), key=lambda kv: order.get(kv[0], len(order))))
    this_run = None
    if run is not None and (run.stats or {}).get("flat_metrics"):
        flat = run.stats["flat_metrics"]
        this_run = {k: {"current": flat["current"].get(k), "candidate": flat["candidate"].get(k)}
                    for k in sorted(set(flat["current"]) | set(flat["candidate"]))}
    report_photos = None  # the held-out real photos: reported here, never gated
    nested = ((run.stats or {}).get("metrics") or {}) if run is not None else {}
    if all(REPORT_PHOTOS in (nested.get(side) or {}) for side in ("current", "candidate")):
        report_photos = [{"model": side, **{f"{d} R@{k}": nested[side][REPORT_PHOTOS][d][f"R@{k}"]
                                            for d in ("image_to_text", "text_to_image") for k in (1, 5)},
                          "i2t R@1 95% CI": nested[side][REPORT_PHOTOS]["image_to_text"].get("R@1_ci"),
                          "t2i R@1 95% CI": nested[side][REPORT_PHOTOS]["text_to_image"].get("R@1_ci")}
                         for side in ("current", "candidate")]
    return {"bootstrap_test_by_version": series, "this_run": this_run, "report_photos": report_photos}


def _captioner_rows(version: str, per_set: dict) -> list[dict[str, Any]]:
    return [{"version": version, "set": name, **{k: scores.get(k) for k in ("n", "cider_d", "cider_d_ci", "bleu4",
                                                                          "exact", "exact_ci")}}
            for name, scores in sorted((per_set or {}).items()) if isinstance(scores, dict)]


def _captioner_over_versions(s: Session, version: str, run: Optional[RetrainRun]) -> dict[str, Any]:
    """A generative captioner's CIDEr-D / BLEU-4 / exact match per version (retrain.captioner_stage): what each
    run measured for the version it started from and for its candidate. Scores are comparable within one run
    (the same held-out pictures and references); across runs the held-out set grows."""
    rows: list[dict[str, Any]] = []
    for r in repo.all_retrain_runs(s):
        cap = (r.stats or {}).get("captioner") or {}
        metrics = cap.get("metrics") or {}
        if not metrics:
            continue
        for side, name in (("current", (r.stats or {}).get("current_version") or "?"),
                           ("candidate", r.candidate_version or f"run {r.id} candidate")):
            rows += [{"run": r.id, "role": side, **row} for row in _captioner_rows(name, metrics.get(side))]
    this_run = None
    if run is not None and ((run.stats or {}).get("captioner") or {}).get("status"):
        cap = run.stats["captioner"]
        this_run = {"status": cap.get("status"), "message": cap.get("message"), "gate": cap.get("gate"),
                    "cleaning": (cap.get("stats") or {}).get("cleaning")}
    return {"by_run": rows, "this_run": this_run}


def _blind(s: Session, version: str, stats: dict) -> dict[str, Any]:
    """Raters' blind picks between this version (as the candidate) and the version it was compared with."""
    result = win_rate(repo.blind_tally(s, version)).to_dict()
    made = stats.get("blind") or {}
    return {**result, "identical_outputs": made.get("identical"), "required": made.get("required"),
            "status": (repo.get_version(s, version).status if repo.get_version(s, version) else None)}


def _ablation(stats: dict) -> Optional[dict]:
    metrics = stats.get("metrics") or {}
    out = {}
    for side in ("current", "candidate"):
        memes = (metrics.get(side) or {}).get("memes")
        if memes:
            out[side] = {mode: {"macro_f1": memes[mode]["macro_f1"], "macro_f1_ci": memes[mode]["macro_f1_ci"],
                                "macro_auroc": memes[mode]["macro_auroc"]}
                         for mode in ("fused", "image_only", "text_only")} | {"deltas": memes["ablation"]}
    return out or None


def _rejected(s: Session, run: Optional[RetrainRun]) -> dict[str, Any]:
    if run is None:
        return {"counts": {}, "items": []}
    rows = repo.rejected_items(s, run_id=run.id)
    items = [{"reason": r.reason, "correction_id": r.correction_id, **{k: r.detail.get(k) for k in
              ("item_id", "kind", "text", "label", "user", "final", "heldout")},
              "why": {k: v for k, v in r.detail.items()
                      if k not in ("item_id", "kind", "text", "label", "user", "final", "heldout", "image_sha256")}}
             for r in rows]
    return {"counts": dict(Counter(r.reason for r in rows)), "total": len(rows), "items": items[:N_REJECTED_SHOWN]}


def _examples(s: Session, version: str, run: Optional[RetrainRun], stats: dict) -> list[dict[str, Any]]:
    if run is not None and run.status != "promoted":
        manifest = _load_json(stats.get("manifest_path"))
        rejected = set((manifest or {}).get("data", {}).get("rejected", {}))
        ids = [int(i.split(":")[1]) for i in (manifest or {}).get("data", {}).get("train_items", [])
               if i.startswith("correction:") and i not in rejected]
        rows = repo.corrections_with_outputs(s, correction_ids=ids, limit=N_EXAMPLES)
    else:
        rows = repo.corrections_with_outputs(s, used_in_version=version, limit=N_EXAMPLES)
    return [{"correction_id": r["correction_id"], "field": r["field"], "predicted": r["output"],
             "corrected": r["value"], "meme_text": r["input_text"] if r["kind"] == "meme" else None,
             "model_version": r["model_version"], "user": r["user"] or f"session:{r['session_id']}"} for r in rows]


def _load_json(path: Optional[str]) -> Optional[dict]:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


# --- rendering --------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(*size):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(*size[:2], figsize=size[2], squeeze=False)


def plot_ratings(ratings: dict) -> Optional[str]:
    if not ratings:
        return None
    versions = list(ratings)
    fig, axes = _figure(1, len(SCORES), (4.5 * len(SCORES), 0.7 * len(versions) + 1.8))
    colours = ["#b2182b", "#ef8a62", "#f7f7f7", "#67a9cf", "#2166ac"]
    for ax, score in zip(axes[0], SCORES):
        for y, v in enumerate(versions):
            entry = ratings[v].get(score)
            if not entry:
                continue
            total, left = entry["n"], 0.0
            for k in range(1, 6):
                share = entry["distribution"][str(k)] / total
                ax.barh(y, share, left=left, color=colours[k - 1], edgecolor="grey",
                        label=str(k) if y == 0 else None)
                left += share
        ticks = []
        for v in versions:
            e = ratings[v].get(score)
            ticks.append(f"{v}\n{e['mean']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] n={e['n']}" if e else v)
        ax.set_yticks(range(len(versions)), ticks, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(f"{score} (share of 1–5)")
    axes[0][0].legend(ncol=5, fontsize=7, loc="lower left", bbox_to_anchor=(0, -0.45))
    fig.tight_layout()
    return _png(fig)


def plot_retrieval(series: dict) -> Optional[str]:
    if not series:
        return None
    versions = list(series)
    top = max(series[v][d].get("R@10_ci", [0, 0])[1] if series[v][d].get("R@10_ci") else series[v][d]["R@10"]
              for v in versions for d in ("text_to_image", "image_to_text"))
    fig, axes = _figure(1, 2, (10, 3.2))
    for ax, direction in zip(axes[0], ("text_to_image", "image_to_text")):
        for k, marker in ((1, "o"), (5, "s"), (10, "^")):
            ys = [series[v][direction][f"R@{k}"] for v in versions]
            cis = [series[v][direction].get(f"R@{k}_ci") or [y, y] for v, y in zip(versions, ys)]
            err = np.array([[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]])
            ax.errorbar(range(len(versions)), ys, yerr=np.clip(err, 0, None), marker=marker, capsize=3, label=f"R@{k}")
        ax.set_xticks(range(len(versions)), versions, rotation=20, fontsize=8)
        ax.set_ylim(0, min(1.0, top * 1.25 + 0.02))
        ax.set_title(f"bootstrap test split, {direction.replace('_', ' ')}")
        ax.legend(fontsize=8)
    return _png(fig)


def plot_ablation(ablation: Optional[dict]) -> Optional[str]:
    if not ablation:
        return None
    fig, axes = _figure(1, 1, (6, 3.2))
    ax = axes[0][0]
    modes = ("fused", "image_only", "text_only")
    sides = [s for s in ("current", "candidate") if s in ablation]
    width = 0.8 / len(sides)
    for j, side in enumerate(sides):
        ys = [ablation[side][m]["macro_f1"] for m in modes]
        cis = [ablation[side][m]["macro_f1_ci"] or [y, y] for m, y in zip(modes, ys)]
        err = np.array([[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]])
        ax.bar(np.arange(3) + j * width, ys, width, yerr=np.clip(err, 0, None), capsize=3, label=side)
    ax.set_xticks(np.arange(3) + width * (len(sides) - 1) / 2, ["image + text", "image only", "text only"])
    ax.set_ylabel("meme macro-F1")
    ax.set_ylim(0, 1)
    ax.set_title("modality ablation (bootstrap meme test split)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_bars(counts: dict[str, float], title: str, xlabel: str) -> Optional[str]:
    if not counts:
        return None
    fig, axes = _figure(1, 1, (6, 0.4 * len(counts) + 1.2))
    ax = axes[0][0]
    ax.barh(list(counts), list(counts.values()), color="#67a9cf")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _png(fig)


def _img(b64: Optional[str], alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else "<p><em>no data yet</em></p>"


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def _captioner_section(captioner: dict[str, Any]) -> str:
    rows = captioner.get("by_run") or []
    if not rows:
        return ""
    this_run = captioner.get("this_run") or {}
    return ('<section id="captioner"><h2>Generative captioner: CIDEr-D, BLEU-4, exact match per version</h2>'
            "<p>Greedy captions of the accepted held-out corrections (<em>heldout</em>) and of old-concept pairs "
            "(<em>guard</em>), the version each run started from and its candidate; 95% bootstrap intervals.</p>"
            + (f"<p><strong>{html.escape(str(this_run.get('message', '')))}</strong></p>" if this_run else "")
            + _table(rows, ["run", "role", "version", "set", "n", "cider_d", "cider_d_ci", "bleu4", "exact",
                            "exact_ci"]) + "</section>")


def render_html(data: dict[str, Any]) -> str:
    v = html.escape(data["version"])
    summary = data["summary"]
    gate = data.get("gate") or {}
    checks = [{"metric": c["metric"], "role": c["role"], "current": c["current"], "candidate": c["candidate"],
               "delta": c["delta"], "tolerance": c["tolerance"], "ok": "yes" if c["passed"] else "NO",
               "note": c["note"]} for c in gate.get("checks", [])]
    agreement = [{"score": k, **v2} for k, v2 in data["agreement"].items()]
    rates = [{"version": k, **{x: y for x, y in v2.items()}} for k, v2 in data["corrections"].items()]
    rejected = data["rejected"]
    parts = [
        f"<h1>mmapp model version {v}</h1><p>generated {html.escape(data['generated_at'])}</p>",
        '<section id="summary"><h2>Summary</h2>' + _table([{"field": k, "value": x} for k, x in summary.items()],
                                                          ["field", "value"]) + "</section>",
        '<section id="gate"><h2>Gate: candidate vs current on the same held-out sets</h2>'
        f"<p><strong>{html.escape(gate.get('reason', 'no gate decision (this version was not produced by a retrain)'))}"
        "</strong></p>" + _table(checks, ["metric", "role", "current", "candidate", "delta", "tolerance", "ok", "note"])
        + "</section>",
        '<section id="ratings"><h2>Ratings per model version</h2><p>Share of each score 1–5; mean with a 95% '
        "bootstrap interval.</p>" + _img(plot_ratings(data["ratings"]), "rating distributions") + "</section>",
        '<section id="agreement"><h2>Inter-rater agreement (Krippendorff\'s alpha, ordinal)</h2>'
        + _table(agreement, ["score", "alpha", "items_with_several_ratings", "raters", "note"]) + "</section>",
        '<section id="raters"><h2>Raters</h2><p>Feedback per account (anonymous sessions pooled) and agreement '
        "with the other raters' consensus on the same items.</p>"
        + _table(data.get("raters") or [], ["user", "role", "disabled", "ratings", "corrections", "used", "rejected",
                                            "score_agreement", "scores_compared", "label_agreement",
                                            "labels_compared"])
        + ("<h3>Chance test per rater in this run</h3><p>Raters with at least <code>retrain.rater_min_items</code> "
           "pairs, judged on all of them: <em>chance</em> (no better than random captions: all rejected), "
           "<em>reliable</em> (near misses kept), <em>pair by pair</em>.</p>"
           + _table(data["rater_chance_test"], ["rater", "pairs", "under_bar", "fail_share", "chance_fail_share",
                                                "p_value", "verdict"]) if data.get("rater_chance_test") else "")
        + "</section>",
        '<section id="corrections"><h2>Correction rates</h2><p>Share of predictions that received a correction '
        "(95% Wilson interval).</p>" + _table(rates, ["version", "predictions", "corrected_predictions", "rate", "ci",
                                                       "by_field"])
        + _img(plot_bars({r["version"]: r["rate"] or 0.0 for r in rates}, "corrected share of predictions", "rate"),
               "correction rates") + "</section>",
        '<section id="retrieval"><h2>Retrieval R@K over versions</h2>'
        + _img(plot_retrieval(data["retrieval"]["bootstrap_test_by_version"]), "retrieval over versions")
        + ("<h3>Held-out real photos (report set: never used for a choice or by the gate)</h3>"
           + _table(data["retrieval"]["report_photos"], list(data["retrieval"]["report_photos"][0]))
           if data["retrieval"].get("report_photos") else "")
        + "</section>",
        _captioner_section(data.get("captioner") or {}),
        '<section id="blind"><h2>Blind before/after comparison</h2><p>Raters saw this version\'s caption and the '
        "previous version's for the same held-out picture, in random order, and picked the better one (same = half "
        "a win). Win rate of this version with a 95% Wilson interval.</p>"
        + _table([{k: data["blind"].get(k) for k in ("pairs", "votes", "raters", "candidate", "current", "same",
                                                   "rate", "low", "high", "identical_outputs", "required", "status")}],
                 ["pairs", "votes", "raters", "candidate", "current", "same", "rate", "low", "high",
                  "identical_outputs", "required", "status"]) + "</section>",
        '<section id="ablation"><h2>Modality ablation</h2>' + _img(plot_ablation(data["ablation"]), "ablation")
        + (_table([{"side": side, **{k: x["macro_f1"] for k, x in d["deltas"].items()}}
                   for side, d in (data["ablation"] or {}).items()],
                  ["side", "fused_minus_image_only", "fused_minus_text_only"]) if data["ablation"] else "")
        + "</section>",
        f'<section id="rejected"><h2>Rejected items ({rejected.get("total", 0)})</h2>'
        + _img(plot_bars(rejected["counts"], "rejected items by reason", "items"), "rejections by reason")
        + _table(rejected["items"], ["reason", "final", "correction_id", "kind", "text", "label", "user", "why"])
        + "</section>",
        '<section id="examples"><h2>Example corrections</h2>'
        + _table(data["examples"], ["correction_id", "field", "predicted", "corrected", "meme_text", "model_version",
                                    "user"]) + "</section>",
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
             "img{max-width:100%}section{margin-bottom:2em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>mmapp report {v}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
