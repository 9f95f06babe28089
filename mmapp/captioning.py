"""Caption wording: readable ImageNet names with the right article, WordNet fallbacks when the breed
is unsure, composition of two confident concepts, text read by OCR, honest hedging, Open Clip Art
titles turned into bank captions, and the calibrated choice between the ImageNet wording and the
bank. (A colour attribute is here too, off by default: it did not help on the guard photos.)

Pure functions over class probabilities, served scores and pixels: no model loading, no UI, no
database. The predictor calls :func:`compose_caption`; the bank builder calls :func:`bank_caption`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np

from mmapp.config import ASSETS_DIR, DataConfig

_ASSETS = ASSETS_DIR
# The hand-captioned photos used for choices (the guard set) and the held-out ones captioned before any
# output was seen (reported, never used for choices): the config's defaults (data.guard_photos / report_photos).
GUARD_PHOTOS_TSV = DataConfig().guard_photos
REPORT_PHOTOS_TSV = DataConfig().report_photos
# More guard photos for caption choices only (benchmarks/caption_quality.py), not for the retrain gate or memes.
GUARD_EXTRA_PHOTOS_TSV = ASSETS_DIR / "photos_guard_extra" / "captions.tsv"
HYPERNYMS_JSON = _ASSETS / "imagenet_hypernyms.json"  # written by python -m mmapp.data.imagenet_hypernyms

# Fields of the Open Clip Art catalogue that must never reach a caption a person reads.
CATALOGUE_MARKERS = re.compile(r"\b(?:tags|keywords|category|categories|title|description)\s*:", re.I)

# ---- articles -----------------------------------------------------------------------------------

_DETERMINERS = frozenset("a an the this that these those some two three four five several many my your "
                         "his her its our their one no each every".split())
_INITIALISMS = frozenset("usb ufo usa uk un cd dvd tv pc lcd led gps atm sos mp3".split())  # spelled out
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
_YOU_SOUND = re.compile(r"^(?:u[bcdfgklmnprstvz][aeiouy](?<!un[aeou])|eu|ewe|once|one\b|one-)", re.I)


def article(phrase: str) -> str:
    """'a' or 'an' for ``phrase`` by sound: 'an espresso', 'a unicorn', 'an hour', 'an X-ray', 'an MRI'."""
    word = phrase.strip().split(" ", 1)[0] if phrase.strip() else ""
    if not word:
        raise ValueError(f"need a phrase to choose an article for, got {phrase!r}")
    head = word.split("-")[0]
    if (len(head) == 1 and head.isalpha() and "-" in word) or (word.isupper() and word.isalpha() and len(word) > 1):
        return "an" if head[0].lower() in "aefhilmnorsx" else "a"  # letters spelled out: an X-ray, a USB stick
    lower = word.lower()
    if lower in _INITIALISMS:
        return "an" if lower[0] in "aefhilmnorsx" else "a"
    if lower.startswith(_SILENT_H):
        return "an"
    if _YOU_SOUND.match(lower):
        return "a"
    return "an" if lower[0] in "aeiou" else "a"


# Mass nouns among the ImageNet names and bank titles: "a photo of wool", not "a photo of a wool".
_MASS_NOUNS = frozenset([
    "wool", "hay", "guacamole", "consomme", "carbonara", "dough", "eggnog", "broccoli", "lotion", "sunscreen",
    "chain mail", "red wine", "toilet paper", "sand", "grass", "water", "snow", "food", "furniture", "money",
    "music", "art", "jewelry", "clothing", "bread", "meat", "weather", "pantyhose", "electronics",
    "computer hardware"])


def is_plural_or_mass(phrase: str) -> bool:
    """Heuristic: phrases that take no indefinite article ('rows of coins', 'wool', 'binoculars')."""
    lower = " ".join(phrase.lower().split())
    words = lower.split()
    if not words:
        return False
    if words[0] in _DETERMINERS or " and " in f" {lower} " or lower in _MASS_NOUNS:
        return True
    last = words[-1]
    return (len(last) > 3 and last.endswith("s")
            and not last.endswith(("ss", "us", "is", "ys", "ics", "ops", "ois", "ous")))


def with_article(phrase: str) -> str:
    phrase = " ".join(phrase.split())
    if is_plural_or_mass(phrase):
        return phrase
    return f"{article(phrase)} {phrase}"


def same_saying(caption: str) -> str:
    """What a caption says, for telling offers apart: case, the "a photo of" frame and end punctuation
    folded ("a photo of a bee." and "A bee" say the same)."""
    text = " ".join(caption.casefold().split()).rstrip(".!? ")
    return text[len("a photo of "):] if text.startswith("a photo of ") else text


def template_caption(name: str) -> str:
    """The ImageNet template with the right article: 'a photo of an espresso.'"""
    return f"a photo of {with_article(name)}."


def readable_class_name(name: str) -> str:
    """A display name from an ImageNet clean name: asides and alternatives dropped."""
    special = {"tights for gymnastics, a one-piece leotard, or a sport jersey": "leotard",
               "fruiting spike of a cereal plant": "ear of corn", "traffic or street sign": "street sign",
               "red wolf or maned wolf": "red wolf", "handrail / baluster": "handrail",
               "vaulted or arched ceiling": "vaulted ceiling"}
    if name in special:
        return special[name]
    name = re.sub(r"\s*\([^)]*\)", "", name)
    name = re.split(r"\s+/\s+|\s+or\s+", name)[0]
    return " ".join(name.split())


# ---- WordNet groups ----------------------------------------------------------------------------

# Basic-level WordNet synsets a caption may fall back to, with the word shown ("a dog" when the
# breed is unsure). Keyed by WordNet 3.0 noun offset; anything more abstract is never shown.
BASIC_LEVEL: dict[str, str] = {
    "02084071": "dog", "02121620": "cat", "02127808": "big cat", "01503061": "bird", "01844917": "water bird",
    "02000954": "wading bird", "01816887": "parrot", "02512053": "fish", "01482330": "shark", "01726692": "snake",
    "01674464": "lizard", "01662784": "turtle", "01639765": "frog", "01629276": "salamander",
    "01772222": "spider", "02159955": "insect", "02274259": "butterfly", "02164464": "beetle",
    "01976957": "crab", "01940736": "shellfish", "02484322": "monkey", "02470325": "ape", "02329401": "rodent",
    "02355227": "squirrel", "02324045": "rabbit", "02131653": "bear", "02118333": "fox", "02114100": "wolf",
    "02374451": "horse", "02402425": "cow", "02411705": "sheep", "02416519": "goat", "02401031": "antelope",
    "02958343": "car", "04490091": "truck", "02858304": "boat", "04194289": "ship", "04530566": "boat",
    "02686568": "aircraft", "04468005": "train", "02834778": "bicycle",
    "03800933": "musical instrument", "04338517": "string instrument", "04586932": "wind instrument",
    "03915437": "drum", "03614532": "keyboard instrument",
    "07707451": "vegetable", "07705931": "fruit", "12992868": "mushroom", "07734744": "mushroom",
    "11669921": "flower", "02913152": "building", "04202417": "shop", "03405725": "piece of furniture",
    "04161981": "seat", "02876657": "bottle", "02883344": "box", "03082979": "computer", "04437953": "clock",
    "04451818": "tool", "04565375": "weapon", "02778669": "ball", "03497657": "hat", "03513137": "helmet",
    "03381126": "shoe", "04199027": "shoe", "03057021": "coat", "04370048": "sweater", "04197391": "shirt",
    "02773037": "bag", "04401088": "telephone", "03636248": "lamp", "03636649": "lamp",
    "03620052": "kitchen appliance", "03101986": "pot", "07557434": "dish", "02898711": "bridge",
    "09287968": "landscape",
}


@dataclass(frozen=True)
class _Taxonomy:
    names: tuple[str, ...]  # (1000,) readable class names
    groups: tuple[tuple[str, ...], ...]  # (1000,) basic-level offsets above each class, nearest first
    group_members: dict[str, np.ndarray]  # offset -> class indices under it
    chains: tuple[tuple[str, ...], ...]  # (1000,) every hypernym offset from the class up to the root

    def common_depth(self, a: int, b: int) -> int:
        """Depth below the WordNet root of the nearest hypernym classes ``a`` and ``b`` share
        (entity=1, ..., artifact=5, ..., building=8): deep means two views of one kind of thing."""
        shared = set(self.chains[b])
        for i, node in enumerate(self.chains[a]):
            if node in shared:
                return len(self.chains[a]) - i
        return 0


@lru_cache(maxsize=1)
def taxonomy() -> _Taxonomy:
    from mmapp.encoders.image import imagenet_class_names

    data = json.loads(HYPERNYMS_JSON.read_text())
    synsets = data["synsets"]
    names = tuple(readable_class_name(n) for n in imagenet_class_names())
    groups, members, chains = [], {}, []
    for idx in range(len(names)):
        basic, node = [], data["classes"][str(idx)]
        full = [node]
        node = synsets[node][1]
        while node:
            full.append(node)
            if node in BASIC_LEVEL:
                basic.append(node)
                members.setdefault(node, []).append(idx)
            node = synsets[node][1]
        groups.append(tuple(basic))
        chains.append(tuple(full))
    return _Taxonomy(names, tuple(groups), {k: np.array(v) for k, v in members.items()}, tuple(chains))


# ---- colour ------------------------------------------------------------------------------------

_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"),
         (340, "pink"), (361, "red"))


def dominant_colour(image, *, centre: float = 0.6) -> tuple[str, float]:
    """('red', share) for the most common named colour in the central ``centre`` of the picture.

    Saturated pixels are named by hue; the rest by lightness (white, grey, black). ``share`` is
    that colour's fraction of the central pixels."""
    from PIL import Image

    im = image.convert("RGB")
    im.thumbnail((96, 96), Image.Resampling.BILINEAR)
    w, h = im.size
    dx, dy = int(w * (1 - centre) / 2), int(h * (1 - centre) / 2)
    hsv = np.asarray(im.crop((dx, dy, w - dx, h - dy)).convert("HSV"), dtype=np.float32) / 255.0  # (h, w, 3)
    hue, sat, val = hsv[..., 0].ravel() * 360, hsv[..., 1].ravel(), hsv[..., 2].ravel()
    labels = np.empty(hue.shape, dtype=object)
    chromatic = (sat >= 0.35) & (val >= 0.25)
    edges = np.array([e for e, _ in _HUES])
    labels[chromatic] = np.array([n for _, n in _HUES], dtype=object)[np.searchsorted(edges, hue[chromatic], side="right")]
    dark = ~chromatic & (val < 0.2)
    light = ~chromatic & ~dark & (val > 0.8) & (sat < 0.15)
    labels[dark], labels[light] = "black", "white"
    labels[~chromatic & ~dark & ~light] = "grey"
    names, counts = np.unique(labels.astype(str), return_counts=True)
    best = int(counts.argmax())
    return str(names[best]), float(counts[best] / counts.sum())


