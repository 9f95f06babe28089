"""Synthetic memes: classic top/bottom-caption rendering and labelled sets.

Two generations: v1 (below: a 2x2 valence design over clip art, ``build_meme_specs``) and v2
(``build_meme_specs_v2``, what the bootstrap trains on: compositional sincere / ironic / grim-joke
captions from :mod:`mmapp.data.meme_text` on clip art and photographs; see docs/memes.md).

No meme data set exists offline, so one is built from clip art plus curated captions; accuracy on it is
not real-world meme accuracy (see docs/memes.md). Pure data code: no model, no database, no I/O at import.

Construction
------------
* Image valence comes from the clip-art category and artist keywords (:func:`image_valence`):
  ``grim`` (weapons, hazard signs, medicine, skulls, death/bomb/grave/blood/war ...) or ``cheerful``
  (food, flowers, party, holiday, toys, smilies, animals without grim keywords); the rest is unused.
* Text valence comes from curated phrase pools, ``upbeat`` and ``grim``, whose polarity agrees with the
  VADER lexicon (checked in tests). Each pool is split once into disjoint train/val/test phrases, so test
  captions were never seen in training. A phrase goes under an optional neutral set-up line
  ("WHEN YOU WAKE UP AND" / "BEST DAY EVER"); set-ups are shared by all splits and carry no valence.
* Label = incongruity of the two valences (:data:`LABEL_OF`)::

                      upbeat text   grim text
      cheerful image  positive      sarcastic
      grim image      sarcastic     dark humor

  so an image alone (cheerful -> positive or sarcastic) and a text alone (upbeat -> positive or sarcastic)
  each leave two labels open; only the pair decides. Cells are filled 2:1:1:2 so the three labels are
  balanced and both valences of each modality are equally frequent.
* A meme's split is its clip-art item's split, so test images are never seen in training either.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from mmapp.imageio import flatten_on_white

LABELS = ("positive", "sarcastic", "dark humor")
IMAGE_VALENCES = ("cheerful", "grim")
TEXT_VALENCES = ("upbeat", "grim")
SPLITS = ("train", "val", "test")

# (image valence, text valence) -> index into the labels tuple (positive-like, ironic, dark).
LABEL_OF = {
    ("cheerful", "upbeat"): 0,
    ("grim", "upbeat"): 1,
    ("cheerful", "grim"): 1,
    ("grim", "grim"): 2,
}
# Memes per cell, in units of k per split: makes labels 1/3 each and image valences 1/2 each.
_CELL_SHARE = {("cheerful", "upbeat"): 2, ("cheerful", "grim"): 1, ("grim", "upbeat"): 1, ("grim", "grim"): 2}

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",  # Debian/Ubuntu fonts-dejavu-core
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",  # Fedora
    "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",  # Arch
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans-Bold.ttf",  # newer Fedora
)

# --- image valence -------------------------------------------------------------------------------

GRIM_CATEGORIES = (
    "tools/weapons",
    "signs_and_symbols/hazard",
    "science/medicine",
    "signs_and_symbols/flags/historic/pirates",
)
CHEERFUL_CATEGORIES = (
    "animals",
    "food/desserts",
    "food/fruit",
    "food/breads_and_carbs",
    "food/vegetables",
    "plants/flowers",
    "recreation/party",
    "recreation/holiday",
    "recreation/toys",
    "people/smilies",
)
GRIM_WORDS = frozenset("""
    skull skulls skeleton skeletons bones crossbones death dead die dying deadly kill killer killing
    bomb bombs grave graves gravestone tomb tombstone coffin cemetery zombie zombies blood bloody warfare
    gun guns pistol revolver rifle rifles weapon weapons knife knives sword swords dagger axe grenade
    missile missiles bullet bullets explosive explosives explosion nuclear atomic radiation radioactive
    biohazard hazard hazardous toxic poison poisonous corrosive danger dangerous warning caution syringe
    scalpel pills virus gallows noose reaper devil demon vampire ghost monster spider snake
    lightning storm tsunami flame flames sad cry crying angry prison handcuffs
