"""The generative captioner: a tiny BLIP (random init, then taught one caption of the shapes world)
saved as a local folder loads, generates greedy and beam captions, and the predictor serves it first
with the bank's matches beside it; a missing folder is a fast, clear error."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmapp.captioner import GenerativeCaptioner
from mmapp.config import load_config
from mmapp.data.shapes import all_scenes, render_scene
from mmapp.device import resolve_placement
from mmapp.predictor import generative_captioner

CPU = resolve_placement("cpu")
SCENE = all_scenes()[0]
WORDS = sorted(set(SCENE.caption.split()) | {"blue", "green", "triangle"})


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def save_tiny_blip(folder: Path) -> Path:
    """A tiny BLIP + processor taught to say SCENE's caption, saved under ``folder/model``."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    assert tokenizer.unk_token_id not in tokenizer(SCENE.caption).input_ids
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": tokenizer.vocab_size, "encoder_hidden_size": 32, "bos_token_id": tokenizer.cls_token_id,
                     "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    # teach it one caption (a few dozen steps): generation must then say exactly that
    batch = processor(images=[render_scene(SCENE)], text=[SCENE.caption], return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = folder / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_a_missing_folder_is_a_fast_clear_error(tmp_path):
    for path in ("", tmp_path / "nothing-here"):
        with pytest.raises(FileNotFoundError, match="huggingface-cli download .*MMAPP__MODEL__CAPTIONER_PATH"):
            GenerativeCaptioner(path, placement=CPU)
    config = load_config("blip", env={})  # the blip profile, with no folder configured
    assert config.model.captioner == "hf" and config.model.image_encoder == "efficientnet-lite0"
    with pytest.raises(FileNotFoundError, match="captioner_path is empty"):
        generative_captioner(config)
    with pytest.raises(ValueError, match="unknown model.captioner"):
        generative_captioner(load_config("offline", env={"MMAPP__MODEL__CAPTIONER": "magic"}))
    assert generative_captioner(load_config("offline", env={})) is None


def test_the_tiny_captioner_says_what_it_was_taught_greedy_and_beam(tiny_blip):
    picture = render_scene(SCENE)
    greedy = GenerativeCaptioner(tiny_blip, placement=CPU, max_new_tokens=16).generate([picture])[0]
    assert greedy.text == SCENE.caption and 0.5 < greedy.confidence <= 1.0
    beam = GenerativeCaptioner(tiny_blip, placement=CPU, max_new_tokens=16, num_beams=3).generate([picture])[0]
    assert beam.text == SCENE.caption
    short = GenerativeCaptioner(tiny_blip, placement=CPU, max_new_tokens=2).generate([picture])[0]
    assert short.text == " ".join(SCENE.caption.split()[:2])  # the token budget is respected


@pytest.mark.weights
def test_the_predictor_serves_the_generated_caption_first(tiny_blip, tmp_path):
    from mmapp.imageio import load_image
    from mmapp.model_store import BRIDGE
    from mmapp.predictor import Predictor

    config = load_config("blip", env={"MMAPP__MODEL__CAPTIONER_PATH": str(tiny_blip), "MMAPP__MODEL__DEVICE": "cpu",
                                      "MMAPP_HOME": str(tmp_path)})
    bank = [("a red circle", "bank"), ("a photo of a dog", "bank"), ("a blue square", "bank")]
    predictor = Predictor.from_config(config, version=BRIDGE, caption_bank=bank)
    picture = tmp_path / "scene.png"
    render_scene(SCENE).save(picture)
    result = predictor.caption(load_image(str(picture)), k=3)
    assert result.caption == SCENE.caption and result.source == "generated"
    # beside it: the bank's best matches, best first (the retrieval answer is still there)
    assert len(result.alternatives) == 3 and all(t in predictor._bank_texts for t, _ in result.alternatives)
    assert [p for _, p in result.alternatives] == sorted((p for _, p in result.alternatives), reverse=True)
    assert "generate" in result.timings_ms


def test_a_hub_id_loads_from_the_local_hub_cache_and_fails_fast_offline_without_it(tiny_blip, tmp_path, monkeypatch):
    """``model.captioner_path: hub:<repo id>`` resolves through huggingface_hub: offline with nothing
    cached it is a fast clear error; a snapshot in the cache (what a first online start leaves) loads."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="could not get the captioner 'mmapp/tiny-shapes'.*huggingface-cli download"):
        GenerativeCaptioner("hub:mmapp/tiny-shapes", placement=CPU)
    assert time.perf_counter() - started < 10
    repo = tmp_path / "hub" / "models--mmapp--tiny-shapes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_blip, repo / "snapshots" / ("0" * 40))
    captioner = GenerativeCaptioner("hub:mmapp/tiny-shapes", placement=CPU)
    assert captioner.path == repo / "snapshots" / ("0" * 40)
    assert captioner.generate([render_scene(SCENE)])[0].text