# ---- composition -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionPolicy:
    """Knobs of the served wording; defaults chosen on the guard set (benchmarks/caption_quality.py --sweep)."""

    group_min: float = 0.5  # mass a basic-level group needs to be named instead of its top class ("a cat")
    group_ratio: float = 0.6  # ... and only while the top class holds less than this share of the group
    hedge_below: float = 0.2  # concept mass under which the caption says "possibly"
    hedge_when_served_unsure: bool = True  # also hedge when the served caption confidence is under its floor
    hedge_alternatives: int = 1  # other concepts a hedged caption offers ("possibly a daisy or a mushroom")
    part_min: float = 0.5  # mass a concept needs in one half of the picture to be composed in ("a X and a Y"; > 1: never)
    colour_min_share: float = 1.1  # share of the centre one colour needs to be named (> 1: never)
    mono_max_saturation: float = -1.0  # mean saturation under which the photo is called black and white (< 0: never)
    ocr_min: float = 0.3  # mass on text-bearing classes (website, street sign, menu...) that triggers OCR (> 1: never)
    ocr_max_words: int = 8  # words of the read text quoted in the caption
    bank_margin: float = 0.05  # served-score lead the best bank caption needs over the ImageNet wording
    photo_prefix: bool = True  # "a photo of a dog." rather than "a dog."
    mbr_temperature: float = 0.0  # > 0: minimum-Bayes-risk concept choice under the posterior p^(1/T) (0: the group_min rule; MBR tied it on the guard set and, with MiniLM cosines, rarely names the group)
    mbr_top_k: int = 10  # classes of the posterior the MBR choice weighs (their phrases and WordNet groups are the candidates)
    mbr_bank: int = 0  # best-scoring bank captions added to the MBR candidates (0: none)
    mbr_hedge: bool = False  # with MBR: hedge ("possibly A or B") when that sentence has the higher expected similarity, not by hedge_below