""".split())


def _tokens(*texts: str) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


def _under(category: str, prefixes: Iterable[str]) -> bool:
    return any(category == p or category.startswith(p + "/") for p in prefixes)


def image_valence(category: str, keywords: tuple[str, ...], title: str) -> str | None:
    """``"grim"``, ``"cheerful"`` or None (unused) for one clip-art item; grim keywords override a cheerful folder."""
    category = category.replace("\\", "/").strip("/").lower()
    if _under(category, GRIM_CATEGORIES) or _tokens(title, *keywords) & GRIM_WORDS:
        return "grim"
    if _under(category, CHEERFUL_CATEGORIES):
        return "cheerful"
    return None


# --- text valence ----------------------------------------------------------------------------------

UPBEAT_PHRASES = (
    "best day ever", "living my best life", "so blessed right now", "happiest moment of my life",
    "life is good", "everything is awesome", "feeling great today", "pure joy", "love this so much",
    "my heart is full", "good vibes only", "this is amazing", "winning at life", "so proud of myself",
    "dreams do come true", "such a beautiful morning", "smiling all day", "grateful for everything",
    "today was perfect", "nailed it like a champion", "laughing so hard right now", "best friends forever",
    "the perfect weekend", "what a wonderful world", "happy happy joy joy", "feeling lucky",
    "the sun is shining and i am happy", "love my life", "this made my day so happy", "life is beautiful",
    "all smiles today", "my favourite thing ever is fun", "best surprise ever", "so excited for the weekend",
    "everything is going great", "only good news today", "the good times are here",
    "treat yourself you deserve it", "sweet victory", "celebrating the little wins",
    "fun with my favourite people", "dancing like nobody is watching", "positive energy all day",
    "feeling fantastic", "a perfect little treat", "happy friday everyone", "party time",
    "the best gift ever", "this is pure happiness", "so proud we did it",
)
GRIM_PHRASES = (
    "we are all going to die", "nothing matters we all die", "another day closer to death",
    "my will to live died today", "the void stares back and it hurts", "everything is pointless and sad",
    "life is suffering", "we are all doomed", "my dreams died long ago", "kill me now", "i am dead inside",
    "my own funeral", "the end is near and we all die", "existence is pain", "nobody will miss me",
    "just waiting for death", "hell is real and i live there", "everything hurts", "no hope left at all",
    "my soul died years ago", "pain is all i know", "the darkness is calling", "born to suffer",
    "regret is my middle name", "lonely forever", "we will all be forgotten", "sadness is my default",
    "my life is a disaster", "crying in the shower again", "doom is coming", "another funeral this week",
    "grief never ends", "this is my worst nightmare", "rotting away slowly in pain", "hopeless and broken",
    "my misery has company", "screaming into the void", "lost and miserable", "everyone dies alone",
    "decay is inevitable", "the tragedy of my life", "we are all victims", "trapped in eternal darkness",
    "pain is forever", "death comes for us all", "another day of despair", "killing me slowly",
    "hate everything about today", "cancelled my will to live", "the world is dead",
)
# Neutral first lines (VADER compound 0), shared by all splits: the valence is in the phrase.
SETUPS = (
    "when you", "me when", "my face when", "that moment when", "when you wake up and",
    "me on monday morning", "me explaining to my mom", "my brain at three am", "when the teacher says",
    "when your boss says", "me and the boys", "pov you just realised", "when the group chat says",
    "my cat every morning", "every single time", "me after one coffee", "when someone asks how i am",
    "when the wifi reconnects and", "me on the first day of school", "tell me why", "me checking my phone",
    "when the bill arrives", "my inner voice",
)
_SPLIT_SHARES = (0.7, 0.15, 0.15)


def _pool(text_valence: str) -> tuple[str, ...]:
    if text_valence == "upbeat":
        return UPBEAT_PHRASES
    if text_valence == "grim":
        return GRIM_PHRASES
    raise ValueError(f"unknown text valence {text_valence!r}; valid: {list(TEXT_VALENCES)}")


@lru_cache(maxsize=None)
def phrase_pool(text_valence: str, split: str) -> tuple[str, ...]:
    """The phrases of one valence reserved for one split; the three splits' pools are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    phrases = sorted(_pool(text_valence))
    random.Random(f"phrase-split:{text_valence}").shuffle(phrases)  # fixed: never reshuffle per seed
    n_train = round(_SPLIT_SHARES[0] * len(phrases))
    n_val = round(_SPLIT_SHARES[1] * len(phrases))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(phrases))}
    lo, hi = bounds[split]
    return tuple(phrases[lo:hi])


