"""The frozen image tower under onnxruntime (model.image_runtime): same numbers as eager torch, one
cached export per weights, torch again once the weights change."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmapp.config import load_config
from mmapp.device import Placement, resolve_placement
from mmapp.encoders import EncoderOptions, ImageRuntimeConfig, create_encoder
from mmapp.encoders.onnx_runtime import OnnxImageTower

CPU = resolve_placement("cpu")
pytestmark = pytest.mark.weights


def tower(cache_dir: Path, runtime: str = "auto", **kw):
    return create_encoder("efficientnet-lite0", EncoderOptions(placement=CPU, cache_dir=cache_dir,
                                                               image_runtime=ImageRuntimeConfig(runtime, **kw)),
                          kind="image")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    import skimage.data

    arrays = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
              skimage.data.camera()]
    return [Image.fromarray(a) for a in arrays]  # camera() is greyscale: preprocess makes it RGB


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def both(cache_dir):
    return tower(cache_dir, "onnx"), tower(cache_dir, "torch")


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_tower_gives_the_torch_numbers(both, photos, batch):
    onnx_tower, torch_tower = both
    assert (onnx_tower.runtime, torch_tower.runtime) == ("onnx", "torch")
    a, b = onnx_tower.encode(photos[:batch]), torch_tower.encode(photos[:batch])
    assert a.features.shape == b.features.shape == (batch, 1280) and a.class_probs.shape == (batch, 1000)
    assert torch.nn.functional.cosine_similarity(a.features, b.features).min() > 0.9999
    assert (a.class_probs - b.class_probs).abs().max() < 1e-4
    assert torch.equal(a.class_probs.argmax(1), b.class_probs.argmax(1))
    assert a.features.dtype == b.features.dtype == torch.float32
    assert onnx_tower.identity == torch_tower.identity  # one embedding cache serves both runtimes


def test_export_is_cached_per_weights_and_written_whole(both, cache_dir, photos):
    onnx_tower, _ = both
    onnx_tower.encode(photos[:1])
    path = onnx_tower.onnx.path
    assert path.exists() and onnx_tower.identity.split("@")[1] in path.name and "torch" in path.name
    stamp = path.stat().st_mtime_ns
    again = tower(cache_dir, "auto")  # a second process / replica on the same home
    assert again.runtime == "onnx"
    again.encode(photos[:1])
    assert path.stat().st_mtime_ns == stamp  # reused, not exported twice
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.name}.lock"])  # no temp files


def test_concurrent_first_exports_leave_one_readable_file(tmp_path, photos):
    towers = [tower(tmp_path, "onnx") for _ in range(3)]
    outputs, errors = [None] * 3, []

    def run(i):
        try:
            outputs[i] = towers[i].encode(photos[:2]).features
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.allclose(outputs[0], o, atol=1e-5) for o in outputs[1:])
    files = [p for p in (tmp_path / "onnx").iterdir() if not p.name.endswith(".lock")]
    assert len(files) == 1 and files[0].suffix == ".onnx"  # no half-written temporary file either


def test_changed_weights_switch_the_tower_back_to_torch(tmp_path, photos):
    from mmapp.finetune import load_tower_delta, save_tower_delta

    trained = tower(tmp_path / "a", "onnx")
    with torch.no_grad():
        for p in trained.model._conv_head.parameters():
            p.mul_(1.5)
    trained.weights_changed()
    delta = tmp_path / "delta.safetensors"
    save_tower_delta(trained, 1, delta)
    served = tower(tmp_path / "b", "onnx")
    before = served.encode(photos[:1]).features
    load_tower_delta(served, delta)
    assert served.runtime == "torch"  # the export holds the old weights: never used again
    after = served.encode(photos[:1]).features
    assert torch.allclose(after, trained.encode(photos[:1]).features, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)
    unfrozen = tower(tmp_path / "d", "onnx")
    unfrozen.unfreeze_last(2)
    assert unfrozen.runtime == "torch"


def test_requests_run_single_threaded_and_bulk_batches_on_all_threads(tmp_path, photos):
    encoder = tower(tmp_path, "onnx", threads=2, serving_threads=1)
    assert [encoder.onnx.threads_for(b) for b in (1, 2, 4, 5, 32)] == [1, 1, 1, 2, 2]
    one, bulk = encoder.encode(photos[:1]).features, encoder.encode(photos).features  # two sessions, one graph
    assert torch.allclose(one[0], bulk[0], atol=1e-5)
    assert tower(tmp_path, "onnx", serving_threads=0).onnx.threads_for(1) == torch.get_num_threads()


def test_runtime_choice_and_its_errors(tmp_path):
    assert tower(tmp_path, "auto").runtime == "onnx"  # float32 CPU with onnx installed
    assert tower(tmp_path, "torch").runtime == "torch"
    no_cache = create_encoder("efficientnet-lite0", EncoderOptions(placement=CPU, cache_dir=None), kind="image")
    assert no_cache.runtime == "torch"  # auto without a folder for the export
    with pytest.raises(ValueError, match="must be one of .*got 'tensorrt'"):
        ImageRuntimeConfig("tensorrt")
    half = Placement(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="float32 CPU towers only"):
        create_encoder("efficientnet-lite0", EncoderOptions(placement=half, cache_dir=tmp_path,
                                                            image_runtime=ImageRuntimeConfig("onnx")), kind="image")
    auto_half = create_encoder("efficientnet-lite0", EncoderOptions(placement=half, cache_dir=tmp_path), kind="image")
    assert auto_half.runtime == "torch"


def test_config_knob_reaches_the_served_towers(tmp_path, monkeypatch):
    from mmapp.towers import Towers

    config = load_config(storage={"home": str(tmp_path)}, model={"image_runtime": "torch"})
    assert Towers.from_config(config).embedder.image_encoder.runtime == "torch"
    monkeypatch.setenv("MMAPP__MODEL__IMAGE_RUNTIME", "onnx")
    monkeypatch.setenv("MMAPP__MODEL__IMAGE_RUNTIME_THREADS", "1")
    encoder = Towers.from_config(load_config(storage={"home": str(tmp_path)})).embedder.image_encoder
    assert encoder.runtime == "onnx" and isinstance(encoder.onnx, OnnxImageTower) and encoder.onnx.threads == 1
    assert encoder.onnx.threads_for(1) == encoder.onnx.threads_for(3) == 1  # serving: one thread per request
    assert encoder.onnx.path.parent == config.paths.weights / "onnx"


def test_a_weights_folder_that_cannot_be_written_falls_back_to_torch_under_auto(tmp_path, photos):
    blocked = tmp_path / "weights"
    blocked.write_text("a file where the weights folder should be")  # no export can be written under it (as root too)
    auto = tower(blocked, "auto")
    reference = tower(tmp_path / "rw", "torch").encode(photos[:1]).features
    assert torch.allclose(auto.encode(photos[:1]).features, reference, atol=1e-5)
    assert auto.runtime == "torch"  # fell back once, and stays there
    with pytest.raises(OSError):
        tower(blocked, "onnx").encode(photos[:1])  # asked for by name: an error, not a silent fallback