@dataclass(frozen=True)
class Concept:
    phrase: str  # "espresso", "cat"
    mass: float  # classifier probability behind it (a class, or the sum over a group)
    classes: frozenset[int]  # ImageNet indices it covers
    group: str = ""  # WordNet offset when the concept is a group


def concepts(class_probs: Sequence[float] | np.ndarray, policy: CaptionPolicy, *, limit: int = 3) -> list[Concept]:
    """The image's distinct concepts, most probable first: the nearest basic-level group when it holds
    enough mass and no single class dominates it ("a cat" over three cat breeds), else the class.
    Classes sharing a basic-level group with an earlier concept are not new concepts."""
    tax = taxonomy()
    p = np.asarray(class_probs, dtype=np.float64).ravel()  # (1000,)
    out: list[Concept] = []
    seen_groups: set[str] = set()
    for idx in np.argsort(-p)[:10].tolist():
        if any(idx in c.classes for c in out) or set(tax.groups[idx]) & seen_groups:
            continue
        concept = Concept(tax.names[idx], float(p[idx]), frozenset([idx]))
        for g in tax.groups[idx]:
            mass = float(p[tax.group_members[g]].sum())
            if mass >= policy.group_min and p[idx] < policy.group_ratio * mass:
                concept = Concept(BASIC_LEVEL[g], mass, frozenset(tax.group_members[g].tolist()), g)
                break
        out.append(concept)
        seen_groups |= set(tax.groups[idx])
        if len(out) == limit:
            break
    return out


