"""Encoders: factory behaviour, real packaged weights (marker ``weights``), open_clip round trip, mpnet reassembly."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmapp.device import resolve_placement
from mmapp.encoders import EncoderOptions, create_encoder, list_encoders
from mmapp.encoders.image import imagenet_class_names
from mmapp.encoders.text import reassemble_split_zip

CPU = resolve_placement("cpu")


def options(tmp_path: Path, **kw) -> EncoderOptions:
    return EncoderOptions(placement=CPU, cache_dir=tmp_path, **kw)


def test_factory_lists_and_rejects_unknown(tmp_path):
    assert "efficientnet-lite0" in list_encoders("image")
    assert "minilm" in list_encoders("text")
    assert list_encoders("ocr") == ["rapidocr"]
    with pytest.raises(ValueError, match="valid: .*efficientnet-lite0"):
        create_encoder("resnet-9000", options(tmp_path))
    with pytest.raises(ValueError, match="is a text encoder, not image"):
        create_encoder("minilm", options(tmp_path), kind="image")


def test_class_names_are_unique_and_readable():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert "tiger cat" in names and "espresso" in names


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory):
    return create_encoder("efficientnet-lite0", options(tmp_path_factory.mktemp("c")), kind="image")


@pytest.mark.weights
@pytest.mark.parametrize("photo, expected", [
    ("chelsea", {"tabby cat", "tiger cat", "Egyptian Mau", "lynx", "Persian cat"}),
    ("coffee", {"espresso", "tea cup", "coffee mug", "cup"}),
])
def test_efficientnet_puts_sample_photos_in_the_right_classes(efficientnet, photo, expected):
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, photo)())
    out = efficientnet.encode([image])
    assert out.features.shape == (1, 1280) and out.class_probs.shape == (1, 1000)
    names = imagenet_class_names()
    top3 = {names[i] for i in out.class_probs[0].topk(3).indices.tolist()}
    assert top3 <= expected | top3 and len(top3 & expected) >= 2, top3
    assert not any(p.requires_grad for p in efficientnet.model.parameters())
    assert efficientnet.identity.startswith("efficientnet-lite0@")


@pytest.mark.weights
def test_efficientnet_batched_equals_one_at_a_time(efficientnet):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64 + 8 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    batched = efficientnet.encode(images).features
    single = torch.cat([efficientnet.encode([im]).features for im in images])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


@pytest.mark.weights
def test_minilm_embeds_related_captions_closer(tmp_path):
    enc = create_encoder("minilm", options(tmp_path), kind="text")
    e = enc.encode(["a cat sleeping on a sofa", "a kitten napping on a couch", "a red sports car"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    assert enc.identity.startswith("minilm@")


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_random_init_saved_to_local_dir_loads_back_identical(tmp_path):
    import open_clip

    from mmapp.encoders.openclip import OpenCLIPBackbone, save_local_dir

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    folder = save_local_dir(model, TINY_CLIP, tmp_path / "tiny-clip")
    backbone = OpenCLIPBackbone("unused", f"local-dir:{folder}", placement=CPU)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), backbone.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    image = Image.fromarray(np.full((40, 50, 3), 127, np.uint8))
    a = backbone.encode_images([image], batch_size=4)
    b = backbone.encode_texts(["a cat", "a dog"], batch_size=4)
    assert a.shape == (1, 32) and b.shape == (2, 32)
    assert backbone.identity.startswith("openclip-")


def test_open_clip_hub_tag_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    from mmapp.encoders.openclip import OpenCLIPBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="local-dir"):
        OpenCLIPBackbone("ViT-B-32", "laion2b_s34b_b79k", placement=CPU)
    assert time.monotonic() - start < 30


def _split(data: bytes, n: int, folder: Path) -> list[Path]:
    size = -(-len(data) // n)
    parts = []
    for i in range(n):
        p = folder / f"model.zip.{i + 1:03d}"
        p.write_bytes(data[i * size:(i + 1) * size])
        parts.append(p)
    return parts


def test_split_zip_reassembled_once_and_checked(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"a": 1}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 5000)
    parts = _split(buf.getvalue(), 5, tmp_path)
    target = reassemble_split_zip(parts, tmp_path / "cache" / "mpnet")
    assert (target / "config.json").read_text() == '{"a": 1}'
    assert (target / ".complete").is_file()
    # Second call reuses the folder even if the parts are gone.
    for p in parts:
        p.unlink()
    assert reassemble_split_zip(parts, tmp_path / "cache" / "mpnet") == target


def test_split_zip_with_a_missing_part_leaves_nothing(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/w.bin", np.random.default_rng(0).bytes(20000))
    parts = _split(buf.getvalue(), 4, tmp_path)
    with pytest.raises(ValueError, match="valid zip|CRC"):
        reassemble_split_zip(parts[:2] + parts[3:], tmp_path / "cache" / "mpnet")
    assert not (tmp_path / "cache" / "mpnet").exists()
    assert list((tmp_path / "cache").iterdir()) == []
