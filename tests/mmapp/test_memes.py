"""Synthetic memes: rendering, phrase polarity (VADER), the 2x2 label design, splits and determinism."""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vader import polarity_scores

from mmapp.data import memes
from mmapp.data.memes import (
    GRIM_PHRASES,
    LABEL_OF,
    LABELS,
    SETUPS,
    SPLITS,
    UPBEAT_PHRASES,
    build_meme_specs,
    find_font,
    image_valence,
    meme_text,
    phrase_pool,
    render_meme,
    render_meme_set,
)


@dataclass(frozen=True)
class Item:
    item_id: str
    png_path: Path
    category: str
    keywords: tuple[str, ...]
    title: str
    split: str


def clip_art(tmp_path: Path, name: str, colour: tuple[int, int, int, int]) -> Path:
    path = tmp_path / f"{name}.png"
    image = Image.new("RGBA", (60, 40), (0, 0, 0, 0))  # transparent, like the corpus PNGs
    image.paste(colour, (10, 5, 50, 35))
    image.save(path)
    return path


@pytest.fixture
def items(tmp_path) -> list[Item]:
    out = []
    for split, n in (("train", 9), ("val", 3), ("test", 3)):
        for i in range(n):
            out.append(Item(f"food/fruit/apple_{split}_{i}", clip_art(tmp_path, f"apple_{split}_{i}", (200, 30, 30, 255)),
                            "food/fruit", ("fruit", "apple"), "red apple", split))
            out.append(Item(f"tools/weapons/bomb_{split}_{i}", clip_art(tmp_path, f"bomb_{split}_{i}", (20, 20, 20, 255)),
                            "tools/weapons", ("weapon", "bomb"), "bomb", split))
            out.append(Item(f"office/stapler_{split}_{i}", clip_art(tmp_path, f"stapler_{split}_{i}", (90, 90, 200, 255)),
                            "office", ("stapler",), "stapler", split))  # neither valence: unused
    return out


# ---- rendering ------------------------------------------------------------------------------------

def white_text_pixels(meme: Image.Image, rows: slice) -> int:
    band = np.asarray(meme.convert("RGB"))[rows].astype(int)
    return int(((band > 240).all(axis=2)).sum())


def test_render_meme_is_square_with_outlined_captions_on_a_dark_picture():
    meme = render_meme(Image.new("RGB", (300, 200), (30, 60, 30)), "when the code works", "on the first try",
                       size=256)
    assert meme.size == (256, 256) and meme.mode == "RGB"
    # letterboxed: the white bars above and below the 300x200 picture are outside rows 43..213
    assert white_text_pixels(meme, slice(70, 120)) == 0  # picture middle carries no text
    bands = np.asarray(meme)
    top_band, bottom_band = bands[45:85], bands[175:212]  # captions sit over the picture here
    for band in (top_band, bottom_band):
        assert ((band > 240).all(axis=2)).sum() > 50  # white fill
        assert ((band < 20).all(axis=2)).sum() > 50  # black outline


def test_render_meme_composites_transparency_on_white_and_draws_nothing_without_text():
    transparent = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    meme = render_meme(transparent, size=128)
    assert np.asarray(meme).min() == 255


def test_render_meme_shrinks_long_captions_to_fit():
    long_caption = "me explaining to my mom why the " * 4 + "supercalifragilisticexpialidocious" * 2
    meme = render_meme(Image.new("RGB", (64, 64), "black"), long_caption, long_caption, size=200)
    assert meme.size == (200, 200)


def test_find_font_prefers_an_explicit_path_and_names_a_missing_one(tmp_path):
    assert find_font().name.startswith("DejaVuSans-Bold")
    with pytest.raises(FileNotFoundError, match="nope.ttf"):
        find_font(tmp_path / "nope.ttf")


def test_render_meme_set_writes_atomically_and_skips_existing(items, tmp_path):
    specs = build_meme_specs(items)[:4]
    out = tmp_path / "memes"
    paths = render_meme_set(specs, out, size=96)
    assert [p.parent for p in paths] == [out] * 4 and all(p.is_file() for p in paths)
    assert not list(out.glob(".tmp-*"))
    with Image.open(paths[0]) as im:
        assert im.size == (96, 96)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert render_meme_set(specs, out, size=96) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert render_meme_set(specs[:1], out, size=64)[0] != paths[0]  # a new size is a new file


# ---- text valence ---------------------------------------------------------------------------------

def test_phrase_pools_are_large_unique_and_vader_agrees_with_their_polarity():
    assert len(set(UPBEAT_PHRASES)) == len(UPBEAT_PHRASES) >= 40
    assert len(set(GRIM_PHRASES)) == len(GRIM_PHRASES) >= 40
    assert not set(UPBEAT_PHRASES) & set(GRIM_PHRASES)
    wrong = [p for p in UPBEAT_PHRASES if polarity_scores(p.upper())["compound"] < 0.05]
    wrong += [p for p in GRIM_PHRASES if polarity_scores(p.upper())["compound"] > -0.05]
    assert wrong == []