# ---- minimum-Bayes-risk choice ---------------------------------------------------------------

def phrase_text(phrase: str) -> str:
    """The sentence a concept is embedded as, for MBR similarities: 'a photo of a dog.'"""
    return template_caption(phrase)


@dataclass(frozen=True)
class PhraseSpace:
    """Unit-norm text embeddings (the served MiniLM tower) of every class phrase and WordNet group
    phrase, so the MBR choice needs no encoding at caption time."""

    class_emb: np.ndarray  # (1000, D): phrase_text(readable class name)
    group_emb: dict[str, np.ndarray]  # basic-level offset -> (D,): phrase_text(BASIC_LEVEL word)
    embed: Callable[[list[str]], np.ndarray] | None = None  # the same tower, for sentences built at caption time

    @classmethod
    def build(cls, embed_texts: Callable[[list[str]], np.ndarray],
              embed: Callable[[list[str]], np.ndarray] | None = None) -> "PhraseSpace":
        """``embed_texts`` embeds the fixed phrases (may cache); ``embed`` (default: the same) the sentences
        built at caption time."""
        tax = taxonomy()
        offsets = sorted(tax.group_members)
        texts = [phrase_text(n) for n in tax.names] + [phrase_text(BASIC_LEVEL[g]) for g in offsets]
        emb = np.asarray(embed_texts(texts), dtype=np.float32)
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        n = len(tax.names)
        return cls(emb[:n], {g: emb[n + i] for i, g in enumerate(offsets)}, embed or embed_texts)


