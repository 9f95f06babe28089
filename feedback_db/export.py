"""Export predictions with their ratings and corrections as a dataset folder (csv, parquet, jsonl or HF).

The folder is built under a temporary name and renamed into place when complete, so a reader never
sees a half-written export. Images are copied next to the data; the ``image_path`` column is
relative to the export folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from feedback_db.blobstore import FORMAT_EXT, BlobStore, normalize_ext
from feedback_db.models import CORRECTION_FIELDS, Prediction
from feedback_db.repository import RATING_SCORES, output_summary

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("csv", "parquet", "jsonl", "hf")
# Where the rows live inside the export folder; 'hf' is a `datasets.save_to_disk` folder (the export folder itself).
DATA_FILES = {"csv": "feedback.csv", "parquet": "feedback.parquet", "jsonl": "feedback.jsonl", "hf": ""}

SCHEMA = pa.schema(
    [
        ("prediction_id", pa.int64()),
        ("request_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("kind", pa.string()),
        ("model_version", pa.string()),
        ("ablation", pa.string()),
        ("input_text", pa.string()),
        ("output", pa.string()),  # caption or meme label
        ("outputs_json", pa.string()),  # the full outputs dict
        ("latency_ms", pa.float64()),
        ("stage_ms_json", pa.string()),
        ("session_id", pa.string()),
        ("user", pa.string()),
        ("image_sha256", pa.string()),
        ("image_path", pa.string()),  # images/<sha>.<ext>, relative to the export folder; null if the blob is missing
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_ratings", pa.int32()),
        ("mean_coherence", pa.float64()),
        ("mean_relevance", pa.float64()),
        ("mean_detail", pa.float64()),
        ("ratings_json", pa.string()),  # [{"coherence":..,"relevance":..,"detail":..,"comment":..,"user":..,"created_at":..}]
        ("n_corrections", pa.int32()),
        ("corrected_caption", pa.string()),  # latest non-rejected correction of each field
        ("corrected_ocr_text", pa.string()),
        ("corrected_label", pa.string()),
        ("corrections_json", pa.string()),  # [{"field":..,"value":..,"status":..,"user":..,"created_at":..}]
    ]
)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _mean(values: list[Optional[int]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _row(p: Prediction, image_path: Optional[str]) -> dict[str, Any]:
    latest_fix = {}
    for c in p.corrections:  # ordered by id, so later ones win
        if c.status != "rejected":
            latest_fix[c.field] = c.value
    return {
        "prediction_id": p.id,
        "request_id": p.request_id,
        "created_at": p.created_at,
        "kind": p.kind,
        "model_version": p.model_version,
        "ablation": p.ablation,
        "input_text": p.input_text,
        "output": output_summary(p.outputs),
        "outputs_json": _json(p.outputs),
        "latency_ms": p.latency_ms,
        "stage_ms_json": _json(p.stage_ms),
        "session_id": p.session_id,
        "user": p.user,
        "image_sha256": p.image_sha256,
        "image_path": image_path,
        "image_format": p.upload.format,
        "width": p.upload.width,
        "height": p.upload.height,
        "n_ratings": len(p.ratings),
        **{f"mean_{score}": _mean([getattr(r, score) for r in p.ratings]) for score in RATING_SCORES},
        "ratings_json": _json(
            [
                {**{k: getattr(r, k) for k in (*RATING_SCORES, "comment", "user")}, "created_at": r.created_at.isoformat()}
                for r in p.ratings
            ]
        ),
        "n_corrections": len(p.corrections),
        **{f"corrected_{field}": latest_fix.get(field) for field in CORRECTION_FIELDS},
        "corrections_json": _json(
            [
                {"field": c.field, "value": c.value, "status": c.status, "user": c.user, "created_at": c.created_at.isoformat()}
                for c in p.corrections
            ]
        ),
    }


# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection"), full-width forms too.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def formula_safe(value: Optional[str]) -> Optional[str]:
    """``value`` with a leading ``'`` when a spreadsheet would run it as a formula (``=HYPERLINK(...)``)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def formula_safe_table(table: pa.Table) -> pa.Table:
    """Every string column passed through :func:`formula_safe` (numbers and timestamps stay typed)."""
    for i, column in enumerate(table.schema):
        if pa.types.is_string(column.type):
            safe = pa.array([formula_safe(v) for v in table.column(i).to_pylist()], type=pa.string())
            table = table.set_column(i, column, safe)
    return table