def test_setups_are_neutral_so_the_phrase_alone_sets_the_text_valence():
    assert [s for s in SETUPS if abs(polarity_scores(s)["compound"]) >= 0.05] == []
    for setup, phrase in itertools.product(SETUPS[:5], UPBEAT_PHRASES[:5]):
        assert polarity_scores(meme_text(setup, phrase))["compound"] >= 0.05
    for setup, phrase in itertools.product(SETUPS[:5], GRIM_PHRASES[:5]):
        assert polarity_scores(meme_text(setup, phrase))["compound"] <= -0.05


@pytest.mark.parametrize("valence", ["upbeat", "grim"])
def test_phrase_splits_are_disjoint_and_cover_the_pool(valence):
    pools = {s: set(phrase_pool(valence, s)) for s in SPLITS}
    assert all(pools.values())
    for a, b in itertools.combinations(SPLITS, 2):
        assert not pools[a] & pools[b]
    assert set().union(*pools.values()) == set(UPBEAT_PHRASES if valence == "upbeat" else GRIM_PHRASES)


# ---- image valence and labels ---------------------------------------------------------------------

@pytest.mark.parametrize("category, keywords, title, expected", [
    ("tools/weapons", ("weapon",), "katana", "grim"),
    ("signs_and_symbols/hazard", (), "poison", "grim"),
    ("people", ("skull", "death"), "skull", "grim"),
    ("animals", ("frog", "dead"), "2 dead frogs", "grim"),  # a grim keyword beats a cheerful folder
    ("food/desserts", ("cake",), "birthday cake", "cheerful"),
    ("animals/mammals/housecats", ("cat",), "kitten", "cheerful"),
    ("recreation/party", ("balloon",), "balloons", "cheerful"),
    ("office", ("stapler",), "stapler", None),
    ("recreation/sports", ("baseball", "bat"), "baseball bat", None),
])
def test_image_valence(category, keywords, title, expected):
    assert image_valence(category, keywords, title) == expected


def test_neither_modality_alone_determines_the_label():
    assert set(LABEL_OF) == {(i, t) for i in ("cheerful", "grim") for t in ("upbeat", "grim")}
    assert {LABELS[v] for v in LABEL_OF.values()} == set(LABELS)
    for image_v in ("cheerful", "grim"):
        assert len({LABEL_OF[(image_v, t)] for t in ("upbeat", "grim")}) == 2
    for text_v in ("upbeat", "grim"):
        assert len({LABEL_OF[(i, text_v)] for i in ("cheerful", "grim")}) == 2