def expected_similarity(embs: np.ndarray, class_probs, space: PhraseSpace, policy: CaptionPolicy) -> np.ndarray:
    """(C,) sum_k p(k) * cos(candidate, phrase(k)) under the tempered top-k posterior; ``embs`` (C, D) rows."""
    idx, w = posterior(class_probs, temperature=policy.mbr_temperature, top_k=policy.mbr_top_k)
    embs = np.asarray(embs, dtype=np.float32)
    embs = embs / np.linalg.norm(embs, axis=1, keepdims=True).clip(1e-12)
    return (embs @ space.class_emb[idx].T) @ w


def posterior(class_probs, *, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, weights): the ``top_k`` most probable classes and p^(1/T) renormalised over them."""
    if temperature <= 0:
        raise ValueError(f"MBR temperature must be > 0, got {temperature}")
    p = np.asarray(class_probs, dtype=np.float64).ravel()
    idx = np.argsort(-p)[:top_k]
    logw = np.log(np.clip(p[idx], 1e-30, None)) / temperature
    w = np.exp(logw - logw.max())
    return idx, w / w.sum()


def mbr_concept(class_probs, space: PhraseSpace, policy: CaptionPolicy,
                extra: Sequence[tuple[str, np.ndarray]] = ()) -> tuple[Concept, float]:
    """The concept whose phrase has the highest expected similarity to the class phrases under the
    classifier's posterior: sum_k p(k) * cos(candidate, phrase(k)) (minimum Bayes risk, with
    1 - cosine as the loss). Candidates: each of the ``policy.mbr_top_k`` classes, their WordNet
    basic-level groups, and ``extra`` (phrase, unit embedding) pairs such as bank captions (a Concept
    with no classes). A confident top class is its own best candidate (the template); a posterior
    spread over siblings picks what they share ("a dog" over five spaniels)."""
    tax = taxonomy()
    p = np.asarray(class_probs, dtype=np.float64).ravel()
    idx, _ = posterior(p, temperature=policy.mbr_temperature, top_k=policy.mbr_top_k)
    cands: list[Concept] = []
    embs: list[np.ndarray] = []
    for i in idx.tolist():
        cands.append(Concept(tax.names[i], float(p[i]), frozenset([i])))
        embs.append(space.class_emb[i])
    for g in dict.fromkeys(g for i in idx.tolist() for g in tax.groups[i]):
        members = tax.group_members[g]
        cands.append(Concept(BASIC_LEVEL[g], float(p[members].sum()), frozenset(members.tolist()), g))
        embs.append(space.group_emb[g])
    for phrase, emb in extra:
        cands.append(Concept(phrase, float(p.max()), frozenset()))  # no classes: hedged by the top class's mass
        embs.append(np.asarray(emb, dtype=np.float32))
    utility = expected_similarity(np.stack(embs), p, space, policy)  # (C,)
    best = int(utility.argmax())
    return cands[best], float(utility[best])


def mean_saturation(image) -> float:
    from PIL import Image

    im = image.convert("RGB")
    im.thumbnail((64, 64), Image.Resampling.BILINEAR)
    return float(np.asarray(im.convert("HSV"), dtype=np.float32)[..., 1].mean() / 255.0)


@dataclass(frozen=True)
class ComposedCaption:
    caption: str
    source: str  # "imagenet" | "composed" | "ocr" | "bank" | "correction"
    confidence: float
    hedged: bool  # the wording says the model is unsure
    alternatives: list[tuple[str, float]] = field(default_factory=list)


def _phrase(concept: Concept, colour: str | None = None) -> str:
    return with_article(f"{colour} {concept.phrase}" if colour else concept.phrase)


def picture_halves(image) -> list:
    """The two halves of the picture along its long side (left/right or top/bottom), for composition."""
    w, h = image.size
    if w >= h:
        return [image.crop((0, 0, w // 2, h)), image.crop((w - w // 2, 0, w, h))]
    return [image.crop((0, 0, w, h // 2)), image.crop((0, h - h // 2, w, h))]


def _second_concept(first: Concept, part_probs: Callable[[], np.ndarray], policy: CaptionPolicy) -> Concept | None:
    """A concept one half of the picture shows with ``policy.part_min`` confidence that is not the first
    concept nor of its kind (no shared basic-level group, nearest shared hypernym no deeper than
    "instrumentality"): "a wine bottle and a drum", not "a beer bottle and a wine bottle"."""
    tax = taxonomy()
    first_groups = set().union(*(tax.groups[i] for i in first.classes)) if first.group == "" else {first.group}
    best = None
    for probs in part_probs():  # (2, 1000)
        for c in concepts(probs, policy, limit=1):
            idx = min(c.classes)
            if (c.mass >= policy.part_min and not (c.classes & first.classes) and not (set(tax.groups[idx]) & first_groups)
                    and tax.common_depth(min(first.classes), idx) <= 6 and (best is None or c.mass > best.mass)):
                best = c
    return best


def imagenet_caption(class_probs, image, policy: CaptionPolicy,
                     part_probs: Callable[[], np.ndarray] | None = None, *, unsure: bool = False,
                     space: PhraseSpace | None = None, extra: Sequence[tuple[str, np.ndarray]] = ()) -> ComposedCaption:
    """The ImageNet wording: the main concept, a second one seen in one half of the picture
    (``part_probs``: class probabilities of :func:`picture_halves`), hedged when the concept is weak
    or the caller says the served model is ``unsure`` (noise can look like fifty bird species).
    With ``policy.mbr_temperature`` > 0 and a ``space``, the main concept is the MBR choice
    (:func:`mbr_concept`, ``extra`` candidates included) instead of the group_min rule."""
    found = concepts(class_probs, policy)
    if not found:
        raise ValueError("no class probabilities to caption from")
    mbr_hedged = None
    if policy.mbr_temperature > 0 and space is not None:
        chosen, utility = mbr_concept(class_probs, space, policy, extra)
        found = [chosen] + [c for c in found if not (c.classes & chosen.classes) and c.phrase != chosen.phrase]
        if policy.mbr_hedge and space.embed is not None and len(found) > 1:
            pairs = [(found[0], other) for other in found[1:3]]
            sentences = [f"a photo of {_phrase(a)} or {_phrase(b)}." for a, b in pairs]
            pair_utility = expected_similarity(space.embed(sentences), class_probs, space, policy)
            best = int(pair_utility.argmax())
            mbr_hedged = bool(pair_utility[best] > utility)
            if mbr_hedged:
                found = [found[0], pairs[best][1]] + [c for c in found[1:] if c is not pairs[best][1]]
    first = found[0]
    hedged = (first.mass < policy.hedge_below if mbr_hedged is None else mbr_hedged) or unsure
    mono = image is not None and policy.mono_max_saturation >= 0 and mean_saturation(image) <= policy.mono_max_saturation
    colour = None
    if image is not None and not mono and not hedged and policy.colour_min_share <= 1.0:
        name, share = dominant_colour(image)
        if share >= policy.colour_min_share and name not in first.phrase:
            colour = name
    source = "imagenet" if first.classes else "bank"  # an MBR choice may be a bank caption
    if hedged:
        options = [_phrase(c) for c in found[:1 + policy.hedge_alternatives]]
        body = "possibly " + (" or ".join(options) if len(options) <= 2 else ", ".join(options[:-1]) + " or " + options[-1])
    else:
        body = _phrase(first, colour)
        second = _second_concept(first, part_probs, policy) \
            if part_probs is not None and policy.part_min <= 1 and first.classes else None
        if second is not None:
            body = f"{body} and {_phrase(second)}"
            source = "composed"
    if mono:
        text = f"a black and white photo of {body}." if not hedged else f"a black and white photo, {body}."
    elif policy.photo_prefix and not hedged:
        text = f"a photo of {body}."
    else:
        text = f"{body}."
    alternatives = [(template_caption(c.phrase), c.mass) for c in found[1:]]
    return ComposedCaption(text, source, first.mass, hedged, alternatives)


# ImageNet classes whose pictures carry text worth reading, and what to call the thing that says it.
TEXT_CLASSES: dict[int, str] = {
    916: "a page of text", 922: "a menu", 921: "a book cover", 917: "a comic book", 918: "a crossword",
    549: "an envelope", 692: "a package", 446: "a binder", 919: "a sign", 458: "a plaque", 781: "a scoreboard",
}
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]+|\d+")


@dataclass(frozen=True)
class QuotedWords:
    """OCR may stop once the text holds more than ``n`` words: a caption quotes ``n`` and marks the rest
    with "…", so the lines after that never change it (``Towers.read_text(image, until=...)``)."""

    n: int

    @property
    def key(self) -> str:
        return f"first{self.n}words"

    def __call__(self, text: str) -> bool:
        return len(_WORD.findall(text)) > self.n


def text_caption(class_probs, read_text: Callable[[QuotedWords], str], policy: CaptionPolicy) -> ComposedCaption | None:
    """'a sign that says "no parking"' when the classifier puts ``policy.ocr_min`` on text-bearing
    classes and OCR reads at least two words; OCR runs only then (it costs seconds), and only as far
    as the quote needs (``read_text(QuotedWords(n))``)."""
    p = np.asarray(class_probs, dtype=np.float64).ravel()
    idx = np.array(list(TEXT_CLASSES))
    mass = float(p[idx].sum())
    if mass < policy.ocr_min:
        return None
    words = _WORD.findall(read_text(QuotedWords(policy.ocr_max_words)) or "")
    if sum(len(w) >= 3 for w in words) < 2:
        return None
    quoted = " ".join(words[:policy.ocr_max_words]) + ("…" if len(words) > policy.ocr_max_words else "")
    thing = TEXT_CLASSES[int(idx[p[idx].argmax()])]
    return ComposedCaption(f'{thing} that says "{quoted}".', "ocr", mass, False)


def compose_caption(class_probs, image, *, bank_best: tuple[str, str, float] | None,
                    imagenet_best_score: float | None, policy: CaptionPolicy = CaptionPolicy(),
                    bank_confidence: float = 0.0, served_confidence_low: bool = False,
                    read_text: Callable[[QuotedWords], str] | None = None,
                    part_probs: Callable[[], np.ndarray] | None = None,
                    phrase_space: PhraseSpace | None = None,
                    mbr_extra: Sequence[tuple[str, np.ndarray]] = ()) -> ComposedCaption:
    """Choose between the ImageNet wording and the best bank caption, calibrated on served scores.

    ``bank_best`` is (text, source, served score) of the best non-template bank entry;
    ``imagenet_best_score`` the served score of the best ImageNet template. The bank wins only with a
    lead of ``policy.bank_margin``; a user's correction that scores best is always kept. With
    ``read_text`` (an OCR call), pictures of text are captioned by what they say (:func:`text_caption`)."""
    wording = imagenet_caption(class_probs, image, policy, part_probs,
                               unsure=served_confidence_low and policy.hedge_when_served_unsure,
                               space=phrase_space, extra=mbr_extra)
    if read_text is not None:
        said = text_caption(class_probs, read_text, policy)
        if said is not None:
            return dataclasses.replace(said, alternatives=[(wording.caption, wording.confidence)] + wording.alternatives)
    if bank_best is not None:
        text, source, score = bank_best
        lead = score - (imagenet_best_score if imagenet_best_score is not None else -np.inf)
        if lead >= policy.bank_margin or (source == "correction" and lead >= 0):
            return ComposedCaption(text, source, bank_confidence, False,
                                   [(wording.caption, wording.confidence)] + wording.alternatives)
    return wording


# ---- Open Clip Art titles -> bank captions ---------------------------------------------------

# Category phrases (mmapp.data.openclipart.CATEGORY_PHRASES values) whose drawings are symbols of
# something: the title says what the symbol is for.
_SYMBOL_PHRASES = frozenset({"a sign", "a road sign", "a map symbol", "a hazard sign", "a travel sign",
                             "a disability sign", "an arrow", "a speech bubble", "a logo", "an icon",
                             "a flowchart symbol", "a button", "a folder icon"})
_TITLE_PREFIXES = re.compile(r"^(?:aiga|nps|usgs|dtp|icon|ikon)\s+", re.I)
# Words about the drawing's style or file rather than what it shows.
_STYLE_WORDS = re.compile(r"\b(?:simple|bw|b w|colou?red|colou?r|remix|version|v\d+|clipart|clip art|"
                          r"lineart|line art|icon|vector|svg|png)\b", re.I)


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Whole words of the MiniLM WordPiece vocabulary: titles in other languages ("lucertola maya")
    split into pieces, so this tells English titles from the rest well enough for a bank."""
    try:
        from mmapp.encoders.text import minilm_model_dir

        vocab = (minilm_model_dir() / "vocab.txt").read_text(encoding="utf-8").split()
    except (ImportError, OSError):
        return frozenset()
    return frozenset(w for w in vocab if w.isalpha() and len(w) > 1)


