from __future__ import annotations

import os
import shutil
import stat
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmapp.data.openclipart import (
    DEFAULT_CLUTTER,
    build_caption,
    clean_title,
    dhash,
    ensure_openclipart,
    load_openclipart,
    near_duplicate_pairs,
    normalise_text,
    read_svg_metadata,
    split_of,
)

# --------------------------------------------------------------------------------------------
# A tiny corpus laid out like /usr/share/openclipart/{png,svg}/<category>/<name>.{png,svg}


def _svg(title: str, *, description: str = "", keywords: tuple[str, ...] = (), creator: str = "Jane Doe",
         broken: bool = False) -> str:
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    if broken:  # a bare ampersand and an unclosed tag inside the metadata itself
        description = "Warning & danger <br> ahead"
    # The creator's cc:Agent (with its own dc:title) comes before the work's title on purpose.
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{lis}<rdf:li></rdf:li></rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <g><path d="M0 0"/></g>
</svg>
"""


def _pattern(seed: int) -> np.ndarray:
    """A distinct 'drawing': random 8x8 gray blocks, 64x64 pixels."""
    blocks = np.random.default_rng(seed).integers(0, 10, (8, 8)) * 20  # (8, 8), values 0..180
    return np.kron(blocks, np.ones((8, 8))).astype(np.uint8)  # (64, 64)


def _save_png(path: Path, gray: np.ndarray, *, margin: int = 0, blank: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if blank:
        Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
        return
    img = Image.fromarray(gray, "L").convert("RGBA")
    if margin:  # same drawing on a bigger transparent canvas: other bytes, same picture
        canvas = Image.new("RGBA", (64 + 2 * margin, 64 + 2 * margin), (0, 0, 0, 0))
        canvas.paste(img, (margin, margin))
        img = canvas
    img.save(path)


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.seed = 0

    def add(self, rel: str, title: str, *, pattern: np.ndarray | None = None, margin: int = 0,
            blank: bool = False, **svg_kw) -> np.ndarray:
        self.seed += 1
        gray = _pattern(self.seed) if pattern is None else pattern
        _save_png(self.root / "png" / f"{rel}.png", gray, margin=margin, blank=blank)
        svg = self.root / "svg" / f"{rel}.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(_svg(title, **svg_kw), encoding="utf-8")
        return gray

    def link(self, rel: str, target_rel: str) -> None:
        """Symlink rel -> target_rel in both trees, relative like the Debian package's links."""
        for kind in ("png", "svg"):
            link = self.root / kind / f"{rel}.{kind}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(self.root / kind / f"{target_rel}.{kind}", link.parent))

    def copy(self, rel: str, source_rel: str, title: str, **svg_kw) -> None:
        png = self.root / "png" / f"{rel}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes((self.root / "png" / f"{source_rel}.png").read_bytes())
        svg = self.root / "svg" / f"{rel}.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(_svg(title, **svg_kw), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    c = Corpus(tmp_path_factory.mktemp("openclipart"))
    c.add("animals/mammals/dall_sheep_ram_jane_doe_01", "Dall Sheep Ram",
          description="A Dall sheep ram standing on a rock. Drawn with Inkscape.",
          keywords=("mammal", "animal", "ram", "jane doe"))
    c.add("animals/cat_sleeping", "Sleeping Cat", keywords=("cat", "sleep"))
    c.link("animals/mammals/housecats/cat_sleeping", "animals/cat_sleeping")  # deeper copy
    # clutter, and a real drawing that is also filed among the icons
    c.add("shapes/stars/star_01", "gramastar", keywords=("stars", "geometry"))
    c.add("computer/icons/lemon-theme/folder_open", "Lemon SVG theme")
    c.add("computer/icons/coffee_cup", "Coffee Cup", keywords=("coffee", "hot"))
    c.link("food/beverages/coffee_cup", "computer/icons/coffee_cup")
    # the same PNG bytes twice (a copy, not a link): the deeper folder wins
    c.add("food/fruit/pear_01", "Green Pear")
    c.copy("plants/pear_on_branch", "food/fruit/pear_01", "Pear on a branch")
    # the same drawing on a bigger canvas
    apple = c.add("food/fruit/red_apple", "Red Apple", keywords=("apple", "red"))
    c.add("food/fruit/shiny_apple", "Shiny Apple", pattern=apple, margin=6)
    # titles that say nothing: a batch-tool title over a file code, an author's name
    c.add("people/fc23", "Clipart by Nicu Buculei - fc23", creator="Nicu Buculei")
    c.add("people/jane_doe_01", "Jane Doe")
    # a stale batch-tool title over a good file name
    c.add("animals/bugs/ladybird", "Clipart by Nicu Buculei - contour_chipmunk", creator="Nicu Buculei")
    # a collection title shared by four drawings: each is named by its file instead
    for name in ("stapler", "printer_big", "paper_clip_01", "desk_lamp_jane_d_01"):
        c.add(f"office/{name}", "Etiquette Icons")
    # the same caption twice in one category; the same title in another category
    c.add("transportation/vehicles/red_car_01", "Red Car")
    c.add("transportation/vehicles/red_car_02", "Red Car")
    c.add("recreation/toys/red_car", "Red Car")
    c.add("signs_and_symbols/broken_sign", "Broken Sign", keywords=("warning",), broken=True)
    c.add("recreation/invisible_kite", "Invisible Kite", blank=True)
    c.add("unsorted/scissors", "Scissors")
    return c.root