# --- rendering -------------------------------------------------------------------------------------

def find_font(font_path: str | os.PathLike | None = None) -> Path:
    """A bold sans font: ``font_path`` if given, else DejaVu Sans Bold from the system or matplotlib."""
    if font_path is not None:
        path = Path(font_path)
        if not path.is_file():
            raise FileNotFoundError(f"font file not found: {path}")
        return path
    tried = [Path(p) for p in FONT_CANDIDATES]
    try:
        import matplotlib

        tried.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf")
    except ImportError:
        pass
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "no DejaVu Sans Bold font found (tried: " + ", ".join(map(str, tried)) + "); "
        "install it with `apt-get install fonts-dejavu-core` or `pip install matplotlib`, or pass font_path="
    )


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _stroke(font_size: int) -> int:
    return max(1, (font_size + 6) // 12)  # outline ~1/12 of the font size, as in classic memes


def _wrap(words: list[str], font: ImageFont.FreeTypeFont, width: float) -> list[str] | None:
    """Greedy word wrap; None if a single word is wider than ``width``."""
    stroke = 2 * _stroke(font.size)
    lines: list[str] = []
    for word in words:
        if font.getlength(word) + stroke > width:
            return None
        if lines and font.getlength(lines[-1] + " " + word) + stroke <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _fit(text: str, font_path: str, width: float, height: float, start: int, smallest: int):
    """The largest font (down from ``start``) at which ``text`` wraps into ``width`` x ``height``."""
    words = text.split()
    for size in range(start, smallest - 1, -1):
        font = _font(font_path, size)
        lines = _wrap(words, font, width)
        if lines is not None and len(lines) * _line_height(font) <= height:
            return font, lines
    font = _font(font_path, smallest)  # still too long: split over-wide words, let the height overflow
    stroke = 2 * _stroke(font.size)
    pieces: list[str] = []
    for word in words:
        while len(word) > 1 and font.getlength(word) + stroke > width:
            cut = max(n for n in range(1, len(word)) if font.getlength(word[:n]) + stroke <= width or n == 1)
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
    return font, _wrap(pieces, font, width) or pieces


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + _stroke(font.size)


def render_meme(image: Image.Image, top: str = "", bottom: str = "", *,
                font_path: str | os.PathLike | None = None, size: int = 512) -> Image.Image:
    """Classic meme: ``image`` letterboxed on a white ``size`` x ``size`` square, captions in upper-case
    white DejaVu Sans Bold with a black outline, wrapped and shrunk to fit, at the top and bottom."""
    if size < 64:
        raise ValueError(f"meme size must be at least 64 px, got {size}")
    canvas = Image.new("RGB", (size, size), "white")
    picture = flatten_on_white(image)
    scale = size / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.Resampling.LANCZOS)
    canvas.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))

    font_file = str(find_font(font_path))
    draw = ImageDraw.Draw(canvas)
    margin = max(4, size // 32)
    for caption, at_top in ((top, True), (bottom, False)):
        caption = " ".join(caption.upper().split())
        if not caption:
            continue
        font, lines = _fit(caption, font_file, size - 2 * margin, 0.3 * size, start=size // 9,
                           smallest=max(8, size // 40))
        line_h = _line_height(font)
        y = margin if at_top else size - margin - len(lines) * line_h
        for line in lines:
            draw.text((size / 2, y), line, font=font, anchor="ma", fill="white",
                      stroke_width=_stroke(font.size), stroke_fill="black")
            y += line_h
    return canvas


# --- the labelled set ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemeSpec:
    item_id: str  # the meme's id: "<source item id>~<n>"
    image_path: Path  # the clip-art picture under the captions
    top: str  # upper-case, may be ""
    bottom: str
    text: str  # the overlaid text as OCR should read it: non-empty captions joined by "\n"
    label: str
    image_valence: str  # cheerful | grim
    text_valence: str  # upbeat | grim
    split: str  # train | val | test, the source item's split
    source_item_id: str = ""  # the clip-art item the picture comes from
    crop: tuple[float, float, float, float] | None = None  # (left, top, right, bottom) fractions of the picture
    mirror: bool = False  # flip the picture left-right before rendering
    register: str = ""  # v2: the caption's register (sincere | ironic | grim_joke | legacy_upbeat | legacy_grim)


def meme_text(top: str, bottom: str) -> str:
    """The canonical overlaid text: upper-case, single spaces, top and bottom joined by a newline."""
    parts = (" ".join(part.upper().split()) for part in (top, bottom))
    return "\n".join(p for p in parts if p)


def _cycled(pool: Sequence, n: int, rng: random.Random) -> list:
    """``n`` draws that use every element once per pass, reshuffled each pass."""
    out: list = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def compose_caption(phrase: str, rng: random.Random) -> tuple[str, str]:
    """(top, bottom) for one phrase: under a neutral set-up line (60 %), alone on top or alone at the bottom."""
    layout = rng.random()
    if layout < 0.6:
        return rng.choice(SETUPS).upper(), phrase.upper()
    if layout < 0.8:
        return phrase.upper(), ""
    return "", phrase.upper()


def build_meme_specs(items: Sequence[object], *, labels: Sequence[str] = LABELS, per_item: int = 2,
                     seed: int = 0) -> list[MemeSpec]:
    """Balanced, deterministic meme specs from clip-art items.

    ``items`` need ``item_id``, ``png_path``, ``category``, ``keywords``, ``title`` and ``split``.
    ``labels`` names the three classes in the order (congruent-cheerful, incongruent, congruent-grim).
    Each split gets about ``per_item`` memes per usable picture, half on each image valence, so the
    scarcer valence's pictures (grim clip art is rare) recur, each time under a different caption.
    A split without both image valences yields no memes.
    """
    labels = tuple(labels)
    if len(labels) != 3 or len(set(labels)) != 3:
        raise ValueError(f"labels must be three distinct names, got {labels!r}")
    if per_item < 1:
        raise ValueError(f"per_item must be >= 1, got {per_item}")
    by_split: dict[str, dict[str, list]] = {s: {v: [] for v in IMAGE_VALENCES} for s in SPLITS}
    for item in sorted(items, key=lambda it: str(it.item_id)):
        if item.split not in by_split:
            raise ValueError(f"item {item.item_id!r} has unknown split {item.split!r}; valid: {list(SPLITS)}")
        valence = image_valence(item.category, tuple(item.keywords), item.title)
        if valence is not None:
            by_split[item.split][valence].append(item)

    specs: list[MemeSpec] = []
    uses: dict[str, int] = {}
    for split in SPLITS:
        pictures = by_split[split]
        if not (pictures["cheerful"] and pictures["grim"]):
            continue
        usable = len(pictures["cheerful"]) + len(pictures["grim"])
        k = max(1, round(per_item * usable / 6))  # 6k memes: 3k per image valence, cells 2k:k:k:2k
        rng = random.Random(f"memes:{seed}:{split}")
        split_specs = []
        for image_v in IMAGE_VALENCES:
            chosen = _cycled(pictures[image_v], 3 * k, rng)
            text_vs = [t for t in TEXT_VALENCES for _ in range(_CELL_SHARE[(image_v, t)] * k)]
            rng.shuffle(text_vs)  # a recurring picture lands in both of its cells, so it can't fix the label
            for item, text_v in zip(chosen, text_vs):
                split_specs.append((item, image_v, text_v))
        rng.shuffle(split_specs)
        phrases = {t: _cycled(phrase_pool(t, split), len(split_specs), rng) for t in TEXT_VALENCES}
        for n, (item, image_v, text_v) in enumerate(split_specs):
            top, bottom = compose_caption(phrases[text_v][n], rng)
            source = str(item.item_id)
            uses[source] = uses.get(source, 0) + 1
            specs.append(MemeSpec(
                item_id=f"{source}~{uses[source] - 1}", image_path=Path(item.png_path), top=top, bottom=bottom,
                text=meme_text(top, bottom), label=labels[LABEL_OF[(image_v, text_v)]],
                image_valence=image_v, text_valence=text_v, split=split, source_item_id=source,
            ))
    return specs


def meme_filename(spec: MemeSpec, size: int) -> str:
    """File name that changes whenever what would be drawn changes, so stale renders are never reused."""
    key = (str(spec.image_path), spec.top, spec.bottom, size)
    if spec.crop is not None or spec.mirror:
        key += (spec.crop, spec.mirror)
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.item_id)[-60:]
    return f"{slug}-{digest}.png"


def render_meme_set(specs: Sequence[MemeSpec], out_dir: str | os.PathLike, *, size: int = 384,
                    font_path: str | os.PathLike | None = None) -> list[Path]:
    """Render every spec to ``out_dir`` (skipping files already there; atomic writes); paths in spec order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in specs:
        path = out / meme_filename(spec, size)
        if not path.exists():
            with Image.open(spec.image_path) as picture:
                meme = render_meme(_framed(picture, spec), spec.top, spec.bottom, font_path=font_path, size=size)
            fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".png")
            try:
                with os.fdopen(fd, "wb") as fh:
                    meme.save(fh, format="PNG")
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        paths.append(path)
    return paths


def _framed(picture: Image.Image, spec: MemeSpec) -> Image.Image:
    """The spec's crop and mirror of ``picture`` (unchanged when it has neither)."""
    if spec.crop is not None:
        w, h = picture.size
        l, t, r, b = spec.crop
        picture = picture.crop((round(l * w), round(t * h), max(round(l * w) + 1, round(r * w)),
                                max(round(t * h) + 1, round(b * h))))
    if spec.mirror:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return picture


# --- v2: compositional captions, photographic backgrounds ----------------------------------------------

GENERATOR_VERSION = "v2"  # bump whenever build_meme_specs_v2's output changes: renders go to memes-<version>

# Photographs shipped inside installed packages that are NOT the app's real-photo guard/eval photos
# (mmapp/assets/photos and the memes in tests/data/memes are made from those; china/flower/motorcycle_left
# and the other scikit-image photos there are excluded here). (package, relative path, split).
PHOTO_SOURCES = (
    ("gradio", "media_assets/images/cheetah.jpg", "train"),
    ("gradio", "media_assets/images/groot.jpeg", "train"),
    ("gradio", "media_assets/images/tower.jpg", "train"),
    ("gradio", "test_data/cheetah2.jpg", "train"),
    ("skimage", "data/horse.png", "train"),
    ("skimage", "data/cell.png", "train"),
    ("skimage", "data/phantom.png", "train"),
    ("skimage", "data/microaneurysms.png", "train"),
    ("skimage", "data/logo.png", "train"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png", "train"),
    ("skimage", "data/clock_motion.png", "val"),
    ("skimage", "data/color.png", "val"),
    ("skimage", "data/chessboard_RGB.png", "test"),
    ("skimage", "data/motorcycle_right.png", "test"),
)


def photo_backgrounds() -> list[tuple[str, Path, str]]:
    """(id, path, split) of the photographic backgrounds found in the installed packages (missing ones skipped)."""
    import importlib.util

    out = []
    for package, rel, split in PHOTO_SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if path.is_file():
            out.append((f"photo/{package}/{Path(rel).stem}", path, split))
    return out


# register -> label index (positive, sarcastic, dark humor); a sincere caption on a grim picture is ironic.
def label_v2(register: str, image_valence: str) -> int:
    if register in ("sincere", "legacy_upbeat"):
        return 1 if image_valence == "grim" else 0
    if register == "ironic":
        return 1
    if register in ("grim_joke", "legacy_grim"):
        return 2
    raise ValueError(f"unknown register {register!r}")


def build_meme_specs_v2(items: Sequence[object], *, labels: Sequence[str] = LABELS, per_split: dict | None = None,
                        photos: Sequence[tuple[str, Path, str]] | None = None, seed: int = 0) -> list[MemeSpec]:
    """The v2 labelled set: captions from :mod:`mmapp.data.meme_text` (sincere / ironic / grim-joke forms
    and topics, disjoint per split) plus the v1 phrase pools, on clip art and on photographs.

    Label = the caption's register, except that a sincere caption on a grim picture is sarcastic (the
    picture contradicts it). Per split, labels are balanced; half the pictures are photographs (random
    crops, mirrored half the time) when the split has any, the rest clip art; grim clip art carries all
    the "sincere on a grim picture" memes and a share of the ironic and grim-joke ones.
    """
    from mmapp.data import meme_text as captions

    labels = tuple(labels)
    if len(labels) != 3 or len(set(labels)) != 3:
        raise ValueError(f"labels must be three distinct names, got {labels!r}")
    per_split = per_split or {"train": 1800, "val": 300, "test": 300}
    photos = list(photo_backgrounds() if photos is None else photos)
    clip: dict[str, dict[str, list]] = {s: {v: [] for v in IMAGE_VALENCES} for s in SPLITS}
    for item in sorted(items, key=lambda it: str(it.item_id)):
        valence = image_valence(item.category, tuple(item.keywords), item.title)
        if valence is not None and item.split in clip:
            clip[item.split][valence].append(item)
    specs: list[MemeSpec] = []
    uses: dict[str, int] = {}
    for split in SPLITS:
        n = per_split.get(split, 0) // 3
        pics = clip[split]
        split_photos = [p for p in photos if p[2] == split]
        if n < 1 or not (pics["cheerful"] and pics["grim"]):
            continue
        rng = random.Random(f"memes-v2:{seed}:{split}")
        plan: list[tuple[str, str]] = []  # (register, background kind: cheerful | grim | photo)
        n_contradict = n // 4  # sarcastic by picture: sincere caption on grim clip art
        for label_index, count in ((0, n), (1, n), (2, n)):
            for i in range(count):
                if label_index == 1 and i < n_contradict:
                    plan.append((rng.choice(("sincere", "sincere", "sincere", "legacy_upbeat")), "grim"))
                    continue
                if label_index == 0:
                    register = "legacy_upbeat" if rng.random() < 0.15 else "sincere"
                elif label_index == 1:
                    register = "ironic"
                else:
                    register = "legacy_grim" if rng.random() < 0.15 else "grim_joke"
                r = rng.random()
                if split_photos and r < 0.5:
                    kind = "photo"
                elif label_index == 0 or r < 0.8:
                    kind = "cheerful"
                else:
                    kind = "grim"
                plan.append((register, kind))
        rng.shuffle(plan)
        for register, kind in plan:
            if register.startswith("legacy_"):
                phrase = rng.choice(phrase_pool("upbeat" if register == "legacy_upbeat" else "grim", split))
                top, bottom = compose_caption(phrase, rng)
            else:
                top, bottom = captions.generate_caption(register, split, rng)
            crop, mirror = None, False
            if kind == "photo":
                source, path, _ = rng.choice(split_photos)
                scale = rng.uniform(0.45, 1.0)
                x0, y0 = rng.uniform(0, 1 - scale), rng.uniform(0, 1 - scale)
                crop, mirror = (x0, y0, x0 + scale, y0 + scale), rng.random() < 0.5
                valence = "photo"
            else:
                item = rng.choice(pics[kind])
                source, path, valence = str(item.item_id), Path(item.png_path), kind
            uses[source] = uses.get(source, 0) + 1
            specs.append(MemeSpec(
                item_id=f"{source}~v2~{uses[source] - 1}", image_path=Path(path), top=top, bottom=bottom,
                text=meme_text(top, bottom), label=labels[label_v2(register, valence)], image_valence=valence,
                text_valence=register, split=split, source_item_id=source, crop=crop, mirror=mirror,
                register=register))
    return specs
