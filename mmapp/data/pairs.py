"""Users' own image-caption pairs: read TSV, CSV, JSONL, COCO captions or a folder of images with
sidecar .txt captions into one list of ``Pair``; write them back as TSV.

Only checks that image files exist; decodes no image and touches no database.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

FORMATS = ("tsv", "csv", "jsonl", "coco", "folder")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MAX_CAPTION_CHARS = 1000
_EXTENSION_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "coco"}
_IMAGE_COLUMNS = ("image_path", "image", "file_name")
_CAPTION_COLUMNS = ("caption", "text")


@dataclass(frozen=True)
class Pair:
    image_path: Path  # absolute, symlinks resolved
    caption: str  # whitespace-normalised, non-empty, at most MAX_CAPTION_CHARS
    group: str  # image identity: every caption of one image shares it (the resolved path)
    source: str  # where the pair was read: "captions.tsv:12", "captions.json:annotations[3]"


def read_pairs(path: Path, *, fmt: str | None = None, image_root: Path | None = None) -> list[Pair]:
    """Pairs from ``path`` in format ``fmt`` (guessed from the extension, or "folder" for a
    directory, when None).

    Relative image paths are resolved against ``image_root`` when given, else against the folder of
    the file (COCO also tries an ``images/`` folder next to the JSON). Any bad line raises
    ``ValueError`` naming ``file:line``; so does a folder without any captioned image.
    """
    path = Path(path)
    fmt = fmt or _guess_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown pairs format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise ValueError(f"pairs {fmt} {'folder' if fmt == 'folder' else 'file'} not found: {path}")
    root = Path(image_root) if image_root is not None else None
    readers = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl, "coco": _read_coco,
               "folder": _read_folder}
    pairs = readers[fmt](path, root)
    if not pairs and fmt == "folder":
        raise ValueError(f"no image with a sidecar .txt caption file in folder {path}")
    return pairs  # a file may hold no pairs: write_pairs_tsv([]) must read back


def write_pairs_tsv(pairs: Iterable[Pair], path: Path) -> None:
    """Write ``image_path<TAB>caption`` lines with image paths relative to the TSV's folder,
    atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for pair in pairs:
                rel = Path(os.path.relpath(pair.image_path, base)).as_posix()
                if "\t" in rel or "\n" in rel:
                    raise ValueError(f"image path with a tab or newline cannot go in a TSV: {pair.image_path}")
                f.write(f"{rel}\t{_normalise(pair.caption)}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    fmt = _EXTENSION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the pairs format of {path} from its extension {path.suffix!r}; "
            f"pass fmt= one of {', '.join(FORMATS)}"
        )
    return fmt


def _normalise(caption: str) -> str:
    return " ".join(caption.split())


def _make_pair(image: Any, caption: Any, *, base: Path, where: str) -> Pair:
    """Validate one row; ``where`` ("/abs/captions.tsv:12") goes into every error."""
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: missing image path, got {image!r}")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be text, got {type(caption).__name__} {caption!r}")
    text = _normalise(caption)
    if not text:
        raise ValueError(f"{where}: empty caption for image {image!r}")
    if len(text) > MAX_CAPTION_CHARS:
        raise ValueError(f"{where}: caption of {len(text)} characters, max {MAX_CAPTION_CHARS}")
    image_path = (base / image.strip()).resolve()
    if not image_path.is_file():
        raise ValueError(f"{where}: image file not found: {image.strip()} (looked for {image_path})")
    file, _, loc = where.rpartition(":")
    return Pair(image_path=image_path, caption=text, group=image_path.as_posix(),
                source=f"{Path(file).name}:{loc}")


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, line.rstrip("\r\n")


def _read_tsv(path: Path, root: Path | None) -> list[Pair]:
    base = root or path.parent
    pairs: list[Pair] = []
    first = True
    for lineno, line in _lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        if "\t" not in line:
            raise ValueError(f"{where}: expected 'image_path<TAB>caption', found no tab in {line[:80]!r}")
        image, caption = line.split("\t", 1)
        if first and image.strip().lower() in _IMAGE_COLUMNS and caption.strip().lower() in _CAPTION_COLUMNS:
            first = False
            continue  # a header line
        first = False
        pairs.append(_make_pair(image, caption, base=base, where=where))
    return pairs


def _read_csv(path: Path, root: Path | None) -> list[Pair]:
    base = root or path.parent
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        image_col = next((c for c in _IMAGE_COLUMNS if c in columns), None)
        caption_col = next((c for c in _CAPTION_COLUMNS if c in columns), None)
        if image_col is None or caption_col is None:
            raise ValueError(
                f"{path}:1: CSV header needs an image column ({'|'.join(_IMAGE_COLUMNS)}) and a "
                f"caption column ({'|'.join(_CAPTION_COLUMNS)}), got {reader.fieldnames}"
            )
        reader.fieldnames = columns
        pairs = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            pairs.append(_make_pair(row.get(image_col) or "", row.get(caption_col) or "", base=base, where=where))
    return pairs


def _read_jsonl(path: Path, root: Path | None) -> list[Pair]:
    base = root or path.parent
    pairs: list[Pair] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        image = next((record[k] for k in ("image", *_IMAGE_COLUMNS) if k in record), None)
        if "captions" in record:
            captions = record["captions"]
            if not isinstance(captions, list) or not captions:
                raise ValueError(f"{where}: 'captions' must be a non-empty list, got {captions!r}")
        elif "caption" in record:
            captions = [record["caption"]]
        else:
            raise ValueError(f"{where}: expected 'caption' or 'captions', got keys {sorted(record)}")
        pairs.extend(_make_pair(image, c, base=base, where=where) for c in captions)
    return pairs


def _read_coco(path: Path, root: Path | None) -> list[Pair]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not COCO captions JSON (needs 'images' and 'annotations' lists)")
    bases = [root] if root is not None else [path.parent, path.parent / "images"]
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{path}:images[{i}]: needs 'id' and 'file_name', got {img!r}")
        files[img["id"]] = img["file_name"]
    pairs = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{where}: needs 'image_id' and 'caption', got {ann!r}")
        if ann["image_id"] not in files:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} is not among the images")
        file_name = files[ann["image_id"]]
        base = next((b for b in bases if (b / file_name).is_file()), bases[0])
        pairs.append(_make_pair(file_name, ann.get("caption"), base=base, where=where))
    return pairs


def _read_folder(path: Path, root: Path | None) -> list[Pair]:
    del root  # images sit next to their captions
    pairs = []
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            continue
        for lineno, line in _lines(sidecar):
            if line.strip():
                pairs.append(_make_pair(image.name, line, base=image.parent, where=f"{sidecar}:{lineno}"))
    return pairs
