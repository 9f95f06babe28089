"""The Open Clip Art bootstrap corpus: fetch the Debian packages, turn each drawing into a captioned
image pair and filter out clutter and duplicates.

Reads files only (and runs apt-get/dpkg in ``ensure_openclipart``); no model code, no database.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

PACKAGES = ("openclipart-svg", "openclipart-png")
CORPUS_SUBDIR = Path("usr/share/openclipart")

# Category prefixes that hold shape/icon sets rather than drawings of things (about a third of the
# corpus); a drawing also filed under a non-clutter folder keeps that folder and is not dropped.
DEFAULT_CLUTTER: tuple[str, ...] = (
    "shapes/stars",
    "shapes/jigsaw",
    "computer/icons",
    "special/gradients",
    "special/patterns",
    "signs_and_symbols/led",
)

MAX_CAPTION_WORDS = 30
MAX_TAGS = 3
MAX_DESCRIPTION_WORDS = 15
COLLECTION_MIN_USES = 4  # a dc:title shared by this many drawings names a collection, not the drawing

# What a category folder says about its drawings, appended to the title ("dall sheep ram, a mammal").
# The path is read from the deepest folder up; folders absent here (regions under flags/, card
# styles, "unsorted") are skipped, so signs_and_symbols/flags/europe/france reads "a flag".
CATEGORY_PHRASES: dict[str, str] = {
    "animals": "an animal", "amphibian": "an amphibian", "birds": "a bird", "penguin": "a penguin",
    "bugs": "an insect", "dinosaurs": "a dinosaur", "fantasy": "a fantasy creature", "fish": "a fish",
    "mammals": "a mammal", "bears": "a bear", "big_cats": "a big cat", "dogs": "a dog",
    "horses": "a horse", "housecats": "a cat",
    "buildings": "a building", "furniture": "furniture", "homes": "a house",
    "buttons": "a button", "computer": "computer", "connectors": "a computer connector",
    "diagrams": "a diagram", "folders": "a folder icon", "games": "a game",
    "hardware": "computer hardware", "network": "a computer network",
    "containers": "a container", "decorations": "a decoration",
    "education": "education", "books": "a book",
    "electronics": "electronics", "battery": "a battery", "bulb": "a light bulb",
    "food": "food", "beverages": "a drink", "alcohol": "an alcoholic drink",
    "breads_and_carbs": "bread", "dairy": "a dairy product", "desserts": "a dessert",
    "fruit": "fruit", "meats_and_eggs": "meat", "vegetables": "a vegetable",
    "geography": "geography", "astronomy": "astronomy", "logos": "a logo",
    "office": "office", "telephone": "a telephone",
    "people": "a person", "bodypart": "a body part", "clothing": "clothing", "hats": "a hat",
    "jewelry": "jewelry", "pantyhose": "pantyhose", "smilies": "a smiley",
    "stickmen": "a stick figure",
    "plants": "a plant", "flowers": "a flower", "trees": "a tree", "evergreen": "an evergreen tree",
    "art": "art", "cards": "a playing card", "cardbacks": "a playing card back", "chess": "chess",
    "dice": "a die", "holiday": "a holiday", "christmas": "christmas", "easter": "easter",
    "thanksgiving": "thanksgiving", "valentines": "valentine's day", "music": "music",
    "CD_Player": "a cd player", "party": "a party", "religion": "religion",
    "christianity": "christianity", "sports": "sport", "toys": "a toy",
    "science": "science", "medicine": "medicine",
    "shapes": "a shape", "arrows": "an arrow", "callouts": "a speech bubble",
    "flowchart": "a flowchart symbol", "jigsaw": "a jigsaw piece", "stars": "a star",
    "signs_and_symbols": "a sign", "awards": "an award", "clocks": "a clock",
    "disability": "a disability sign", "flags": "a flag", "semaphore": "a semaphore flag",
    "hazard": "a hazard sign", "map_symbols": "a map symbol", "money": "money",
    "weather": "weather", "led": "an led display", "icons": "an icon", "patterns": "a pattern",
    "tools": "a tool", "weapons": "a weapon",
    "transportation": "transportation", "aiga-symbols": "a travel sign", "boating": "a boat",
    "roadsigns": "a road sign", "vehicles": "a vehicle", "hummers": "a hummer",
}

# Keywords that describe the library, not the picture.
_META_KEYWORDS = frozenset({
    "icon", "openclipart", "sign", "symbol", "people", "recreation", "transportation", "transport",
    "miscellany", "stickmen", "musicstuff", "arrowshape", "callout",
    "hash", "icons", "theme", "magick", "geometry", "signs and symbols", "unsorted", "special",
    "mapsym", "musicsym", "map symbol", "clip art", "clipart", "clip-art", "svg", "png", "media",
    "image", "public domain", "externalsource", "united nations member", "lemon theme icon",
    "webpage", "menu", "fest", "festive", "shape", "shapes", "simple", "gradients", "work",
    "mime-types", "mimetypes", "roadtravel", "foodfruits", "unitedstates", "subnational",
})
_STOPWORDS = frozenset(
    "a an the of and or with in on at for to by from is are this that it its as tags".split()
)
# All-consonant tokens of three letters or more are usually initials or file codes ("bwh",
# "rpswb", "fc"); these are the real words among them.
_CONSONANT_WORDS = frozenset(
    "dvd cd usb lcd tv pc rpg bbq mp pdf www gps sms crt psp nyc hdd ssd cpu gpu tnt hmm brr "
    "pst shh nth".split()
)
_GENERIC_AGENT_WORDS = frozenset(
    "open clip art library public domain team project org com net www http https openclipart "
    "international code signals sourced gem clipart".split()
)
# Descriptions that talk about the file rather than the picture.
_BOILERPLATE_DESCRIPTION = re.compile(
    r"public domain|released|inkscape|made with|created with|drawn (?:with|in|by)|converted from|"
    r"enjoy|thank|licen[cs]e|copyright|\bversion\b|part of|collection|clip ?art",
    re.I,
)
_CLIPART_BY = re.compile(r"^\s*(?:svg\s+)?clip\s*-?arts?\s+by\s+[^-–:]+?\s*[-–:]\s*", re.I)
_EMAIL = re.compile(r"\S+@\S+")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_TOKEN = re.compile(r"[^\W_]+")  # letters (accented too) and digits

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Fetching


def ensure_openclipart(cache_dir: Path, *, progress: bool = True) -> Path:
    """Return the openclipart root (holding ``png/`` and ``svg/``) under ``cache_dir``, fetching the
    Debian packages with ``apt-get download`` and unpacking them with ``dpkg -x`` when absent.

    The unpacked tree appears at ``cache_dir/root`` in one ``os.replace``, so an interrupted run
    leaves either no corpus or a complete one.
    """
    cache_dir = Path(cache_dir)
    root_dir = cache_dir / "root"
    corpus = root_dir / CORPUS_SUBDIR
    if (corpus / "png").is_dir():
        return corpus

    def say(msg: str) -> None:
        if progress:
            print(f"[openclipart] {msg}", flush=True)

    debs_dir = cache_dir / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    debs = {pkg: sorted(debs_dir.glob(f"{pkg}_*.deb")) for pkg in PACKAGES}
    missing = [pkg for pkg, found in debs.items() if not found]
    if missing:
        say(f"downloading {', '.join(missing)} with apt-get into {debs_dir} (about 160 MB)")
        _apt_download(missing, debs_dir)
        debs = {pkg: sorted(debs_dir.glob(f"{pkg}_*.deb")) for pkg in PACKAGES}
        still = [pkg for pkg, found in debs.items() if not found]
        if still:
            raise RuntimeError(f"apt-get download finished but left no .deb for {still} in {debs_dir}")

    dpkg = shutil.which("dpkg") or shutil.which("dpkg-deb")
    if dpkg is None:
        raise RuntimeError(
            "dpkg not found: unpacking the openclipart .deb files needs dpkg "
            "(Debian/Ubuntu: it is always there; elsewhere install the 'dpkg' package)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        for pkg in PACKAGES:
            deb = debs[pkg][-1]
            say(f"unpacking {deb.name}")
            _run([dpkg, "-x", str(deb), str(tmp)], what=f"dpkg -x {deb.name}")
        if not (tmp / CORPUS_SUBDIR / "png").is_dir():
            raise RuntimeError(f"unpacked {PACKAGES} but found no {CORPUS_SUBDIR / 'png'} inside")
        if root_dir.exists():  # a root without png/ is not ours to keep (made by hand, or foreign)
            shutil.rmtree(root_dir)
        os.replace(tmp, root_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"corpus ready at {corpus}")
    return corpus


def _apt_download(packages: list[str], debs_dir: Path) -> None:
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            "apt-get not found: the bootstrap corpus comes from the Debian packages "
            f"{' and '.join(PACKAGES)}. On Debian/Ubuntu run `apt-get update`; elsewhere download "
            f"the two .deb files by hand into {debs_dir} (and install dpkg to unpack them)"
        )
    # Download into a scratch folder first so a half-written .deb is never taken for a whole one.
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
    try:
        _run([apt, "download", *packages], what="apt-get download", cwd=scratch,
             hint="run `apt-get update` first (as root) so apt knows the packages; the 'main' "
                  "component of a Debian or Ubuntu mirror carries them")
        for deb in scratch.glob("*.deb"):
            os.replace(deb, debs_dir / deb.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(cmd: list[str], *, what: str, cwd: Path | None = None, hint: str = "") -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise RuntimeError(
            f"{what} failed with exit code {proc.returncode}: {tail}" + (f"\nHint: {hint}" if hint else "")
        )


# ---------------------------------------------------------------------------------------------
# Items and the filter report


@dataclass(frozen=True)
class ClipArtItem:
    item_id: str  # path of the real PNG below png/, without extension: "animals/mammals/dall_sheep_01"
    png_path: Path
    svg_path: Path
    category: str  # deepest non-clutter folder holding the drawing: "animals/mammals"
    title: str  # cleaned, lowercase; also what the split is derived from
    description: str  # raw dc:description, whitespace-normalised
    keywords: tuple[str, ...]  # raw <rdf:li> keywords of the work, lowercase
    caption: str
    split: str  # train | val | test


@dataclass
class FilterReport:
    paths: int = 0  # PNG paths seen, symlinks included
    drawings: int = 0  # distinct drawings after merging symlinked copies
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    parse_fallbacks: list[str] = field(default_factory=list)  # SVGs read by regex, with the error
    splits: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    max_examples: int = 5

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(example)

    def summary(self) -> str:
        lines = [
            f"{self.paths} png paths -> {self.drawings} drawings (symlinked copies merged) -> "
            f"{self.kept} kept in {self.seconds:.1f}s",
            f"splits: {dict(sorted(self.splits.items()))}",
            f"svg metadata read by regex fallback: {len(self.parse_fallbacks)}",
        ]
        for reason, n in self.dropped.most_common():
            lines.append(f"dropped {reason}: {n}  e.g. {'; '.join(self.examples[reason][:3])}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# SVG metadata


@dataclass(frozen=True)
class SvgMetadata:
    title: str
    description: str
    keywords: tuple[str, ...]
    agents: tuple[str, ...]  # names of creators/publishers/rights holders
    error: str = ""  # why XML parsing failed, when the regex fallback was used


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(elem: ET.Element | None) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def read_svg_metadata(svg_path: Path) -> SvgMetadata:
    """The work's own title, description and keywords plus the agents' names.

    Stops reading at the end of the first ``cc:Work``; falls back to regular expressions when the
    XML is malformed, recording why in ``error``.
    """
    try:
        with open(svg_path, "rb") as f:
            for _, elem in ET.iterparse(f, events=("end",)):
                if _local(elem.tag) == "Work":
                    return _work_metadata(elem)
        return SvgMetadata("", "", (), ())
    except ET.ParseError as exc:
        return _regex_metadata(Path(svg_path).read_text(encoding="utf-8", errors="replace"), str(exc))


def _work_metadata(work: ET.Element) -> SvgMetadata:
    title = description = ""
    keywords: list[str] = []
    for child in work:
        name = _local(child.tag)
        if name == "title" and not title:
            title = _text(child)
        elif name == "description" and not description:
            description = _text(child)
        elif name == "subject":
            keywords += [_text(li) for li in child.iter() if _local(li.tag) == "li"]
    agents = [
        _text(t) for a in work.iter() if _local(a.tag) == "Agent" for t in a if _local(t.tag) == "title"
    ]
    return SvgMetadata(title, description, tuple(k for k in keywords if k), tuple(a for a in agents if a))


_RX_WORK = re.compile(r"<(?:\w+:)?Work\b.*?(?:</(?:\w+:)?Work>|$)", re.S)
_RX_AGENT = re.compile(r"<(?:\w+:)?Agent\b.*?</(?:\w+:)?Agent>", re.S)
_RX_TAG = {
    name: re.compile(rf"<(?:\w+:)?{name}\b[^>]*>(.*?)</(?:\w+:)?{name}>", re.S)
    for name in ("title", "description", "subject", "li")
}


def _regex_metadata(text: str, error: str) -> SvgMetadata:
    def clean(s: str) -> str:
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", s)).split())

    m = _RX_WORK.search(text)
    work = m.group(0) if m else ""
    agents = tuple(
        clean(t.group(1)) for a in _RX_AGENT.findall(work) if (t := _RX_TAG["title"].search(a))
    )
    own = _RX_AGENT.sub("", work)  # the agents' dc:title must not pass for the work's
    title = _RX_TAG["title"].search(own)
    desc = _RX_TAG["description"].search(own)
    keywords = [clean(li) for s in _RX_TAG["subject"].findall(own) for li in _RX_TAG["li"].findall(s)]
    return SvgMetadata(
        clean(title.group(1)) if title else "",
        clean(desc.group(1)) if desc else "",
        tuple(k for k in keywords if k),
        tuple(a for a in agents if a),
        error=error or "malformed XML",
    )


# ---------------------------------------------------------------------------------------------
# Text cleaning and captions


def normalise_text(text: str) -> str:
    """Lowercase, alphanumeric words separated by single spaces: the key for titles and captions."""
    return " ".join(_TOKEN.findall(text.lower().replace("'", "")))


def _name_tokens(agents: Iterable[str]) -> set[str]:
    """Words of the agents' names ("architetto", "francesco", ...), without the generic ones of
    publishers such as "Open Clip Art Library" or "Public Domain"."""
    toks: set[str] = set()
    for a in agents:
        toks.update(t for t in _TOKEN.findall(a.lower()) if len(t) >= 2)
    return toks - _STOPWORDS - _GENERIC_AGENT_WORDS


def _clean_words(
    text: str, *, from_filename: bool, author_tokens: AbstractSet[str], drop_codes: bool = False
) -> list[str]:
    """Words of a title or file stem with file-ish and author tokens removed; ``drop_codes`` also
    removes letter-digit codes ("fc23"), which in file names and batch titles are counters."""
    text = _URL.sub(" ", _EMAIL.sub(" ", text))
    text = re.sub(r"(?<=[a-z])(?=[A-Z][a-z])", " ", text)  # RedCar -> Red Car
    text = re.sub(r"\b(?:open\s*)?clip\s*-?arts?\b|\bsvg\b", " ", text, flags=re.I)
    words = [w.strip("'") for w in re.split(r"[^\w']+|_+", text.lower())]
    words = [w for w in words if w]
    if from_filename:
        # File stems end in author names (often truncated: "architetto_fran") and counters ("01r").
        while len(words) > 1 and (
            len(words[-1]) == 1
            or re.fullmatch(r"\d+[a-z]?", words[-1])
            or any(t.startswith(words[-1]) for t in author_tokens if len(words[-1]) >= 2)
        ):
            words.pop()
    out = []
    for w in words:
        w = re.sub(r"^([a-z]{3,})\d+$", r"\1", w)  # tigre02 -> tigre, bus2 -> bus
        if re.fullmatch(r"0\d+", w) or (from_filename and re.fullmatch(r"\d+[a-z]{0,2}", w)):
            continue  # counters and sizes: 01, 007, and in file names 0, 1m, 10cm
        if len(w) >= 3 and not re.search(r"[aeiouyàáâäåèéêëìíîïòóôöùúûüý\d]", w) and w not in _CONSONANT_WORDS:
            continue  # initials / file codes: bwh, rpswb
        if (drop_codes or from_filename) and re.fullmatch(r"[a-z]+\d+[a-z0-9]*", w) \
                and (len(w) > 3 or not re.fullmatch(r"[a-z]+[1-9]\d?", w)):
            continue  # codes: fc23, fc08; kept when three characters at most (mp3, b52)
        out.append(w)
    if out and out[-1].isdigit() and len(out) > 1:
        out.pop()  # "paper 4"
    return out


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _informative(words: Iterable[str]) -> list[str]:
    return [w for w in words if w not in _STOPWORDS and not w.isdigit() and len(w) >= 2]


def _strip_authors(title: str, agents: Iterable[str]) -> str:
    for a in sorted(agents, key=len, reverse=True):
        if len(a) >= 3:
            title = re.sub(rf"(?:\bby\s+)?{re.escape(a)}", " ", title, flags=re.I)
    return title


def clean_title(
    raw_title: str, file_stem: str, agents: Iterable[str], *, collection_title: bool = False
) -> str:
    """The drawing's name as lowercase words, or "" when neither the title nor the file name says
    what is drawn.

    Titles written by a batch tool ("Clipart by Nicu Buculei - contour_chipmunk", often stale) or
    shared by a whole collection ("Etiquette Icons") give way to the file name.
    """
    agents = tuple(agents)
    author_tokens = _name_tokens(agents)
    templated = bool(_CLIPART_BY.match(raw_title))
    title_words = _clean_words(
        _strip_authors(_CLIPART_BY.sub("", raw_title), agents), from_filename=False,
        author_tokens=author_tokens, drop_codes=templated,
    )
    file_words = _clean_words(file_stem, from_filename=True, author_tokens=author_tokens)
    title_words, file_words = (
        words if [w for w in _informative(words) if w not in author_tokens] else []
        for words in (title_words, file_words)
    )
    prefer_file = templated or collection_title or not _informative(title_words)
    words = file_words if prefer_file and _informative(file_words) else title_words
    return " ".join(words) if _informative(words) else ""


def category_phrase(category: str) -> str:
    for part in reversed(category.split("/")):
        if part in CATEGORY_PHRASES:
            return CATEGORY_PHRASES[part]
    return ""


def _first_sentence(description: str, *, max_words: int) -> str:
    text = _URL.sub(" ", _EMAIL.sub(" ", description))
    text = " ".join(re.sub(r"\([^)]*(?:\)|$)", " ", text).split())  # asides, even unclosed ones
    sentence = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0].rstrip(".!? ")
    words = sentence.split()
    return " ".join(words[:max_words]).lower()


def build_caption(
    title: str,
    category: str,
    description: str,
    keywords: Iterable[str],
    *,
    author_tokens: AbstractSet[str] = frozenset(),
    boilerplate_description: bool = False,
) -> str:
    """"dall sheep ram, a mammal. tags: animal, ram" — title, what the folder says, the first
    sentence of a description that adds something, and up to three new keywords; at most
    MAX_CAPTION_WORDS words."""
    caption = title
    seen = set(_informative(title.split()))
    phrase = category_phrase(category)
    phrase_words = set(_informative(normalise_text(phrase).split()))
    if phrase and not phrase_words <= seen and not {w + "s" for w in phrase_words} <= seen:
        caption += f", {phrase}"
        seen |= phrase_words
    if description and not boilerplate_description:
        budget = MAX_CAPTION_WORDS - len(caption.split()) - 4  # room for a few tags
        sentence = _first_sentence(description, max_words=min(MAX_DESCRIPTION_WORDS, budget))
        sentence_words = set(_informative(normalise_text(sentence).split()))
        new = sentence_words - seen
        if (
            len(sentence_words) >= 2
            and new
            and not new <= author_tokens
            and not _BOILERPLATE_DESCRIPTION.search(sentence)
        ):
            caption += f". {sentence}"
            seen |= new
    tags: list[str] = []
    for kw in keywords:
        kw = " ".join(kw.lower().replace("_", " ").split())
        kw_words = normalise_text(kw).split()
        glued = "".join(kw_words)
        if (
            kw in _META_KEYWORDS
            or len(kw) < 3
            or re.search(r"\d", kw)
            or not kw_words
            or (len(kw_words) == 1 and len(glued) > 15)  # "cayennepepperfoodspicyhot"
            or {_singular(w) for w in kw_words} <= {_singular(w) for w in seen}
            or set(kw_words) <= author_tokens
            # "roadsign", "signalflag": the caption already says it with a space
            or (len(glued) >= 6 and glued in caption.replace(" ", ""))
        ):
            continue
        tags.append(kw)
        seen |= set(kw_words)
        if len(tags) == MAX_TAGS:
            break
    if tags:
        caption += ". tags: " + ", ".join(tags)
    words = caption.split()
    return " ".join(words[:MAX_CAPTION_WORDS])


# ---------------------------------------------------------------------------------------------
# Splits and image hashes


def split_of(title: str, *, val: float = 0.1, test: float = 0.1) -> str:
    """'train' | 'val' | 'test', fixed by the SHA-1 of the normalised title, so drawings sharing a
    title never straddle two splits and the split survives re-ordering or re-filtering."""
    if not (0 <= val and 0 <= test and val + test <= 1):
        raise ValueError(f"split fractions must be >= 0 and sum to <= 1, got val={val}, test={test}")
    digest = hashlib.sha1(normalise_text(title).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def ink_image(image: Image.Image, *, work_side: int = 256) -> Image.Image | None:
    """The drawing composited on white, in grayscale, cropped to its ink and shrunk to about
    ``work_side`` pixels; None when nothing is drawn (some PNGs are fully transparent renders)."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    gray = canvas.convert("L")
    factor = max(1, max(gray.size) // work_side)
    if factor > 1:
        gray = gray.reduce(factor)  # integer box filter: cheap, and the hash sees 9x8 pixels anyway
    bbox = gray.point(lambda v: 255 if v < 250 else 0).getbbox()
    return gray.crop(bbox) if bbox else None


def dhash(image: Image.Image, *, size: int = 8) -> int:
    """64-bit difference hash of the drawing's ink on white, so the same drawing on another canvas
    size or margin hashes alike; a blank image hashes to 0."""
    gray = ink_image(image)
    return _dhash_of_ink(gray, size=size) if gray is not None else 0


def _dhash_of_ink(gray: Image.Image, *, size: int = 8) -> int:
    px = np.asarray(gray.resize((size + 1, size), Image.Resampling.BOX), dtype=np.int16)  # (8, 9)
    bits = (px[:, 1:] > px[:, :-1]).ravel()  # (64,)
    return int(np.packbits(bits).view(">u8")[0])


@dataclass(frozen=True)
class _ImageFacts:
    sha1: str = ""
    dhash: int = 0
    problem: str = ""  # drop reason: oversized_image | blank_image | unreadable_image
    detail: str = ""


def _image_facts(path: Path, max_pixels: int) -> _ImageFacts:
    data = path.read_bytes()
    width, height = _png_size(data)  # a few PNGs are rendered at 20k x 30k pixels
    if width * height > max_pixels:
        return _ImageFacts(problem="oversized_image", detail=f"{width}x{height}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                return _ImageFacts(problem="oversized_image", detail=f"{img.width}x{img.height}")
            gray = ink_image(img)
            if gray is None:
                return _ImageFacts(problem="blank_image", detail=f"{img.width}x{img.height} {img.mode}")
            digest = _dhash_of_ink(gray)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _ImageFacts(problem="unreadable_image", detail=str(exc))
    return _ImageFacts(sha1=hashlib.sha1(data).hexdigest(), dhash=digest)


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int, *, chunk: int = 1024) -> Iterator[tuple[int, int]]:
    """Index pairs (i, j), i < j, whose 64-bit hashes differ in at most ``max_bits`` bits.

    All pairs in chunks: 8k hashes is 64M XOR+popcounts, well under a second or two in numpy.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    lut = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    for start in range(0, len(h), chunk):
        x = h[start:start + chunk, None] ^ h[None, :]  # (C, N)
        dist = lut[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)  # (C, N)
        ii, jj = np.nonzero(dist <= max_bits)
        ii = ii + start
        for i, j in zip(ii.tolist(), jj.tolist()):
            if i < j:
                yield i, j


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, without Pillow's decompression-bomb refusal."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return (0, 0)  # not a PNG header: let Pillow judge it


def _progress(it: Iterable[T], *, enabled: bool, desc: str, total: int | None = None) -> Iterable[T]:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit="file", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Drawing:
    item_id: str
    png_path: Path
    svg_path: Path
    category: str
    clutter: bool
    stem: str
    meta: SvgMetadata | None = None
    title: str = ""
    caption: str = ""
    sha1: str = ""
    dhash: int = 0


def _is_clutter(category: str, drop_categories: Iterable[str]) -> bool:
    return any(category == c or category.startswith(c.rstrip("/") + "/") for c in drop_categories)


def _collect_drawings(root: Path, drop_categories: tuple[str, ...], report: FilterReport) -> list[_Drawing]:
    """One entry per distinct PNG file; symlinked copies elsewhere only contribute their folder."""
    png_root, svg_root = root / "png", root / "svg"
    by_real: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(png_root.rglob("*.png")):
        report.paths += 1
        by_real[os.path.realpath(p)].append(p)
    png_real_root = Path(os.path.realpath(png_root))
    drawings = []
    for real, paths in sorted(by_real.items()):
        real_path = Path(real)
        try:
            item_id = real_path.relative_to(png_real_root).with_suffix("").as_posix()
        except ValueError:  # a link pointing out of the corpus
            item_id = paths[0].relative_to(png_root).with_suffix("").as_posix()
        categories = {p.parent.relative_to(png_root).as_posix(): p for p in paths}
        # Most specific folder wins; a drawing also filed among icons/shapes keeps its real folder.
        ranked = sorted(categories, key=lambda c: (_is_clutter(c, drop_categories), -c.count("/"), c))
        category = ranked[0]
        via = categories[category]
        svg = svg_root / via.relative_to(png_root).with_suffix(".svg")
        if not svg.exists():
            svg = svg_root / f"{item_id}.svg"
        if not svg.exists():
            report.drop("missing_svg", item_id)
            continue
        drawings.append(_Drawing(
            item_id=item_id,
            png_path=real_path,
            svg_path=Path(os.path.realpath(svg)),
            category=category if category != "." else "",
            clutter=_is_clutter(category, drop_categories),
            stem=real_path.stem,
        ))
    report.drawings = len(by_real)
    return drawings


def load_openclipart(
    root: Path,
    *,
    drop_categories: tuple[str, ...] = DEFAULT_CLUTTER,
    near_duplicate_bits: int = 4,
    min_caption_words: int = 2,
    max_pixels: int = 40_000_000,
    val: float = 0.1,
    test: float = 0.1,
    progress: bool = True,
) -> tuple[list[ClipArtItem], FilterReport]:
    """Captioned, de-duplicated drawings of the corpus at ``root`` (the folder holding png/ and svg/)
    and a report of what was dropped and why.

    Filters, in order: clutter categories; titles that name nothing (only authors, numbers, file
    codes) and captions under ``min_caption_words`` informative words; PNGs over ``max_pixels``
    (too big to decode for training), fully transparent or unreadable; identical PNG files;
    near-identical images (dHash within ``near_duplicate_bits``; -1 disables); repeated
    (category, caption). Among duplicates the drawing in the deepest folder, then the longest
    caption, then the smallest item_id is kept. ``val``/``test`` are the split fractions.
    """
    t0 = time.perf_counter()
    root = Path(root)
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise ValueError(f"not an openclipart root (expected png/ and svg/ inside): {root}")
    report = FilterReport()
    drawings = _collect_drawings(root, tuple(drop_categories), report)

    kept: list[_Drawing] = []
    for d in drawings:
        if d.clutter:
            report.drop("clutter", f"{d.category}: {d.stem}")
        else:
            kept.append(d)

    for d in _progress(kept, enabled=progress, desc="svg metadata"):
        d.meta = read_svg_metadata(d.svg_path)
        if d.meta.error:
            report.parse_fallbacks.append(f"{d.item_id}: {d.meta.error}")
    title_uses = Counter(normalise_text(d.meta.title) for d in kept if d.meta)
    desc_uses = Counter(normalise_text(d.meta.description) for d in kept if d.meta)

    informative: list[_Drawing] = []
    for d in kept:
        meta = d.meta
        assert meta is not None
        author_tokens = _name_tokens(meta.agents)
        d.title = clean_title(
            meta.title, d.stem, meta.agents,
            collection_title=title_uses[normalise_text(meta.title)] >= COLLECTION_MIN_USES,
        )
        if not d.title:
            report.drop("uninformative_title", f"{d.item_id}: {meta.title!r}")
            continue
        d.caption = build_caption(
            d.title, d.category, meta.description, meta.keywords,
            author_tokens=author_tokens,
            boilerplate_description=desc_uses[normalise_text(meta.description)] >= COLLECTION_MIN_USES,
        )
        if len(_informative(normalise_text(d.caption).split())) < min_caption_words:
            report.drop("short_caption", f"{d.item_id}: {d.caption!r}")
            continue
        informative.append(d)

    # Preference among duplicates: deepest folder, then richest caption, then item_id.
    informative.sort(key=lambda d: (-d.category.count("/"), -len(d.caption.split()), d.item_id))
    # Pillow decodes with the GIL released, so threads overlap the PNG decoding.
    hashed: list[_Drawing] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        facts = pool.map(lambda d: _image_facts(d.png_path, max_pixels), informative)
        for d, f in _progress(zip(informative, facts), enabled=progress, desc="image hashes",
                              total=len(informative)):
            if f.problem:
                report.drop(f.problem, f"{d.item_id}: {f.detail}")
                continue
            d.sha1, d.dhash = f.sha1, f.dhash
            hashed.append(d)

    by_sha: dict[str, _Drawing] = {}
    unique: list[_Drawing] = []
    for d in hashed:
        if d.sha1 in by_sha:
            report.drop("exact_duplicate", f"{d.item_id} = {by_sha[d.sha1].item_id}")
        else:
            by_sha[d.sha1] = d
            unique.append(d)

    if near_duplicate_bits >= 0 and unique:
        hashes = np.array([d.dhash for d in unique], dtype=np.uint64)
        dropped = np.zeros(len(unique), dtype=bool)
        # Pairs come in row order, so a drawing is dropped only by a preferred one still kept.
        for i, j in near_duplicate_pairs(hashes, near_duplicate_bits):
            if not dropped[i] and not dropped[j]:
                dropped[j] = True
                report.drop("near_duplicate", f"{unique[j].item_id} ~ {unique[i].item_id}")
        unique = [d for d, gone in zip(unique, dropped) if not gone]

    seen_captions: dict[tuple[str, str], str] = {}
    items: list[ClipArtItem] = []
    for d in unique:
        key = (d.category, normalise_text(d.caption))
        if key in seen_captions:
            report.drop("duplicate_caption", f"{d.item_id} = {seen_captions[key]}: {d.caption!r}")
            continue
        seen_captions[key] = d.item_id
        meta = d.meta
        assert meta is not None
        split = split_of(d.title, val=val, test=test)
        report.splits[split] += 1
        items.append(ClipArtItem(
            item_id=d.item_id,
            png_path=d.png_path,
            svg_path=d.svg_path,
            category=d.category,
            title=d.title,
            description=meta.description,
            keywords=tuple(k.lower() for k in meta.keywords),
            caption=d.caption,
            split=split,
        ))
    items.sort(key=lambda it: it.item_id)
    report.kept = len(items)
    report.seconds = time.perf_counter() - t0
    return items, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmapp.data.openclipart",
        description="Fetch the Open Clip Art corpus into CACHE_DIR (if needed) and summarise the pairs.",
    )
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--near-duplicate-bits", type=int, default=4)
    parser.add_argument("--examples", type=int, default=12, help="example captions to print")
    args = parser.parse_args(argv)
    given = args.cache_dir
    # An already unpacked corpus (the folder holding png/ and svg/) is used as it is.
    root = given if (given / "png").is_dir() and (given / "svg").is_dir() else ensure_openclipart(given)
    items, report = load_openclipart(root, near_duplicate_bits=args.near_duplicate_bits)
    print(report.summary())
    per_category = Counter(it.category.split("/")[0] for it in items)
    print(f"top-level categories: {dict(per_category.most_common())}")
    step = max(1, len(items) // max(1, args.examples))
    for it in items[::step][: args.examples]:
        print(f"  [{it.split}] {it.item_id}: {it.caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
