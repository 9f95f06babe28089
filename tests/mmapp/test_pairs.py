from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmapp.data.pairs import MAX_CAPTION_CHARS, Pair, read_pairs, write_pairs_tsv


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    _image(tmp_path / "img" / "cat.png")
    _image(tmp_path / "img" / "dog.jpg", (30, 30, 200))
    return tmp_path


def _captions_by_image(pairs: list[Pair]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in pairs:
        out.setdefault(p.image_path.name, []).append(p.caption)
    return out


def test_tsv_skips_comments_and_blank_lines_and_normalises_whitespace(images: Path) -> None:
    tsv = images / "pairs.tsv"
    tsv.write_text("# my pairs\n\nimg/cat.png\ta  cat\ton a mat \nimg/dog.jpg\ta dog\nimg/cat.png\ta sleepy cat\n")
    pairs = read_pairs(tsv)
    assert [p.caption for p in pairs] == ["a cat on a mat", "a dog", "a sleepy cat"]
    assert all(p.image_path.is_absolute() and p.image_path.is_file() for p in pairs)
    assert [p.source for p in pairs] == ["pairs.tsv:3", "pairs.tsv:4", "pairs.tsv:5"]
    # several captions of one image share its group; other images do not
    assert pairs[0].group == pairs[2].group != pairs[1].group


def test_tsv_header_line_is_skipped(images: Path) -> None:
    tsv = images / "pairs.tsv"
    tsv.write_text("image_path\tcaption\nimg/cat.png\ta cat\n")
    assert [p.caption for p in read_pairs(tsv)] == ["a cat"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("img/cat.png a cat without a tab", "no tab"),
        ("img/cat.png\t   ", "empty caption"),
        ("img/missing.png\ta ghost", "image file not found: img/missing.png"),
        ("img/cat.png\t" + "word " * (MAX_CAPTION_CHARS // 4), f"max {MAX_CAPTION_CHARS}"),
    ],
)
def test_tsv_errors_name_file_and_line(images: Path, line: str, message: str) -> None:
    tsv = images / "bad.tsv"
    tsv.write_text(f"img/dog.jpg\ta dog\n# comment\n{line}\n")
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(tsv)
    assert f"{tsv}:3" in str(err.value)


def test_image_root_overrides_the_file_folder(images: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    tsv = lists / "pairs.tsv"
    tsv.write_text("cat.png\ta cat\n")
    assert read_pairs(tsv, image_root=images / "img")[0].image_path == (images / "img" / "cat.png").resolve()


def test_csv_with_header_and_quoted_captions(images: Path) -> None:
    csv_path = images / "pairs.csv"
    csv_path.write_text('file_name,text\nimg/cat.png,"a cat, sitting"\nimg/dog.jpg,a dog\n')
    pairs = read_pairs(csv_path)
    assert _captions_by_image(pairs) == {"cat.png": ["a cat, sitting"], "dog.jpg": ["a dog"]}
    assert pairs[1].source == "pairs.csv:3"


def test_csv_errors(images: Path) -> None:
    bad_header = images / "header.csv"
    bad_header.write_text("path,label\nimg/cat.png,cat\n")
    with pytest.raises(ValueError, match=r"header\.csv:1: CSV header needs"):
        read_pairs(bad_header)
    bad_row = images / "row.csv"
    bad_row.write_text("image,caption\nimg/cat.png,a cat\nimg/cat.png,\n")
    with pytest.raises(ValueError, match=r"row\.csv:3: empty caption"):
        read_pairs(bad_row)


def test_jsonl_caption_and_captions(images: Path) -> None:
    jsonl = images / "pairs.jsonl"
    jsonl.write_text(
        json.dumps({"image": "img/cat.png", "captions": ["a cat", "a tabby cat"]}) + "\n\n"
        + json.dumps({"image": "img/dog.jpg", "caption": "a dog"}) + "\n"
    )
    pairs = read_pairs(jsonl)
    assert _captions_by_image(pairs) == {"cat.png": ["a cat", "a tabby cat"], "dog.jpg": ["a dog"]}
    assert pairs[0].group == pairs[1].group
    assert [p.source for p in pairs] == ["pairs.jsonl:1", "pairs.jsonl:1", "pairs.jsonl:3"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"image": "img/cat.png"}', "expected 'caption' or 'captions'"),
        ('{"image": "img/cat.png", "captions": []}', "non-empty list"),
        ('{"image": "img/cat.png", "caption": 3}', "caption must be text"),
        ('{"image": "img/nope.png", "caption": "x"}', "image file not found"),
    ],
)
def test_jsonl_errors_name_file_and_line(images: Path, line: str, message: str) -> None:
    jsonl = images / "bad.jsonl"
    jsonl.write_text('{"image": "img/dog.jpg", "caption": "a dog"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(jsonl)
    assert f"{jsonl}:2" in str(err.value)


def _coco(path: Path, file_names: dict[int, str], annotations: list[tuple[int, str]]) -> Path:
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f} for i, f in file_names.items()],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(annotations)],
    }))
    return path


