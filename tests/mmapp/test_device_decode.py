"""Bulk embedding with JPEGs decoded on the tower's device (model.decode_on_device, issue 13 item 5).

On CUDA this is nvJPEG; here the same code runs with the CPU placement, so the path that a GPU takes
(decode_jpeg -> tensor resize/crop/normalise -> tower) is the one tested. It must agree with the PIL
path, keep file order through the cache, leave every picture it cannot read the same way to PIL, and
give the same errors for bad files."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmapp.cache import EmbeddingCache
from mmapp.device import cuda_auto_setting, resolve_placement
from mmapp.embedder import Embedder
from mmapp.encoders import EncoderOptions, create_encoder
from mmapp.imageio import ImageDecodeError, ImageLimits

PHOTOS = Path(__file__).resolve().parents[2] / "mmapp" / "assets" / "photos"
CPU = resolve_placement("cpu")

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def image_encoder(tmp_path_factory):
    return create_encoder("efficientnet-lite0", EncoderOptions(placement=CPU, cache_dir=tmp_path_factory.mktemp("w")),
                          kind="image")


def embedder(image_encoder, cache_dir: Path | None, *, on_device: bool) -> Embedder:
    return Embedder(image_encoder=image_encoder, text_encoder=None,
                    cache=EmbeddingCache(cache_dir) if cache_dir else None, decode_on_device=on_device)


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory) -> list[Path]:
    """Real JPEG photos, plus a PNG, an EXIF-rotated JPEG and a greyscale JPEG among them."""
    folder = tmp_path_factory.mktemp("files")
    files = [shutil.copy(p, folder / p.name) for p in sorted(PHOTOS.glob("*.jpg"))[:7]]
    with Image.open(PHOTOS / "chelsea.jpg") as im:
        im.convert("RGB").save(folder / "cat.png")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° on display: the device decoder would ignore it
        im.convert("RGB").save(folder / "rotated.jpg", exif=exif.tobytes())
        im.convert("L").save(folder / "grey.jpg")
    extra = [folder / "cat.png", folder / "rotated.jpg", folder / "grey.jpg"]
    return [Path(f) for f in files[:3]] + extra + [Path(f) for f in files[3:]]


def test_device_decode_agrees_with_pil_in_file_order_through_the_cache(image_encoder, mixed_files, tmp_path):
    pil, pil_keys = embedder(image_encoder, tmp_path / "a", on_device=False).image_files(mixed_files, chunk=4)
    dev, dev_keys = embedder(image_encoder, tmp_path / "b", on_device=True).image_files(mixed_files, chunk=4)
    assert dev_keys == pil_keys and len(dev_keys) == len(mixed_files)
    cos = F.cosine_similarity(pil.features, dev.features, dim=-1)
    # JPEG decoders and resamplers differ by a few grey levels: the features stay the same picture
    assert float(cos.mean()) > 0.99 and float(cos.min()) > 0.95, cos
    assert torch.equal(pil.class_probs.argmax(-1), dev.class_probs.argmax(-1))
    # what the device decoder must not read its own way goes through PIL: identical features
    for name in ("cat.png", "rotated.jpg"):
        i = [p.name for p in mixed_files].index(name)
        assert torch.allclose(pil.features[i], dev.features[i], atol=1e-5), name
    # second pass: everything from the cache, same rows in the same order
    again, _ = embedder(image_encoder, tmp_path / "b", on_device=True).image_files(mixed_files, chunk=4)
    assert torch.allclose(again.features, dev.features)


def test_a_corrupt_jpeg_gets_the_pil_path_error_naming_the_file(image_encoder, mixed_files, tmp_path):
    bad = tmp_path / "broken.jpg"
    data = mixed_files[0].read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # a JPEG header and a third of the scan
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        embedder(image_encoder, None, on_device=True).image_files([mixed_files[1], bad])


def test_an_oversized_picture_is_refused_before_any_decoder_runs(image_encoder, tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 3000), (120, 30, 200)).save(big)
    with pytest.raises(ImageDecodeError, match="big.jpg"):
        embedder(image_encoder, None, on_device=True).image_files([big], limits=ImageLimits(max_pixels=1_000_000))


def test_auto_means_cuda_only():
    assert cuda_auto_setting("auto", CPU, knob="k") is False
    assert cuda_auto_setting("on", CPU, knob="k") is True
    assert cuda_auto_setting("off", None, knob="k") is False
    with pytest.raises(ValueError, match="model.decode_on_device"):
        cuda_auto_setting("sometimes", CPU, knob="model.decode_on_device")
