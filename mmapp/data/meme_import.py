"""Bring your own labelled memes: Hateful Memes jsonl, Memotion csv, or a plain image/text/label table,
normalised onto this app's meme labels (``python -m mmapp import memes FILE``).

Public meme data sets label other things than ours (Hateful Memes: hateful 0/1; Memotion: humour,
sarcasm, offensiveness, overall sentiment), so a *label map* says which of their values become which
of our labels. A map is a comma-separated list of rules ``[column:]value=label``, tried in order; the
first rule that matches a row gives its label, and rows no rule matches are skipped (and counted)::

    hateful  --label-map "0=positive,1=dark humor"            (column defaults to "label")
    memotion --label-map "sarcasm:very_twisted=sarcastic,overall_sentiment:very_positive=positive"

Memotion has a default map (:data:`MEMOTION_DEFAULT_MAP`); Hateful Memes has none (hatefulness is not
one of our labels: say what it should mean). The normalised file, ``<home>/datasets/user_memes/
memes.jsonl``, holds one ``{"image", "text", "label", "split", "format", "source_id"}`` per meme,
with absolute image paths (images are not copied); re-importing merges by (image, text), a new label
replacing the old. Splits are by a hash of the image path: 90 % train, 10 % val (never test, so the
synthetic test numbers stay comparable). ``build-bootstrap`` and the retrain's replay add these memes
to the synthetic set (``mmapp.pipeline.meme_examples``).

Pure data code: no model. I/O only in the functions that say so.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

FORMATS = ("hateful", "memotion", "table")
# Memotion 7k (Sharma et al., SemEval-2020 task 8): sarcasm first, then sentiment.
MEMOTION_DEFAULT_MAP = ("sarcasm:general=sarcastic,sarcasm:twisted_meaning=sarcastic,sarcasm:very_twisted=sarcastic,"
                        "overall_sentiment:positive=positive,overall_sentiment:very_positive=positive,"
                        "humour:very_funny=dark humor,humour:hilarious=dark humor")
# NB the last two rules only fire for non-sarcastic, non-positive memes (negative/neutral and very funny):
# the closest Memotion comes to "dark humour". Pass your own map when you know better.


@dataclass(frozen=True)
class ImportedMeme:
    image_path: Path
    text: str
    label: str
    split: str
    format: str = ""
    source_id: str = ""


@dataclass
class ImportReport:
    read: int = 0
    imported: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    labels: Counter = field(default_factory=Counter)


def parse_label_map(spec: str, *, default_column: str | None, labels: Sequence[str]) -> list[tuple[str, str, str]]:
    """``"[column:]value=label,..."`` -> [(column, value, label)]; every label must be one of ``labels``."""
    rules = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"label map rule {part!r} is not [column:]value=label")
        lhs, label = (s.strip() for s in part.rsplit("=", 1))
        column, _, value = lhs.rpartition(":")
        column = column.strip() or default_column
        if not column:
            raise ValueError(f"label map rule {part!r} needs a column (column:value=label)")
        if label not in labels:
            raise ValueError(f"label map rule {part!r}: {label!r} is not a meme label; valid: {list(labels)}")
        rules.append((column, value.strip(), label))
    if not rules:
        raise ValueError("the label map is empty")
    return rules


def _apply(rules: list[tuple[str, str, str]], row: dict) -> str | None:
    for column, value, label in rules:
        if column in row and str(row[column]).strip().lower() == value.lower():
            return label
    return None


def split_of(image: Path, text: str) -> str:
    h = int(hashlib.sha1(f"{image}\n{text}".encode()).hexdigest()[:8], 16)
    return "val" if h % 10 == 0 else "train"


def _resolve(name: str, base: Path, images: Path | None) -> Path | None:
    name = str(name).strip()
    if not name:
        return None
    candidates = [Path(name)] if Path(name).is_absolute() else []
    for root in ([images] if images else []) + [base, base / "images", base / "img"]:
        candidates += [root / name, root / Path(name).name]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _readable(path: Path) -> bool:
    """Whether PIL can parse the file's header (a broken image must not stop a bootstrap build later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "{}")
        keys = set(json.loads(first))
        return "hateful" if {"img", "text"} <= keys else "table"
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","), [])
    return "memotion" if "image_name" in header else "table"