@pytest.fixture(scope="module")
def loaded(corpus: Path):
    return load_openclipart(corpus, progress=False)


def test_filter_reasons_and_counts(loaded) -> None:
    items, report = loaded
    assert report.paths == 24 and report.drawings == 22
    assert dict(report.dropped) == {
        "clutter": 2,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "uninformative_title": 2,
        "duplicate_caption": 1,
        "blank_image": 1,
        "short_caption": 1,
    }
    assert report.kept == len(items) == 13
    assert report.kept + sum(report.dropped.values()) == report.drawings
    assert any("plants/pear_on_branch = food/fruit/pear_01" in e for e in report.examples["exact_duplicate"])
    assert any("transportation/vehicles/red_car_02" in e for e in report.examples["duplicate_caption"])
    assert {e.split(":")[0] for e in report.examples["uninformative_title"]} == {"people/fc23", "people/jane_doe_01"}
    assert "dropped clutter: 2" in report.summary()


def test_symlinks_merge_into_the_deepest_non_clutter_folder(loaded) -> None:
    by_id = {it.item_id: it for it in loaded[0]}
    cat = by_id["animals/cat_sleeping"]
    assert cat.category == "animals/mammals/housecats"
    assert cat.png_path.is_file() and not cat.png_path.is_symlink() and cat.svg_path.is_file()
    assert by_id["computer/icons/coffee_cup"].category == "food/beverages"
    assert not any(c.startswith(DEFAULT_CLUTTER) for c in (it.category for it in loaded[0]))


def test_near_duplicates_only_go_when_asked(corpus: Path, loaded) -> None:
    apples = [it.item_id for it in loaded[0] if "apple" in it.item_id]
    assert len(apples) == 1
    items, report = load_openclipart(corpus, near_duplicate_bits=-1, progress=False)
    assert "near_duplicate" not in report.dropped
    assert sum("apple" in it.item_id for it in items) == 2


def test_captions(loaded) -> None:
    by_id = {it.item_id: it for it in loaded[0]}
    sheep = by_id["animals/mammals/dall_sheep_ram_jane_doe_01"]
    assert sheep.caption.startswith("dall sheep ram, a mammal. ")
    assert "standing on a rock" in sheep.caption and "inkscape" not in sheep.caption
    assert sheep.caption.endswith("tags: animal")  # mammal and ram are said already; jane doe is the author
    assert sheep.keywords == ("mammal", "animal", "ram", "jane doe")
    assert by_id["animals/bugs/ladybird"].title == "ladybird"
    assert {by_id[f"office/{n}"].title for n in ("stapler", "printer_big", "paper_clip_01", "desk_lamp_jane_d_01")} \
        == {"stapler", "printer big", "paper clip", "desk lamp"}
    broken = by_id["signs_and_symbols/broken_sign"]
    assert broken.title == "broken sign" and "warning" in broken.caption
    assert all(len(it.caption.split()) <= 30 and it.caption == it.caption.lower() for it in loaded[0])


