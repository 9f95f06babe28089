"""Predictor and CLI on the real packaged weights: bridge captioning, meme analysis with ablation,
and the real ``python -m mmapp`` entry point on the hand-captioned photos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmapp.config import load_config
from mmapp.fusion import FusionConfig, create_fusion_head
from mmapp.imageio import load_image
from mmapp.model_store import ModelStore, VersionMeta
from mmapp.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "mmapp" / "assets" / "photos"
BANK = [("a tabby cat with green eyes", "bank"), ("a cup of espresso on a saucer", "bank"),
        ("a red motorcycle in a garage", "bank"), ("a rocket on a launch pad", "bank")]

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = load_config(storage={"home": str(home)})
    return Predictor.from_config(config, caption_bank=BANK)


@pytest.mark.parametrize("photo, words", [("chelsea.jpg", ("cat",)), ("coffee.jpg", ("espresso",)),
                                          ("motorcycle.jpg", ("motorcycle", "moped", "scooter")),
                                          ("rocket.jpg", ("rocket", "missile"))])
def test_bridge_captions_photos_from_the_bank(predictor, photo, words):
    result = predictor.caption(load_image(PHOTOS / photo))
    texts = [result.caption] + [a for a, _ in result.alternatives]
    assert any(w in t for t in texts[:2] for w in words), texts  # bank + ImageNet templates compete
    assert 0.0 < result.confidence <= 1.0 and result.model_version == "bridge"
    assert result.embedding_ref.startswith("efficientnet-lite0@")


def test_a_match_to_nothing_is_flagged_low_confidence(predictor):
    import io

    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    weak = predictor.caption(load_image(buf.getvalue()))
    strong = predictor.caption(load_image(PHOTOS / "chelsea.jpg"))
    assert weak.low_confidence and weak.confidence < strong.confidence


def test_meme_analysis_with_each_ablation(predictor):
    torch.manual_seed(0)
    fcfg = FusionConfig(image_dim=1280, text_dim=384, num_labels=3)
    head = create_fusion_head("concat", fcfg).eval()
    store: ModelStore = predictor.store
    space = predictor.towers.bridge_space()
    store.save("tiny", space, meta=VersionMeta(labels=("positive", "sarcastic", "dark humor"),
                                               encoders=predictor.embedder.identity),
               fusion_head=head, fusion_config=fcfg, fusion_name="concat")
    predictor.load_version("tiny")
    image = load_image(PHOTOS / "chelsea.jpg")
    fused = predictor.analyze_meme(image, "best day ever")
    no_text = predictor.analyze_meme(image, "best day ever", ablate="text")
    no_image = predictor.analyze_meme(image, "best day ever", ablate="image")
    assert set(fused.fused) == {"positive", "sarcastic", "dark humor"}
    assert abs(sum(fused.fused.values()) - 1) < 1e-5
    assert no_text.label == max(fused.image_only, key=fused.image_only.get)
    assert no_image.label == max(fused.text_only, key=fused.text_only.get)
    assert fused.fused != fused.image_only != fused.text_only
    with pytest.raises(ValueError, match="ablate"):
        predictor.analyze_meme(image, "x", ablate="audio")
    predictor.load_version("bridge")


def test_a_version_records_its_meme_text_features_and_older_ones_still_serve(predictor):
    from mmapp.text_features import N_EXTRA, VADER_V1

    torch.manual_seed(0)
    store: ModelStore = predictor.store
    space = predictor.towers.bridge_space()
    fcfg = FusionConfig(image_dim=1280, text_dim=384 + N_EXTRA, num_labels=3)
    store.save("tiny-vader", space, meta=VersionMeta(labels=("positive", "sarcastic", "dark humor"),
                                                     encoders=predictor.embedder.identity,
                                                     meme_text_features=VADER_V1),
               fusion_head=create_fusion_head("concat", fcfg).eval(), fusion_config=fcfg, fusion_name="concat")
    image = load_image(PHOTOS / "chelsea.jpg")
    predictor.load_version("tiny-vader")
    res = predictor.analyze_meme(image, "I JUST LOVE\nDOING THE DISHES")
    assert abs(sum(res.fused.values()) - 1) < 1e-5 and res.text_only
    predictor.load_version("tiny")  # made without the field: reads the embedding alone, as before
    assert predictor._model.meta.meme_text_features == ""
    assert predictor.analyze_meme(image, "I JUST LOVE\nDOING THE DISHES").fused
    predictor.load_version("bridge")


def run_cli(*args, home: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "mmapp", "--home", str(home), *args, "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)  # the whole of stdout is one JSON document: `| jq` works


def test_cli_eval_retrieval_bridge_on_real_photos_beats_chance(tmp_path):
    report = run_cli("eval-retrieval", "--pairs", str(PHOTOS / "captions.tsv"), "--model", "bridge",
                     "--bootstrap", "200", home=tmp_path)
    for direction in ("image_to_text", "text_to_image"):
        d = report[direction]
        assert d["n_queries"] == 24 and d["R@1"] > 4 * d["chance_R@1"]
        assert d["R@1_ci"][0] <= d["R@1"] <= d["R@1_ci"][1]


def test_cli_eval_retrieval_native_is_refused_for_towers_without_a_shared_space(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmapp", "--home", str(tmp_path), "eval-retrieval", "--pairs",
                          str(PHOTOS / "captions.tsv"), "--model", "native"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0 and "needs pre-aligned towers" in out.stderr and "use 'bridge'" in out.stderr


def test_cli_caption_json_is_the_only_thing_on_stdout(tmp_path):
    result = run_cli("caption", str(PHOTOS / "chelsea.jpg"), home=tmp_path)
    assert result["caption"] and "tags:" not in result["caption"] and result["model_version"] == "bridge"


def test_cli_reports_a_tsv_line_without_tab(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("chelsea.jpg a cat without a tab\n")
    out = subprocess.run([sys.executable, "-m", "mmapp", "--home", str(tmp_path), "embed", "--pairs", str(bad)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "bad.tsv:1" in out.stderr


def test_corrections_join_the_caption_bank_once_in_one_batch(predictor):
    before = len(predictor._bank_texts)
    added = "a  photo of a bell tower on a hill"  # what the bridge sees in the temple photo
    predictor.add_to_caption_bank([(added, "correction"), (" ".join(added.split()), "correction"), (BANK[0][0], "x")])
    assert len(predictor._bank_texts) == before + 1 and predictor._bank_raw.shape[0] == before + 1
    assert all(v.shape[0] == before + 1 for v in predictor._bank_views.values())
    result = predictor.caption(load_image(PHOTOS / "temple.jpg"))
    assert " ".join(added.split()) in [result.caption] + [a for a, _ in result.alternatives]