def _rows(path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
        return
    with open(path, newline="", encoding="utf-8-sig") as fh:
        yield from csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")


def read_memes(path: str | os.PathLike, *, fmt: str | None = None, label_map: str | None = None,
               labels: Sequence[str], images: str | os.PathLike | None = None) -> tuple[list[ImportedMeme], ImportReport]:
    """Read a labelled meme file into :class:`ImportedMeme` rows (reads the file, checks images exist).

    * ``hateful``: jsonl with ``img`` (path relative to the file), ``text``, ``label`` (0/1); a label
      map is required. Rows without a label (the unlabelled test files) are skipped.
    * ``memotion``: csv with ``image_name``, ``text_corrected`` (else ``text_ocr``) and the label
      columns ``humour``, ``sarcasm``, ``offensive``, ``motivational``, ``overall_sentiment``; images
      next to the file or in ``images/`` (or ``images=``).
    * ``table``: csv/tsv/jsonl with ``image``, ``text``, ``label`` columns already in our labels (a
      label map may rename them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"meme file not found: {path}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown meme format {fmt!r}; valid: {list(FORMATS)}")
    labels = list(labels)
    if fmt == "hateful" and not label_map:
        raise ValueError('Hateful Memes labels are hateful 0/1, not meme labels: pass --label-map, '
                         'e.g. "0=positive,1=dark humor"')
    if fmt == "memotion" and not label_map:
        label_map = MEMOTION_DEFAULT_MAP
    rules = parse_label_map(label_map, default_column="label", labels=labels) if label_map else None
    image_root = Path(images) if images else None
    report, out = ImportReport(), []
    for n, row in enumerate(_rows(path)):
        report.read += 1
        if fmt == "hateful":
            image_name, text, source_id = row.get("img", ""), row.get("text", ""), str(row.get("id", n))
            if row.get("label") in (None, ""):
                report.skipped["no label"] += 1
                continue
        elif fmt == "memotion":
            image_name = row.get("image_name", "")
            text = (row.get("text_corrected") or "").strip() or (row.get("text_ocr") or "").strip()
            source_id = image_name
        else:
            image_name, text = row.get("image", "") or row.get("image_path", ""), row.get("text", "")
            source_id = str(row.get("id", n))
        label = _apply(rules, row) if rules else str(row.get("label", "")).strip()
        if label is None:
            report.skipped["no label-map rule matched"] += 1
            continue
        if label not in labels:
            report.skipped[f"label {label!r} is not a meme label"] += 1
            continue
        text = " ".join(str(text).split())
        if not text:
            report.skipped["no text"] += 1
            continue
        image = _resolve(image_name, path.parent, image_root)
        if image is None:
            report.skipped["image not found"] += 1
            continue
        if not _readable(image):
            report.skipped["image unreadable"] += 1
            continue
        out.append(ImportedMeme(image, text, label, split_of(image, text), fmt, source_id))
        report.labels[label] += 1
    report.imported = len(out)
    return out, report


def read_normalised(path: str | os.PathLike) -> list[ImportedMeme]:
    """The rows of a normalised ``memes.jsonl``."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(ImportedMeme(Path(d["image"]), d["text"], d["label"], d.get("split", "train"),
                                    d.get("format", ""), str(d.get("source_id", ""))))
    return out


def write_normalised(memes: Sequence[ImportedMeme], folder: str | os.PathLike, *, replace: bool = False) -> Path:
    """Merge ``memes`` into ``folder/memes.jsonl`` (by image and text; ``replace`` starts afresh); atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "memes.jsonl"
    merged: dict[tuple[str, str], ImportedMeme] = {}
    if path.is_file() and not replace:
        merged = {(str(m.image_path), m.text): m for m in read_normalised(path)}
    for m in memes:
        merged[(str(m.image_path), m.text)] = m
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".memes-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for m in merged.values():
                fh.write(json.dumps({"image": str(m.image_path), "text": m.text, "label": m.label, "split": m.split,
                                     "format": m.format, "source_id": m.source_id}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