def test_malformed_svg_falls_back_to_regex_and_is_recorded(corpus: Path, loaded) -> None:
    meta = read_svg_metadata(corpus / "svg" / "signs_and_symbols" / "broken_sign.svg")
    assert meta.error and meta.title == "Broken Sign" and meta.keywords == ("warning",)
    assert meta.description == "Warning & danger ahead"
    assert "Jane Doe" in meta.agents
    assert [f.split(":")[0] for f in loaded[1].parse_fallbacks] == ["signs_and_symbols/broken_sign"]
    good = read_svg_metadata(corpus / "svg" / "animals" / "cat_sleeping.svg")
    assert (good.title, good.error, good.agents) == ("Sleeping Cat", "", ("Jane Doe", "Open Clip Art Library"))


@pytest.mark.parametrize(
    "raw, stem, agents, collection, expected",
    [
        ("Clipart by Nicu Buculei - contour_chipmunk", "contour_cheetah", ("Nicu Buculei",), False, "contour cheetah"),
        ("Antilope", "antilope_architetto_fran_01", ("Architetto Francesco Rollandin",), False, "antilope"),
        ("Tigre02", "tigre02_architetto_franc_01", ("Architetto Francesco Rollandin",), False, "tigre"),
        ("Various Cliparts", "paper_RPSWB", ("Architetto Francesco Rollandin",), True, "paper"),
        ("Map Symbols", "hydrangea_0_symbol_1m_bwh", ("Bryce W. Harrington",), True, "hydrangea symbol"),
        ("ralf@ark.in-berlin.de", "ralf_ark.in-berlin.de_ra_01", ("ralf@ark.in-berlin.de",), False, ""),
        ("Sandwich_One_bw", "sandwich_one_bw_jean-vic_01", ("Jean-Victor Balin",), True, "sandwich one bw"),
        ("Ice Cream Cone (2 Scoop)", "ice_cream_cone", (), False, "ice cream cone 2 scoop"),
        ("AK47", "ak47_01", (), False, "ak47"),
        ("Castilla y León", "castilla_y_leon_01", (), False, "castilla y león"),
        ("Waning crescent - openclipart", "08_waningcrescent_openc_01", (), False, "waning crescent"),
    ],
)
def test_clean_title(raw: str, stem: str, agents: tuple[str, ...], collection: bool, expected: str) -> None:
    assert clean_title(raw, stem, agents, collection_title=collection) == expected


def test_build_caption_skips_boilerplate_and_glued_keywords() -> None:
    caption = build_caption("no buses", "transportation/roadsigns", "Made with Inkscape.", ("roadsign", "bus stop"))
    assert caption == "no buses, a road sign. tags: bus stop"
    long_desc = " ".join(["word"] * 80)
    assert len(build_caption("a b c", "animals", long_desc, [f"tag{i}" for i in range(9)]).split()) <= 30


def test_split_is_deterministic_from_the_normalised_title(loaded) -> None:
    assert split_of("Red Car") == split_of("  red-car! ") == split_of("RED CAR")
    splits = [split_of(f"drawing {i}") for i in range(5000)]
    assert 0.08 < splits.count("test") / 5000 < 0.12 and 0.08 < splits.count("val") / 5000 < 0.12
    assert split_of("anything", val=0.0, test=1.0) == "test"
    with pytest.raises(ValueError, match="val=0.6, test=0.6"):
        split_of("x", val=0.6, test=0.6)
    by_title = defaultdict(set)
    for it in loaded[0]:
        by_title[normalise_text(it.title)].add(it.split)
        assert it.split == split_of(it.title)
    assert len(by_title["red car"]) == 1 and sum(it.title == "red car" for it in loaded[0]) == 2


def test_dhash_ignores_canvas_margin_and_pairs_match_naive_reference() -> None:
    gray = _pattern(7)
    img = Image.fromarray(gray, "L").convert("RGBA")
    canvas = Image.new("RGBA", (100, 90), (255, 255, 255, 0))
    canvas.paste(img, (20, 5))
    assert dhash(img) == dhash(canvas) != dhash(Image.fromarray(_pattern(8), "L"))

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (40, 1), dtype=np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0], base[:10] ^ np.uint64(0b111)])  # (90,)
    fast = set(near_duplicate_pairs(hashes, 3, chunk=16))
    naive = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
             if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3}
    assert fast == naive and len(fast) >= 50