def test_specs_are_balanced_and_each_single_modality_leaves_the_label_open(items):
    specs = build_meme_specs(items, per_item=3)
    assert Counter(s.label for s in specs) == {label: len(specs) // 3 for label in LABELS}
    assert Counter(s.image_valence for s in specs)["grim"] == len(specs) // 2
    # best accuracy of a predictor that sees only one modality: majority label per valence
    for field in ("image_valence", "text_valence"):
        by_value = Counter((getattr(s, field), s.label) for s in specs)
        best = sum(max(n for (v, _), n in by_value.items() if v == value) for value in {v for v, _ in by_value})
        assert best / len(specs) == pytest.approx(2 / 3, abs=0.05)
    for s in specs:
        assert s.label == LABELS[LABEL_OF[(s.image_valence, s.text_valence)]]
        assert s.text == meme_text(s.top, s.bottom) and s.text == s.text.upper()


def test_splits_follow_the_items_and_test_text_is_never_seen_in_training(items):
    specs = build_meme_specs(items)
    split_of_item = {i.item_id: i.split for i in items}
    assert all(split_of_item[s.source_item_id] == s.split for s in specs)
    assert {s.split for s in specs} == set(SPLITS)
    assert "office/stapler_train_0" not in {s.source_item_id for s in specs}

    def phrases(split):  # the caption line that carries the valence
        return {line for s in specs if s.split == split for line in s.text.split("\n")} - {x.upper() for x in SETUPS}

    assert not phrases("test") & phrases("train")
    assert not phrases("val") & phrases("train")
    assert len({s.item_id for s in specs}) == len(specs)


def test_build_meme_specs_is_deterministic_and_seeded(items):
    assert build_meme_specs(items, seed=3) == build_meme_specs(list(reversed(items)), seed=3)
    assert build_meme_specs(items, seed=3) != build_meme_specs(items, seed=4)


def test_build_meme_specs_uses_the_given_label_names_and_rejects_bad_arguments(items):
    specs = build_meme_specs(items, labels=("pos", "sarc", "dark"))
    assert {s.label for s in specs} == {"pos", "sarc", "dark"}
    with pytest.raises(ValueError, match="three distinct"):
        build_meme_specs(items, labels=("a", "b"))
    with pytest.raises(ValueError, match="per_item"):
        build_meme_specs(items, per_item=0)
    with pytest.raises(ValueError, match="validation"):
        build_meme_specs([Item("x", Path("x.png"), "food/fruit", (), "apple", "validation")])


def test_a_split_missing_one_image_valence_yields_no_memes(items):
    only_cheerful = [i for i in items if i.split != "test" or "apple" in i.item_id]
    assert "test" not in {s.split for s in build_meme_specs(only_cheerful)}


def test_module_import_does_no_io():
    assert memes._font.cache_info().currsize >= 0  # fonts are opened lazily through a cache


# ---- v2: compositional captions, photographic backgrounds -------------------------------------------

from mmapp.data import meme_text as captions  # noqa: E402
from mmapp.data.memes import PHOTO_SOURCES, build_meme_specs_v2, label_v2, photo_backgrounds  # noqa: E402


@pytest.fixture
def photos(tmp_path) -> list[tuple[str, Path, str]]:
    out = []
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for i in range(n):
            path = tmp_path / f"photo_{split}_{i}.png"
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
            out.append((f"photo/{split}{i}", path, split))
    return out


def test_caption_generator_forms_and_topics_are_split_disjointly_and_large():
    for register in captions.REGISTERS:
        parts = [set(captions.forms(register, s)) for s in SPLITS]
        assert sum(map(len, parts)) == len(captions.FORMS[register]) >= 25
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for slot, pool in captions.TOPICS.items():
        parts = [set(captions.topics(slot, s)) for s in SPLITS]
        assert sum(map(len, parts)) == len(pool) and all(parts)
        assert not (parts[0] & parts[2])
    rng = __import__("random").Random(0)
    many = {captions.generate_caption(r, "train", rng) for r in captions.REGISTERS for _ in range(300)}
    assert len(many) > 600  # compositional: few repeats
    assert all("{" not in t + b for t, b in many) and all((t + b).isupper() or not (t + b).strip() for t, b in many
                                                          if any(c.isalpha() for c in t + b))


def test_v2_label_rules():
    assert label_v2("sincere", "photo") == 0 and label_v2("sincere", "cheerful") == 0
    assert label_v2("sincere", "grim") == 1  # the picture contradicts the caption
    assert {label_v2("ironic", v) for v in ("photo", "cheerful", "grim")} == {1}
    assert {label_v2("grim_joke", v) for v in ("photo", "cheerful", "grim")} == {2}
    with pytest.raises(ValueError):
        label_v2("neutral", "photo")


def test_v2_specs_are_balanced_use_photos_and_keep_test_text_unseen(items, photos):
    specs = build_meme_specs_v2(items, photos=photos, per_split={"train": 300, "val": 60, "test": 60})
    for split in SPLITS:
        part = [s for s in specs if s.split == split]
        assert Counter(s.label for s in part) == {label: len(part) // 3 for label in LABELS}
        kinds = Counter(s.image_valence for s in part)
        assert kinds["photo"] > len(part) // 4 and kinds["cheerful"] and kinds["grim"]
    photo_split = {str(p): s for _, p, s in photos}
    assert all(photo_split[str(s.image_path)] == s.split for s in specs if s.image_valence == "photo")
    assert all(s.crop is not None for s in specs if s.image_valence == "photo")
    for s in specs:
        assert s.label == LABELS[label_v2(s.register, s.image_valence)]
        assert s.text == meme_text(s.top, s.bottom)
    train = {s.text for s in specs if s.split == "train"}
    assert not train & {s.text for s in specs if s.split == "test"}
    assert build_meme_specs_v2(items, photos=photos, seed=1) == build_meme_specs_v2(items, photos=photos, seed=1)


def test_v2_renders_crops_and_mirrors(items, photos, tmp_path):
    specs = [s for s in build_meme_specs_v2(items, photos=photos, per_split={"train": 30}) if s.crop][:3]
    paths = render_meme_set(specs, tmp_path / "out", size=96)
    assert len(set(paths)) == 3 and all(Image.open(p).size == (96, 96) for p in paths)


def test_photo_backgrounds_never_use_the_guard_or_evaluation_photos():
    assets = Path(memes.__file__).resolve().parents[1] / "assets" / "photos"
    names = {p.stem for p in assets.glob("*.jpg")}
    assert not names & {Path(rel).stem for _, rel, _ in PHOTO_SOURCES}
    assert {"china", "flower", "motorcycle_left", "camera", "coffee", "astronaut"}.isdisjoint(
        Path(rel).stem for _, rel, _ in PHOTO_SOURCES)
    for _, path, split in photo_backgrounds():
        assert path.is_file() and split in SPLITS