def _is_english(words: Iterable[str], vocab: frozenset[str]) -> bool:
    if not vocab:
        return True  # no vocabulary to judge by: keep the title
    def known(w: str) -> bool:
        if w in vocab or (w.endswith("s") and w[:-1] in vocab) or (w.endswith("es") and w[:-2] in vocab):
            return True
        return any(w[:i] in vocab and w[i:] in vocab for i in range(3, len(w) - 2))  # seahorse, snowman
    return all(known(w) for w in words if w.isalpha() and len(w) > 2)


def bank_caption(title: str, category: str, *, vocab: frozenset[str] | None = None) -> str:
    """A caption a person can read, from an Open Clip Art item's cleaned title and folder:
    'rooster' -> 'a rooster', flags -> 'the flag of croatia', signs -> 'a road sign for cycles'.
    Titles not in English fall back to the folder's phrase ('a fish'); '' when nothing is left.
    Never carries catalogue fields (tags, keywords)."""
    from mmapp.data.openclipart import category_phrase

    vocab = english_words() if vocab is None else vocab
    title = _TITLE_PREFIXES.sub("", " ".join(title.lower().split()))
    title = CATALOGUE_MARKERS.split(title)[0]
    title = " ".join(_STYLE_WORDS.sub(" ", title).split()).strip(" ,.;:-")
    phrase = category_phrase(category)
    words = title.split()
    if not words or not _is_english(words, vocab):
        return phrase if phrase and phrase not in {"computer", "geography", "education", "office", "art",
                                                   "science", "religion", "music", "sport"} else ""
    if phrase == "a flag" and "flag" not in words:
        return f"the flag of {title}"
    if phrase in _SYMBOL_PHRASES and not set(phrase.split()[1:]) & set(words):
        return f"{phrase} for {title}"
    return with_article(title)


def bank_captions(items: Iterable[dict]) -> list[tuple[str, str]]:
    """(caption, 'bank') pairs for items of ``items.jsonl`` (title, category), duplicates removed."""
    seen: dict[str, None] = {}
    vocab = english_words()
    for item in items:
        text = bank_caption(item.get("title", ""), item.get("category", ""), vocab=vocab)
        if text:
            seen.setdefault(text, None)
    return [(t, "bank") for t in seen]
