"""Caption wording: articles, Open Clip Art titles made into bank captions, WordNet groups, hedging,
the bank/ImageNet choice, and (with the real weights) served captions on real photos that never carry
catalogue fields."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmapp.captioning import (CATALOGUE_MARKERS, GUARD_EXTRA_PHOTOS_TSV, GUARD_PHOTOS_TSV, REPORT_PHOTOS_TSV,
                              BASIC_LEVEL, CaptionPolicy, PhraseSpace, article, bank_caption, bank_captions,
                              compose_caption, concepts, dominant_colour, imagenet_caption, mbr_concept,
                              picture_halves, posterior, QuotedWords, same_saying, taxonomy, template_caption, text_caption,
                              with_article)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("phrase, expected", [
    ("espresso", "an"), ("oscilloscope", "an"), ("apple", "an"), ("Egyptian Mau", "an"), ("hour", "an"),
    ("honest man", "an"), ("umbrella", "an"), ("unusual hat", "an"), ("X-ray", "an"), ("MRI", "an"),
    ("barbell", "a"), ("unicorn", "a"), ("uniform", "a"), ("European robin", "a"), ("one-piece", "a"),
    ("ukulele", "a"), ("USB", "a"), ("usb memory stick", "a"), ("T-shirt", "a"), ("house", "a"),
])
def test_article_follows_the_sound(phrase, expected):
    assert article(phrase) == expected


def test_plurals_and_mass_nouns_take_no_article():
    assert with_article("binoculars") == "binoculars"
    assert with_article("wool") == "wool"
    assert with_article("tree branches and roots") == "tree branches and roots"
    assert with_article("hippopotamus") == "a hippopotamus"
    assert template_caption("espresso") == "a photo of an espresso."
    with pytest.raises(ValueError, match="phrase"):
        article("  ")


VOCAB = frozenset("rooster bird cycles croatia bar barber shop sea horse snow man peach dall sheep ram "
                  "for sale sign template memory stick usb traffic light green".split())


@pytest.mark.parametrize("title, category, expected", [
    ("rooster", "animals/birds", "a rooster"),
    ("croatia", "signs_and_symbols/flags/europe", "the flag of croatia"),
    ("cycles", "transportation/roadsigns", "a road sign for cycles"),
    ("aiga barber shop", "signs_and_symbols/map_symbols", "a map symbol for barber shop"),
    ("lucertola maya", "animals", "an animal"),  # not English: the folder says what it is
    ("seahorse", "animals/fish", "a seahorse"),  # two known words glued
    ("peach simple bw", "food/fruit", "a peach"),  # style words dropped
    ("ape miele", "unsorted", ""),
])
def test_bank_caption_reads_like_a_caption(title, category, expected):
    assert bank_caption(title, category, vocab=VOCAB) == expected


def test_bank_captions_never_carry_catalogue_fields():
    items = [{"title": "ladybug", "category": "animals/bugs"},
             {"title": "hummer. tags: vehicle", "category": "transportation/vehicles/hummers"},
             {"title": "soccer ball, sport. tags: toy", "category": "recreation/toys"},
             {"title": "keywords: thing", "category": ""}, {"title": "ladybug", "category": "animals/bugs"}]
    bank = bank_captions(items)
    assert bank and all(src == "bank" for _, src in bank)
    assert len({t for t, _ in bank}) == len(bank)  # duplicates removed
    for text, _ in bank:
        assert not CATALOGUE_MARKERS.search(text) and "tags" not in text, text


@pytest.mark.corpus
def test_the_whole_openclipart_bank_is_clean():
    from mmapp.config import load_config
    from mmapp.pipeline import bank_from_items

    config = load_config()
    if not (config.paths.dataset() / "items.jsonl").is_file():
        pytest.skip("no imported Open Clip Art corpus")
    bank = bank_from_items(config)
    assert len(bank) > 500
    bad = [t for t, _ in bank if CATALOGUE_MARKERS.search(t) or ". " in t]
    assert not bad, bad[:10]


def _probs(weights: dict[str, float]) -> np.ndarray:
    """(1000,) probabilities: ``weights`` by class name, what they leave spread over all other classes."""
    names = list(taxonomy().names)
    rest = max(0.0, 1.0 - sum(weights.values()))
    p = np.full(1000, rest / (1000 - len(weights)) + 1e-9)
    for name, w in weights.items():
        p[names.index(name)] = w
    return p / p.sum()


def test_breeds_fall_back_to_their_basic_level_group():
    policy = CaptionPolicy()
    found = concepts(_probs({"Egyptian Mau": 0.36, "tiger cat": 0.27, "tabby cat": 0.25, "plastic bag": 0.12}), policy)
    assert found[0].phrase == "cat" and found[0].mass == pytest.approx(0.88, abs=0.01)
    assert found[1].phrase == "plastic bag"  # another cat breed is not a second concept
    sure = concepts(_probs({"tabby cat": 0.9, "tiger cat": 0.1}), policy)
    assert sure[0].phrase == "tabby cat"


def test_unsure_captions_say_so_and_offer_an_alternative():
    words = imagenet_caption(_probs({"barbell": 0.15, "drumstick": 0.1, "dumbbell": 0.08}),
                             None, CaptionPolicy())
    assert words.hedged and words.caption.startswith("possibly a barbell or a")
    confident = imagenet_caption(_probs({"espresso": 0.9, "tea cup": 0.1}), None, CaptionPolicy())
    assert not confident.hedged and confident.caption == "a photo of an espresso."


def test_a_second_concept_comes_from_one_half_of_the_picture():
    whole = _probs({"wine bottle": 0.7, "red wine": 0.3})
    halves = np.stack([_probs({"wine bottle": 0.9, "red wine": 0.1}), _probs({"drum": 0.8, "wine bottle": 0.2})])
    words = imagenet_caption(whole, None, CaptionPolicy(), part_probs=lambda: halves)
    assert words.source == "composed" and words.caption == "a photo of a wine bottle and a drum."
    same_kind = np.stack([_probs({"Egyptian Mau": 0.9, "tabby cat": 0.1})] * 2)
    words = imagenet_caption(_probs({"tabby cat": 0.9, "tiger cat": 0.1}), None, CaptionPolicy(),
                             part_probs=lambda: same_kind)
    assert words.source == "imagenet"
    assert [h.size for h in picture_halves(Image.new("RGB", (100, 60)))] == [(50, 60), (50, 60)]


def test_the_bank_needs_a_clear_lead_and_corrections_win_ties():
    probs = _probs({"rooster": 0.8, "hen": 0.2})
    policy = CaptionPolicy(bank_margin=0.05)
    close = compose_caption(probs, None, bank_best=("a rooster crowing", "bank", 0.52), imagenet_best_score=0.5,
                            policy=policy)
    assert close.source == "imagenet"
    clear = compose_caption(probs, None, bank_best=("a rooster crowing", "bank", 0.6), imagenet_best_score=0.5,
                            policy=policy)
    assert clear.caption == "a rooster crowing" and clear.alternatives[0][0] == "a photo of a rooster."
    fixed = compose_caption(probs, None, bank_best=("my hen", "correction", 0.51), imagenet_best_score=0.5,
                            policy=policy)
    assert fixed.source == "correction"


def _toy_space() -> PhraseSpace:
    """Phrase embeddings with a known geometry: every class its own direction; the spaniels (and the
    dog group) share a 'dog' direction, so two spaniels are cos 0.61 apart and each is cos 0.78 from "dog"."""
    tax = taxonomy()
    dim = 1000 + len(tax.group_members) + 1
    dog_axis = dim - 1
    class_emb = np.zeros((1000, dim), dtype=np.float32)
    class_emb[np.arange(1000), np.arange(1000)] = 0.8
    spaniels = [i for i, n in enumerate(tax.names) if n.endswith("Spaniel")]
    class_emb[spaniels, dog_axis] = 1.0
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    groups = {}
    for j, g in enumerate(sorted(tax.group_members)):
        v = np.zeros(dim, dtype=np.float32)
        v[dog_axis if BASIC_LEVEL[g] == "dog" else 1000 + j] = 1.0
        groups[g] = v
    return PhraseSpace(class_emb, groups)


def test_mbr_names_what_sibling_guesses_share_and_keeps_a_confident_class():
    space, policy = _toy_space(), CaptionPolicy(mbr_temperature=1.0, mbr_top_k=10)
    spread = _probs({"Sussex Spaniel": 0.2, "Cocker Spaniel": 0.2, "Clumber Spaniel": 0.2, "English Springer Spaniel": 0.2})
    chosen, utility = mbr_concept(spread, space, policy)
    assert chosen.phrase == "dog" and chosen.group and utility == pytest.approx(0.78, abs=0.01)  # top-k renormalised
    sure = _probs({"Cocker Spaniel": 0.9, "Sussex Spaniel": 0.05})
    assert mbr_concept(sure, space, policy)[0].phrase == "Cocker Spaniel"  # the template when it is confident
    # a sharp posterior (small T) trusts the top guess; a flat one (large T) backs off to the group
    leaning = _probs({"Cocker Spaniel": 0.5, "Sussex Spaniel": 0.25, "Clumber Spaniel": 0.25})
    assert mbr_concept(leaning, space, CaptionPolicy(mbr_temperature=0.3))[0].phrase == "Cocker Spaniel"
    assert mbr_concept(leaning, space, CaptionPolicy(mbr_temperature=3.0))[0].phrase == "dog"
    words = imagenet_caption(spread, None, CaptionPolicy(mbr_temperature=1.0, hedge_below=0.0), space=space)
    assert words.caption == "a photo of a dog." and words.source == "imagenet"
    bank = np.zeros(space.class_emb.shape[1], dtype=np.float32)
    bank[space.class_emb.shape[1] - 1] = 1.0  # a bank caption that says "dog" as well as the group does
    chosen, _ = mbr_concept(sure, space, policy, extra=[("a spaniel puppy", bank)])
    assert chosen.phrase == "Cocker Spaniel"


def test_mbr_posterior_is_a_tempered_top_k():
    idx, w = posterior(_probs({"Cocker Spaniel": 0.6, "Sussex Spaniel": 0.3}), temperature=1.0, top_k=2)
    assert w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(2 / 3, abs=0.01) and len(idx) == 2
    flat = posterior(_probs({"Cocker Spaniel": 0.6, "Sussex Spaniel": 0.3}), temperature=1e6, top_k=2)[1]
    assert flat == pytest.approx([0.5, 0.5], abs=0.01)
    with pytest.raises(ValueError, match="temperature"):
        posterior(np.ones(1000) / 1000, temperature=0.0, top_k=3)


def test_ocr_runs_only_for_pictures_of_text():
    calls = []

    def read(until):
        calls.append(until)
        return "NO PARKING any time"

    assert text_caption(_probs({"rooster": 1.0}), read, CaptionPolicy()) is None and not calls
    said = text_caption(_probs({"street sign": 0.9, "pole": 0.1}), read, CaptionPolicy(ocr_max_words=3))
    assert said.caption == 'a sign that says "NO PARKING any…".'
    assert calls == [QuotedWords(3)]  # OCR may stop once it has more words than the caption quotes
    assert not QuotedWords(3)("NO PARKING any") and QuotedWords(3)("NO PARKING any time")
    assert QuotedWords(3)("- NO PARKING -- any") is False  # marks are not words


def test_dominant_colour_names_a_plain_picture():
    assert dominant_colour(Image.new("RGB", (64, 64), (220, 20, 30))) == ("red", 1.0)
    assert dominant_colour(Image.new("RGB", (64, 64), (128, 128, 128)))[0] == "grey"


def test_hypernym_asset_covers_every_class_and_every_group():
    data = json.loads((REPO / "mmapp" / "assets" / "imagenet_hypernyms.json").read_text())
    assert len(data["classes"]) == 1000
    assert set(BASIC_LEVEL) <= set(data["synsets"])


def test_photo_sets_exist_and_are_apart():
    guard = {line.split("\t")[0] for line in GUARD_PHOTOS_TSV.read_text().splitlines() if line and not line.startswith("#")}
    report = {line.split("\t")[0] for line in REPORT_PHOTOS_TSV.read_text().splitlines() if line and not line.startswith("#")}
    extra = {line.split("\t")[0] for line in GUARD_EXTRA_PHOTOS_TSV.read_text().splitlines() if line and not line.startswith("#")}
    assert len(report) >= 20 and not guard & report and not extra & report and not extra & guard
    assert all((GUARD_EXTRA_PHOTOS_TSV.parent / name).is_file() for name in extra)
    assert all((REPORT_PHOTOS_TSV.parent / name).is_file() for name in report)
    for name in report:
        with Image.open(REPORT_PHOTOS_TSV.parent / name) as im:
            assert max(im.size) <= 512


# ---- real weights --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from mmapp.config import load_config
    from mmapp.predictor import Predictor

    config = load_config(storage={"home": str(tmp_path_factory.mktemp("home"))})
    # A bank as the bootstrap corpus had it before: training captions with their keyword tags.
    raw = [("ladybug, an insect. tags: animal", "bank"), ("hummer. tags: vehicle", "bank"),
           ("soccer ball, sport. tags: toy", "bank"), ("tiger, a big cat. tags: animal, wild", "bank")]
    return Predictor.from_config(config, caption_bank=bank_captions(
        {"title": t.split(",")[0].split(".")[0], "category": ""} for t, _ in raw))


@pytest.mark.weights
@pytest.mark.parametrize("photo", ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "coins.jpg", "motorcycle.jpg"])
def test_served_captions_for_real_photos_carry_no_catalogue_fields(predictor, photo):
    from mmapp.imageio import load_image

    result = predictor.caption(load_image(GUARD_PHOTOS_TSV.parent / photo))
    offered = [result.caption] + [a for a, _ in result.alternatives]
    for text in offered:
        assert text and not CATALOGUE_MARKERS.search(text) and "tags" not in text, text
        assert " a a" not in f" {text}" and not any(f" a {v}" in f" {text}" for v in "aeio"), text
    assert len({same_saying(t) for t in offered}) == len(offered), offered  # no offer said twice
    assert 0.0 < result.confidence <= 1.0
    assert result.low_confidence == (result.low_confidence or result.caption.startswith("possibly"))
    assert result.timings_ms.get("compose", 0.0) >= 0.0


@pytest.mark.weights
def test_old_behaviour_flag_serves_the_top_bank_entry(predictor):
    from mmapp.imageio import load_image

    image = load_image(GUARD_PHOTOS_TSV.parent / "chelsea.jpg")
    predictor.compose_captions = False
    try:
        plain = predictor.caption(image)
    finally:
        predictor.compose_captions = True
    assert plain.source in ("bank", "imagenet") and plain.caption


@pytest.mark.weights
def test_mbr_with_the_served_text_tower_keeps_a_confident_class_and_the_group_rule_backs_off(predictor):
    space = predictor.phrase_space()  # the real MiniLM phrases
    mbr = CaptionPolicy(mbr_temperature=1.0)
    sure = _probs({"Cocker Spaniel": 0.85, "Sussex Spaniel": 0.1})
    assert mbr_concept(sure, space, mbr)[0].phrase == "Cocker Spaniel"
    words = compose_caption(sure, None, bank_best=None, imagenet_best_score=None, policy=mbr, phrase_space=space)
    assert words.caption == "a photo of a Cocker Spaniel."
    spread = _probs({"Sussex Spaniel": 0.22, "Cocker Spaniel": 0.2, "Clumber Spaniel": 0.18,
                     "English Springer Spaniel": 0.16, "Welsh Springer Spaniel": 0.14})
    # Measured: MiniLM puts "a photo of a Sussex Spaniel." nearer the other spaniel sentences than
    # "a photo of a dog.", so MBR names the most central breed, not the group; the served default
    # (mbr_temperature = 0) keeps the WordNet group rule, which does back off.
    assert not mbr_concept(spread, space, mbr)[0].group
    assert CaptionPolicy().mbr_temperature == 0
    assert compose_caption(spread, None, bank_best=None, imagenet_best_score=None,
                           phrase_space=space).caption == "a photo of a dog."


def test_same_saying_folds_the_frame_case_and_end_punctuation():
    assert same_saying("a photo of a bee.") == same_saying("A bee") == same_saying("a  bee!") == "a bee"
    assert same_saying("possibly a daisy or a bee.") != same_saying("a daisy")