def _write(table: pa.Table, rows: list[dict[str, Any]], folder: Path, fmt: str) -> None:
    if fmt == "csv":  # the one format people open in a spreadsheet; the others keep values as typed
        pa_csv.write_csv(formula_safe_table(table), folder / DATA_FILES["csv"])
    elif fmt == "parquet":
        pq.write_table(table, folder / DATA_FILES["parquet"])
    elif fmt == "jsonl":
        with (folder / DATA_FILES["jsonl"]).open("w", encoding="utf-8") as f:
            for row in rows:
                line = {**row, "created_at": row["created_at"].isoformat()}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")  # key order = SCHEMA order
    else:  # hf
        import datasets  # heavy import, only needed here

        # num_shards=1: with zero rows the default writes no shard and load_from_disk then fails
        datasets.Dataset(table).save_to_disk(str(folder), num_shards=1)


def _free_name(out_dir: Path, stem: str) -> Path:
    target, n = out_dir / stem, 1
    while target.exists():
        target, n = out_dir / f"{stem}-{n}", n + 1
    return target


def export_feedback(
    session: Session,
    out_dir: str | os.PathLike[str],
    fmt: str,
    blobstore: BlobStore,
    *,
    since: Optional[datetime] = None,
    name: Optional[str] = None,
    image_filter: Optional[Callable[[bytes], tuple[bytes, str]]] = None,
) -> Path:
    """Write one row per prediction (ratings and corrections flattened) plus its image into a new
    folder ``out_dir/<name>`` (default ``feedback-<UTC time>-<fmt>``) and return that folder.

    Rows: ``<folder>/feedback.csv|parquet|jsonl`` (see ``DATA_FILES``), or for ``fmt='hf'`` the
    folder itself is ``datasets.load_from_disk``-able. Columns: ``SCHEMA``.
    Open ``session`` on ``read_only_engine(engine)`` so a long export does not hold SQLite's write lock.
    ``image_filter``: bytes -> ``(bytes, extension)`` applied to each image on its way out (the app passes
    ``mmapp.imageio.strip_metadata``, so blobs stored before uploads were stripped leave without
    EXIF/GPS); an image it refuses is left out (empty ``image_path``). None copies the stored bytes.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if since is not None and since.tzinfo is None:
        raise ValueError(f"since must be timezone-aware (UTC), got naive {since!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    query = (
        select(Prediction)
        .options(selectinload(Prediction.ratings), selectinload(Prediction.corrections), selectinload(Prediction.upload))
        .order_by(Prediction.id)
    )
    if since is not None:
        query = query.where(Prediction.created_at >= since)
    predictions = list(session.scalars(query))

    stem = name or f"feedback-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{fmt}"
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{stem}.", suffix=".tmp"))
    try:
        images = staging / "images"
        images.mkdir()
        copied: dict[str, Optional[str]] = {}
        rows = []
        for p in predictions:
            if p.image_sha256 not in copied:
                copied[p.image_sha256] = _copy_image(blobstore, p, images, image_filter)
            rows.append(_row(p, copied[p.image_sha256]))
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        _write(table, rows, staging, fmt)
        target = _free_name(out_dir, stem) if name is None else out_dir / stem
        os.rename(staging, target)  # fails rather than merging if an explicitly named target exists
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %d predictions (%d images) to %s", len(rows), sum(v is not None for v in copied.values()), target)
    return target


def _copy_image(blobstore: BlobStore, p: Prediction, images: Path,
                image_filter: Optional[Callable[[bytes], tuple[bytes, str]]]) -> Optional[str]:
    source = blobstore.path(p.upload.relpath)
    if not source.is_file():
        log.warning("image %s of prediction %d is missing from the blob store at %s", p.image_sha256, p.id, source)
        return None
    if image_filter is None:
        filename = f"{p.image_sha256}.{p.upload.format}"
        shutil.copyfile(source, images / filename)
        return f"images/{filename}"
    try:
        data, fmt = image_filter(source.read_bytes())
    except ValueError as exc:
        log.warning("image %s of prediction %d left out of the export: %s", p.image_sha256, p.id, exc)
        return None
    filename = f"{p.image_sha256}.{normalize_ext(FORMAT_EXT.get(fmt.upper(), fmt))}"  # named by its stored key
    (images / filename).write_bytes(data)
    return f"images/{filename}"
