"""`python -m mmapp import memes`: Hateful Memes jsonl and Memotion csv files (small, real files with
real rendered images), label maps, the normalised file, merging, and the bootstrap's reader."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from mmapp.__main__ import main
from mmapp.config import load_config
from mmapp.data.meme_import import (
    MEMOTION_DEFAULT_MAP,
    detect_format,
    parse_label_map,
    read_memes,
    read_normalised,
    write_normalised,
)
from mmapp.data.memes import render_meme
from mmapp.pipeline import read_user_memes

LABELS = ("positive", "sarcastic", "dark humor")


def meme_image(path: Path, colour, top: str, bottom: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_meme(Image.new("RGB", (160, 120), colour), top, bottom, size=96).save(path)
    return path


@pytest.fixture
def hateful(tmp_path) -> Path:
    root = tmp_path / "hateful"
    rows = [
        {"id": 1, "img": "img/00001.png", "label": 0, "text": "look at this happy dog"},
        {"id": 2, "img": "img/00002.png", "label": 1, "text": "a mean joke"},
        {"id": 3, "img": "img/00003.png", "label": 0, "text": "sunny days are the best"},
        {"id": 4, "img": "img/00004.png", "text": "unlabelled test row"},  # the test_unseen files have no label
        {"id": 5, "img": "img/missing.png", "label": 0, "text": "image is gone"},
        {"id": 6, "img": "img/broken.png", "label": 1, "text": "not an image"},
    ]
    (root / "img").mkdir(parents=True)
    (root / "img" / "broken.png").write_bytes(b"not a png")
    for r, colour in zip(rows[:4], ("green", "black", "yellow", "blue")):
        meme_image(root / r["img"], colour, r["text"], "")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


@pytest.fixture
def memotion(tmp_path) -> Path:
    root = tmp_path / "memotion"
    header = ["", "image_name", "text_ocr", "text_corrected", "humour", "sarcasm", "offensive", "motivational",
              "overall_sentiment"]
    rows = [
        [0, "image_1.jpg", "OCR TEXT", "i love mondays", "funny", "general", "not_offensive", "not_motivational", "neutral"],
        [1, "image_2.png", "what a lovely day", "", "not_funny", "not_sarcastic", "not_offensive", "motivational", "very_positive"],
        [2, "image_3.jpg", "x", "my plants died again", "hilarious", "not_sarcastic", "slight", "not_motivational", "negative"],
        [3, "image_4.jpg", "x", "just a meme", "not_funny", "not_sarcastic", "not_offensive", "not_motivational", "neutral"],
    ]
    for (_, name, *_rest), colour in zip(rows, ("red", "pink", "grey", "white")):
        meme_image(root / "images" / name, colour, "top", "bottom")
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return root / "labels.csv"


def test_formats_are_detected(hateful, memotion):
    assert detect_format(hateful) == "hateful" and detect_format(memotion) == "memotion"


def test_hateful_memes_need_a_label_map_and_skip_unlabelled_and_missing_rows(hateful):
    with pytest.raises(ValueError, match="label-map"):
        read_memes(hateful, labels=LABELS)
    memes, report = read_memes(hateful, label_map="0=positive,1=dark humor", labels=LABELS)
    assert [(m.text, m.label) for m in memes] == [("look at this happy dog", "positive"),
                                                   ("a mean joke", "dark humor"),
                                                   ("sunny days are the best", "positive")]
    assert report.read == 6 and report.imported == 3
    assert report.skipped == {"no label": 1, "image not found": 1, "image unreadable": 1}
    assert all(m.image_path.is_absolute() and m.image_path.is_file() for m in memes)
    assert {m.split for m in memes} <= {"train", "val"}


def test_memotion_default_map_and_text_fallback(memotion):
    memes, report = read_memes(memotion, labels=LABELS)
    got = {m.source_id: (m.text, m.label) for m in memes}
    assert got == {"image_1.jpg": ("i love mondays", "sarcastic"),
                   "image_2.png": ("what a lovely day", "positive"),  # text_corrected empty -> text_ocr
                   "image_3.jpg": ("my plants died again", "dark humor")}
    assert report.skipped == {"no label-map rule matched": 1}


def test_memotion_custom_map_first_rule_wins(memotion):
    memes, _ = read_memes(memotion, labels=LABELS,
                          label_map="motivational:motivational=positive,humour:funny=dark humor,humour:not_funny=sarcastic")
    assert {m.source_id: m.label for m in memes} == {"image_1.jpg": "dark humor", "image_2.png": "positive",
                                                     "image_4.jpg": "sarcastic"}


def test_label_map_rejects_unknown_labels_and_bad_rules():
    with pytest.raises(ValueError, match="not a meme label"):
        parse_label_map("1=hateful", default_column="label", labels=LABELS)
    with pytest.raises(ValueError, match="value=label"):
        parse_label_map("oops", default_column="label", labels=LABELS)
    assert parse_label_map(MEMOTION_DEFAULT_MAP, default_column=None, labels=LABELS)[0] == ("sarcasm", "general",
                                                                                           "sarcastic")


def test_cli_import_writes_the_normalised_file_that_the_bootstrap_reads(hateful, memotion, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["--home", str(home), "import", "memes", str(hateful), "--label-map", "0=positive,1=dark humor",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["imported"] == 3 and out["labels"] == {"positive": 2, "dark humor": 1}
    assert main(["--home", str(home), "import", "memes", str(memotion), "--json"]) == 0  # merges
    capsys.readouterr()
    path = home / "datasets" / "user_memes" / "memes.jsonl"
    assert len(read_normalised(path)) == 6
    config = load_config(storage={"home": str(home)})
    assert len(read_user_memes(config, LABELS)) == 6
    assert len(read_user_memes(config, ("positive", "sarcastic"))) == 4  # labels a model lacks are skipped
    assert main(["--home", str(home), "import", "memes", str(memotion), "--replace", "--json"]) == 0
    assert len(read_normalised(path)) == 3
    assert main(["--home", str(home), "import", "memes", str(hateful), "--json"]) == 2  # no map: a user error


def test_reimport_replaces_a_changed_label(hateful, tmp_path):
    memes, _ = read_memes(hateful, label_map="0=positive,1=dark humor", labels=LABELS)
    write_normalised(memes, tmp_path)
    memes, _ = read_memes(hateful, label_map="0=positive,1=sarcastic", labels=LABELS)
    write_normalised(memes, tmp_path)
    assert sorted(m.label for m in read_normalised(tmp_path / "memes.jsonl")) == ["positive", "positive", "sarcastic"]
