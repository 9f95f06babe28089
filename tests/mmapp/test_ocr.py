"""OCR: pure post-processing on synthetic CTC outputs (fast), then the packaged RapidOCR models on a rendered meme."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mmapp.evaluation import edit_distance
from mmapp.encoders.ocr import (
    OCRConfig,
    OCRLine,
    RapidOCRReader,
    _ctc_decode_with_spaces,
    _join,
    _marks_to_spaces,
    _merge_rows,
)

CHARSET = ["blank", "A", "B", "C", "-", " "]  # RapidOCR layout: blank first, space last
SPACE = len(CHARSET) - 1


def ctc_probs(columns: list[tuple[int, float]]) -> np.ndarray:
    """(T, C) probabilities: each column puts ``p_space`` on the space class, the rest on its argmax."""
    probs = np.zeros((len(columns), len(CHARSET)), dtype=np.float32)
    for t, (k, p_space) in enumerate(columns):
        probs[t, SPACE] = p_space
        probs[t, k] += 1.0 - p_space
    return probs


def test_ctc_decode_restores_a_space_where_the_space_class_rises_between_letters():
    # A A _ B _ _ C : a faint space signal between B and C only
    probs = ctc_probs([(1, 0.0), (1, 0.0), (0, 0.001), (2, 0.0), (0, 0.004), (0, 0.2), (3, 0.0)])
    text, score = _ctc_decode_with_spaces(probs, CHARSET, SPACE, OCRConfig())
    assert text == "AB C"
    assert score == pytest.approx(1.0)


def test_ctc_decode_keeps_argmax_spaces_and_repeated_letters_split_by_blank():
    probs = ctc_probs([(1, 0.0), (0, 0.0), (1, 0.0), (SPACE, 1.0), (2, 0.0)])
    assert _ctc_decode_with_spaces(probs, CHARSET, SPACE, OCRConfig())[0] == "AA B"


def test_ctc_decode_takes_a_weak_space_signal_only_across_a_wide_gap():
    narrow = ctc_probs([(1, 0.0), (0, 0.005), (2, 0.0)])
    wide = ctc_probs([(1, 0.0)] + [(0, 0.005)] * 5 + [(2, 0.0)])
    assert _ctc_decode_with_spaces(narrow, CHARSET, SPACE, OCRConfig())[0] == "AB"
    assert _ctc_decode_with_spaces(wide, CHARSET, SPACE, OCRConfig())[0] == "A B"


def test_ctc_decode_of_blank_line_is_empty():
    assert _ctc_decode_with_spaces(ctc_probs([(0, 0.0)] * 5), CHARSET, SPACE, OCRConfig()) == ("", 0.0)


@pytest.mark.parametrize("raw, expected", [
    ("MISS-ME", "MISS ME"),
    ("GOING -TO- DIE", "GOING TO DIE"),
    ("CHAT/SAYS", "CHAT SAYS"),
    ("24/7 AND 9-5", "24/7 AND 9-5"),
    ("DON'T", "DON'T"),
])
def test_outline_marks_between_words_become_spaces(raw, expected):
    assert _marks_to_spaces(raw, "-/\u00b7") == expected


def test_word_boxes_of_one_row_merge_and_rows_come_in_reading_order():
    boxes = [(300, 400, 380, 440), (10, 10, 100, 50), (110, 12, 200, 52), (20, 400, 280, 441)]
    assert _merge_rows(boxes, merge_gap=1.5) == [(10, 10, 200, 52), (20, 400, 380, 441)]


def test_far_apart_boxes_on_one_row_stay_separate():
    assert len(_merge_rows([(0, 0, 40, 20), (400, 0, 440, 20)], merge_gap=1.5)) == 2


def test_join_separates_text_blocks_by_newline_and_wrapped_lines_by_space():
    lines = [OCRLine("WHEN THE", (0, 10, 100, 50), 1.0), OCRLine("CODE WORKS", (0, 55, 100, 95), 1.0),
             OCRLine("ON THE FIRST TRY", (0, 400, 100, 440), 1.0)]
    assert _join(lines, block_gap=0.8) == "WHEN THE CODE WORKS\nON THE FIRST TRY"


def test_identity_tracks_settings_that_change_the_text():
    assert RapidOCRReader().identity == RapidOCRReader(OCRConfig()).identity
    assert RapidOCRReader(OCRConfig(det_side=384)).identity != RapidOCRReader().identity
    assert RapidOCRReader(OCRConfig(threads=1)).identity == RapidOCRReader().identity
    assert RapidOCRReader().identity.startswith("rapidocr-")


def test_constructing_a_reader_loads_nothing_and_rejects_a_tiny_detector():
    assert RapidOCRReader()._ocr is None
    with pytest.raises(ValueError, match="det_side"):
        RapidOCRReader(OCRConfig(det_side=8))


# ---- packaged weights ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader() -> RapidOCRReader:
    return RapidOCRReader(OCRConfig())


@pytest.mark.weights
def test_reads_a_rendered_meme_with_word_spaces(reader):
    import skimage.data

    from mmapp.data.memes import render_meme

    meme = render_meme(Image.fromarray(skimage.data.chelsea()), "When the code works", "on the first try",
                       size=512)
    result = reader.read(meme)
    expected = "WHEN THE CODE WORKS\nON THE FIRST TRY"
    assert edit_distance(result.text.upper(), expected) <= 1, result.text
    assert len(result.text.split()) >= 7  # spaces were put back
    assert result.lines and all(0 <= l.box[0] < l.box[2] <= 512 and 0 <= l.box[1] < l.box[3] <= 512
                                for l in result.lines)
    assert [l.box[1] for l in result.lines] == sorted(l.box[1] for l in result.lines)
    assert 0 < result.seconds < 10


@pytest.mark.weights
def test_a_read_that_may_stop_early_gives_the_start_of_the_whole_text(reader):
    from skimage import data

    page = Image.fromarray(data.page())  # six printed lines
    whole = reader.read(page)
    seen = []

    def three_words(text: str) -> bool:
        seen.append(text)
        return len(text.split()) > 3

    start = reader.read(page, until=three_words)
    assert len(whole.lines) >= 5 and 1 <= len(start.lines) < len(whole.lines)  # stopped early
    assert whole.text.startswith(start.text) and len(start.text.split()) > 3
    assert seen[-1] == start.text and not any(three_words(t) for t in seen[:-1])  # stopped at the first "enough"
    # never enough: the whole page, read line by line (a line recognised alone can differ from the batched
    # read in a character of padding noise, e.g. "_like" / "like")
    assert edit_distance(reader.read(page, until=lambda text: False).text, whole.text) <= 3


@pytest.mark.weights
@pytest.mark.parametrize("image", [Image.new("RGB", (512, 512), "white"), Image.new("RGBA", (300, 200), (0, 0, 0, 0)),
                                   Image.new("L", (64, 64), 0)])
def test_image_without_text_reads_empty(reader, image):
    result = reader.read(image)
    assert result.text == "" and result.lines == []


@pytest.mark.weights
def test_the_engines_onnx_sessions_do_not_busy_wait(reader):
    """RapidOCR builds its sessions with onnxruntime's spinning on; ours are rebuilt without it, on the
    configured thread count (the read tests above check the text is unchanged)."""
    engine = reader.engine
    sessions = [engine.text_det.infer.session, engine.text_rec.session.session, engine.text_cls.infer.session]
    for session in sessions:
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == min(os.cpu_count() or 1, 4)