# --------------------------------------------------------------------------------------------
# ensure_openclipart with stand-ins for apt-get and dpkg


def _tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\nPATH=/usr/bin:/bin\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    # apt-get download PKG...: writes PKG_1.0_all.deb into the current folder
    _tool(bin_dir, "apt-get", f'echo "$@" >> {calls}\nshift\nfor p in "$@"; do echo deb > "${{p}}_1.0_all.deb"; done\n')
    # dpkg -x DEB DIR: unpacks a png/ (or svg/) folder depending on the package
    _tool(bin_dir, "dpkg", 'kind=$(basename "$2" | sed "s/openclipart-\\([a-z]*\\)_.*/\\1/")\n'
                           'mkdir -p "$3/usr/share/openclipart/$kind/animals"\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    return calls


def test_ensure_openclipart_downloads_unpacks_atomically_and_reuses(tmp_path: Path, fake_tools: Path) -> None:
    cache = tmp_path / "cache"
    root = ensure_openclipart(cache, progress=False)
    assert root == cache / "root" / "usr" / "share" / "openclipart"
    assert (root / "png" / "animals").is_dir() and (root / "svg" / "animals").is_dir()
    assert sorted(p.name for p in (cache / "debs").iterdir()) == ["openclipart-png_1.0_all.deb", "openclipart-svg_1.0_all.deb"]
    assert sorted(p.name for p in cache.iterdir()) == ["debs", "root"]  # no temporary folder left
    assert fake_tools.read_text().split("\n")[0] == "download openclipart-svg openclipart-png"

    assert ensure_openclipart(cache, progress=False) == root  # present: nothing runs
    shutil.rmtree(cache / "root")
    ensure_openclipart(cache, progress=False)  # .deb files present: unpack only
    assert len(fake_tools.read_text().strip().split("\n")) == 1


def test_ensure_openclipart_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apt-get nor dpkg
    with pytest.raises(RuntimeError, match="apt-get not found.*openclipart-svg and openclipart-png"):
        ensure_openclipart(tmp_path / "cache", progress=False)


def test_ensure_openclipart_reports_apt_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tool(tmp_path, "apt-get", 'echo "E: Unable to locate package openclipart-svg" >&2\nexit 100\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)Unable to locate package.*apt-get update"):
        ensure_openclipart(tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "debs").iterdir())  # no half-downloaded files kept


# --------------------------------------------------------------------------------------------
# The real corpus (CI fetches it; locally: apt-get download + dpkg -x, see MODELS.md)


def _real_corpus_root() -> Path | None:
    home = Path(os.environ.get("MMAPP_HOME") or Path(__file__).resolve().parents[2] / "var")
    for candidate in (
        os.environ.get("MMAPP_OPENCLIPART_ROOT"),
        home / "corpus" / "openclipart" / "root" / "usr" / "share" / "openclipart",  # where the pipeline fetches it
        "/tmp/oca/x/usr/share/openclipart",
    ):
        if candidate and (Path(candidate) / "png").is_dir() and (Path(candidate) / "svg").is_dir():
            return Path(candidate)
    return None


@pytest.mark.corpus
def test_real_corpus() -> None:
    root = _real_corpus_root()
    if root is None:
        pytest.skip("Open Clip Art corpus not found: set MMAPP_OPENCLIPART_ROOT to the folder holding png/ and svg/")
    items, report = load_openclipart(root, progress=False)
    print(report.summary())
    assert report.drawings > 6000
    assert report.kept >= 2000, report.summary()
    assert not [it for it in items if it.category.startswith(DEFAULT_CLUTTER)]
    assert report.dropped["clutter"] >= 2500
    assert len({it.item_id for it in items}) == len(items)
    assert all(it.png_path.is_file() and it.svg_path.is_file() for it in items)
    assert all(2 <= len(it.caption.split()) <= 30 for it in items)
    n = len(items)
    assert 0.06 * n < report.splits["test"] < 0.14 * n and 0.06 * n < report.splits["val"] < 0.14 * n
    by_title = defaultdict(set)
    for it in items:
        by_title[normalise_text(it.title)].add(it.split)
    assert all(len(s) == 1 for s in by_title.values())
    assert len({(it.category, normalise_text(it.caption)) for it in items}) == n
