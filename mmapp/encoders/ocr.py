"""Read the overlaid text of a meme with RapidOCR (PP-OCRv4 detector + recogniser, ONNX, CPU).

Models load on first use, never at import. RapidOCR's recogniser drops the spaces between words; we
run its components ourselves so that (1) the detector sees exactly ``det_side`` pixels while the
recogniser crops the full-resolution image, (2) word boxes of one caption line are merged into one
line before recognition, and (3) spaces are put back from the recogniser's own CTC space class: the
PP-OCRv4 dictionary ends with " ", and between two words its probability rises above the
blank-dominated background even where blank wins the argmax (median ~0.4 at word gaps, < 0.002
between letters of one word on rendered memes; the ``OCRConfig`` space thresholds were set from
~3,000 such letter gaps). Built against rapidocr-onnxruntime 1.4.4 (pinned).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from mmapp.encoders.base import package_version, quiet_session_options
from mmapp.imageio import flatten_on_white


@dataclass(frozen=True)
class OCRConfig:
    det_side: int = 512  # the image is resized so its longest side is this before detection (benchmarks/ocr.py)
    min_score: float = 0.5  # lines whose mean character confidence is below this are dropped
    box_thresh: float = 0.5  # DB detector: mean probability inside a box to keep it
    unclip_ratio: float = 1.6  # DB detector: how far a box grows around its text kernel
    use_angle_cls: bool = False  # 0/180 degree classifier; meme captions are upright
    rec_batch_num: int = 8  # line crops per recogniser call
    threads: int = 0  # onnxruntime intra-op threads; 0 = all cores (at most 4)
    space_prob: float = 0.02  # CTC space-class probability between two letters that alone marks a word break
    weak_space_prob: float = 0.002  # ... that marks one if the letters are also >= space_cols columns apart
    space_cols: int = 5  # blank recogniser columns between letters (one column = 1/6 of the line height)
    gap_marks: str = "-/\u00b7"  # such a mark touching a letter is read as a word break (outline artefact); "" = off
    merge_gap: float = 1.5  # same-row boxes closer than this many line heights are read as one line
    block_gap: float = 0.8  # vertical gap (in line heights) above which lines belong to separate text blocks
    caps_share: float = 0.6  # a line with at least this share of upper-case letters is upper-cased (>1 disables)


def _quiet_session(session, threads: int):
    """``session`` (one of RapidOCR's) rebuilt with :func:`quiet_session_options`: RapidOCR leaves
    onnxruntime's spinning on, and its idle threads burned the cores between reads (7-17 % of the REST
    path's CPU per pair, docs/results.md; same text). Same model, providers and optimisation level."""
    import onnxruntime as ort

    options = quiet_session_options(threads)
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(session._model_path, options, providers=session.get_providers())


@dataclass(frozen=True)
class OCRLine:
    text: str
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in pixels of the input image
    score: float  # mean confidence of the line's characters


@dataclass(frozen=True)
class OCRResult:
    text: str  # lines in reading order; " " within a text block, "\n" between blocks (top / bottom caption)
    lines: list[OCRLine] = field(default_factory=list)
    seconds: float = 0.0


class RapidOCRReader:
    """OCR for memes; ``read`` returns lines in reading order with word spaces restored."""

    def __init__(self, config: OCRConfig = OCRConfig()):
        if config.det_side < 32:
            raise ValueError(f"det_side must be at least 32 px, got {config.det_side}")
        self.config = config
        self._ocr = None  # rapidocr_onnxruntime.RapidOCR, built on first read
        self._load_lock = threading.Lock()  # concurrent first reads build the sessions once

    @property
    def identity(self) -> str:
        """Changes whenever the package or a setting that can change the text changes (cache key)."""
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("threads", "rec_batch_num")}
        digest = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:8]
        return f"rapidocr-{package_version('rapidocr-onnxruntime')}-ppocrv4-det{self.config.det_side}-{digest}"

    @property
    def engine(self):
        """The RapidOCR pipeline whose detector, recogniser and crop helper ``read`` composes."""
        with self._load_lock:
            if self._ocr is None:
                self._ocr = self._build_engine()
        return self._ocr

    def _build_engine(self):
        from rapidocr_onnxruntime import RapidOCR

        threads = self.config.threads or min(os.cpu_count() or 1, 4)
        engine = RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            det_limit_type="min",  # with a tiny limit the detector keeps our size (rounded to /32)
            det_limit_side_len=32,
            det_box_thresh=self.config.box_thresh,
            det_unclip_ratio=self.config.unclip_ratio,
            rec_batch_num=self.config.rec_batch_num,
            use_cls=self.config.use_angle_cls,
        )
        for holder in (engine.text_det.infer, engine.text_rec.session, engine.text_cls.infer):
            holder.session = _quiet_session(holder.session, threads)
        return engine

    def read(self, image: Image.Image, *, until: Callable[[str], bool] | None = None) -> OCRResult:
        """Text of ``image``; ``seconds`` excludes the one-off model load of the first call.

        ``until(text_so_far)``: recognise lines one by one in reading order and stop as soon as it is
        true (a caption quoting the first words of a page need not read the whole page). The text is
        then the start of what a full read gives."""
        engine = self.engine  # loaded outside the timed region
        start = time.perf_counter()
        rgb = np.asarray(flatten_on_white(image))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # (H, W, 3), what RapidOCR's models expect
        boxes = self._detect(bgr)
        lines: list[OCRLine] = []
        if boxes:
            quads = [np.array([[l, t], [r, t], [r, b], [l, b]], dtype=np.float32) for l, t, r, b in boxes]
            crops = engine.get_crop_img_list(bgr, quads)
            if self.config.use_angle_cls:
                crops, _, _ = engine.text_cls(crops)
            if until is None:
                read = zip(boxes, self._recognise(crops))
            else:  # line by line, in reading order, until the caller has enough
                read = ((box, self._recognise([crop])[0]) for box, crop in zip(boxes, crops))
            for box, (text, score) in read:
                text = _caps(text.strip(), self.config.caps_share)
                if text and score >= self.config.min_score:
                    lines.append(OCRLine(text=text, box=box, score=score))
                    if until is not None and until(_join(lines, self.config.block_gap)):
                        break
        return OCRResult(text=_join(lines, self.config.block_gap), lines=lines,
                         seconds=time.perf_counter() - start)

    def _detect(self, bgr: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Axis-aligned line boxes in input pixels, in reading order."""
        import cv2

        h, w = bgr.shape[:2]
        scale = self.config.det_side / max(h, w)
        size = (max(32, round(w * scale)), max(32, round(h * scale)))
        small = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        quads, _ = self.engine.text_det(small)  # (N, 4, 2) in `small` pixels
        if quads is None or len(quads) == 0:
            return []
        sx, sy = w / size[0], h / size[1]
        rects = [(float(q[:, 0].min() * sx), float(q[:, 1].min() * sy), float(q[:, 0].max() * sx),
                  float(q[:, 1].max() * sy)) for q in quads]
        rects = [r for r in rects if r[2] - r[0] >= 2 and r[3] - r[1] >= 2]  # slivers from upscaled tiny inputs
        return _merge_rows(rects, self.config.merge_gap)

    def _recognise(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        rec = self.engine.text_rec
        charset = rec.postprocess_op.character  # index 0 = CTC blank, last = " "
        space = len(charset) - 1
        order = np.argsort([c.shape[1] / c.shape[0] for c in crops])  # similar widths share a batch
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        step = self.config.rec_batch_num
        for lo in range(0, len(order), step):
            batch = [crops[i] for i in order[lo:lo + step]]
            _, height, width = rec.rec_image_shape
            max_ratio = max(width / height, *(c.shape[1] / c.shape[0] for c in batch))
            x = np.stack([rec.resize_norm_img(c, max_ratio) for c in batch]).astype(np.float32)
            probs = rec.session(x)[0]  # (B, T, C) softmax over the charset per column
            for i, p in zip(order[lo:lo + step], probs):
                text, score = _ctc_decode_with_spaces(p, charset, space, self.config)
                out[i] = (_marks_to_spaces(text, self.config.gap_marks), score)
        return out


def _ctc_decode_with_spaces(probs: np.ndarray, charset: Sequence[str], space: int,
                            config: OCRConfig) -> tuple[str, float]:
    """Greedy CTC decode of one line, (T, C) -> (text, mean confidence), with word breaks restored."""
    best = probs.argmax(1)  # (T,)
    runs: list[list[int]] = []  # [class, first column, last column]
    for t, k in enumerate(best):
        if k != 0 and runs and runs[-1][0] == k and runs[-1][2] == t - 1:
            runs[-1][2] = t
        elif k != 0:
            runs.append([int(k), t, t])
    letters = [r for r in runs if r[0] != space]
    if not letters:
        return "", 0.0
    pieces = [charset[letters[0][0]]]
    for prev, cur in zip(letters, letters[1:]):
        between = probs[prev[2] + 1:cur[1], space]  # (gap columns,)
        p_space = float(between.max()) if between.size else 0.0  # 1.0-ish where the argmax itself was " "
        if p_space >= config.space_prob or (p_space >= config.weak_space_prob and between.size >= config.space_cols):
            pieces.append(" ")
        pieces.append(charset[cur[0]])
    score = float(np.mean([probs[r[1]:r[2] + 1, r[0]].max() for r in letters]))
    return "".join(pieces), score


def _marks_to_spaces(text: str, marks: str) -> str:
    """``MISS-ME`` / ``GOING -TO- DIE`` -> ``MISS ME`` / ``GOING TO DIE``: the recogniser often reads the
    black outline between two words as a thin mark. Marks between digits (``24/7``) are kept; a real
    hyphen between letters (``T-SHIRT``) becomes a space, which is rarer in captions than the artefact."""
    if not marks:
        return text
    chars = list(text)
    for i, c in enumerate(chars):
        if c in marks:
            before = chars[i - 1] if i > 0 else " "
            after = chars[i + 1] if i + 1 < len(chars) else " "
            if not (before.isdigit() and after.isdigit()) and (before.isalpha() or after.isalpha()):
                chars[i] = " "
    return " ".join("".join(chars).split())


def _merge_rows(rects: list[tuple[float, float, float, float]], merge_gap: float):
    """Group boxes into rows by vertical overlap, merge neighbours in a row, return in reading order."""
    rows: list[list[tuple[float, float, float, float]]] = []
    for r in sorted(rects, key=lambda r: (r[1] + r[3]) / 2):
        for row in rows:
            top, bottom = min(b[1] for b in row), max(b[3] for b in row)
            overlap = min(bottom, r[3]) - max(top, r[1])
            if overlap > 0.5 * min(bottom - top, r[3] - r[1]):
                row.append(r)
                break
        else:
            rows.append([r])
    merged = []
    for row in sorted(rows, key=lambda row: min(b[1] for b in row)):
        row.sort(key=lambda r: r[0])
        current = list(row[0])
        for r in row[1:]:
            height = max(current[3] - current[1], r[3] - r[1])
            if r[0] - current[2] <= merge_gap * height:
                current = [min(current[0], r[0]), min(current[1], r[1]), max(current[2], r[2]), max(current[3], r[3])]
            else:
                merged.append(tuple(current))
                current = list(r)
        merged.append(tuple(current))
    return merged


def _caps(text: str, share: float) -> str:
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isupper() for c in letters) >= share * len(letters):
        return text.upper()
    return text


def _join(lines: Sequence[OCRLine], block_gap: float) -> str:
    """Lines are in reading order; a vertical gap larger than ``block_gap`` line heights starts a block."""
    if not lines:
        return ""
    out = lines[0].text
    for prev, cur in zip(lines, lines[1:]):
        height = min(prev.box[3] - prev.box[1], cur.box[3] - cur.box[1])
        out += "\n" if cur.box[1] - prev.box[3] > block_gap * height else " "
        out += cur.text
    return out