def test_coco_several_captions_per_image_from_images_folder(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "000001.jpg")
    _image(tmp_path / "images" / "000002.jpg", (0, 255, 0))
    coco = _coco(tmp_path / "captions.json", {1: "000001.jpg", 2: "000002.jpg"},
                 [(1, "a red square"), (2, "a green square"), (1, "red  block ")])
    pairs = read_pairs(coco)
    assert _captions_by_image(pairs) == {"000001.jpg": ["a red square", "red block"], "000002.jpg": ["a green square"]}
    assert pairs[0].group == pairs[2].group != pairs[1].group
    assert pairs[2].source == "captions.json:annotations[2]"


def test_coco_image_root_and_errors(tmp_path: Path) -> None:
    _image(tmp_path / "elsewhere" / "a.png")
    coco = _coco(tmp_path / "c.json", {7: "a.png"}, [(7, "a square")])
    assert read_pairs(coco, fmt="coco", image_root=tmp_path / "elsewhere")[0].caption == "a square"
    with pytest.raises(ValueError, match=r"c\.json:annotations\[0\]: image file not found: a\.png"):
        read_pairs(coco)
    unknown = _coco(tmp_path / "u.json", {7: "a.png"}, [(8, "who")])
    with pytest.raises(ValueError, match=r"u\.json:annotations\[0\]: image_id 8 is not among the images"):
        read_pairs(unknown, image_root=tmp_path / "elsewhere")


def test_folder_with_sidecar_captions(tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    _image(folder / "cat.png")
    (folder / "cat.txt").write_text("a cat\n\n  a  cat on a mat\n")
    _image(folder / "sub" / "dog.jpg")
    (folder / "sub" / "dog.txt").write_text("a dog\n")
    _image(folder / "uncaptioned.png")  # no sidecar: not a pair
    pairs = read_pairs(folder)
    assert _captions_by_image(pairs) == {"cat.png": ["a cat", "a cat on a mat"], "dog.jpg": ["a dog"]}
    assert [p.source for p in pairs] == ["cat.txt:1", "cat.txt:3", "dog.txt:1"]
    (folder / "cat.txt").write_text("x" * (MAX_CAPTION_CHARS + 1) + "\n")
    with pytest.raises(ValueError, match=rf"{folder / 'cat.txt'}:1: caption of"):
        read_pairs(folder, fmt="folder")


def test_unknown_format_and_empty_input(tmp_path: Path) -> None:
    odd = tmp_path / "pairs.parquet"
    odd.write_text("")
    with pytest.raises(ValueError, match="pass fmt="):
        read_pairs(odd)
    with pytest.raises(ValueError, match="unknown pairs format 'xml'"):
        read_pairs(odd, fmt="xml")
    empty = tmp_path / "empty.tsv"
    write_pairs_tsv([], empty)
    assert read_pairs(empty) == []
    (tmp_path / "no_captions").mkdir()
    _image(tmp_path / "no_captions" / "a.png")
    with pytest.raises(ValueError, match="no image with a sidecar .txt"):
        read_pairs(tmp_path / "no_captions")


def test_write_pairs_tsv_round_trips_with_relative_paths(images: Path, tmp_path: Path) -> None:
    jsonl = images / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "img/cat.png", "captions": ["a cat", "a\tcat  again"]}) + "\n")
    pairs = read_pairs(jsonl)
    out = tmp_path / "export" / "pairs.tsv"
    write_pairs_tsv(pairs, out)
    assert out.read_text().splitlines() == ["../img/cat.png\ta cat", "../img/cat.png\ta cat again"]
    again = read_pairs(out)
    assert [(p.image_path, p.caption, p.group) for p in again] == [(p.image_path, p.caption, p.group) for p in pairs]
    assert [p.name for p in out.parent.iterdir()] == ["pairs.tsv"]  # no temporary file left behind
