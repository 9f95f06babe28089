"""The shapes world (fast checks) and the clip profile end to end on it (a tiny open_clip model the
test trains once, cached under pytest's cache dir): served retrieval on held-out scenes is at least
the towers' native zero-shot score, and the previous projections-only design falls below it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mmapp.data.pairs import read_pairs
from mmapp.data.shapes import (COLOURS, RELATIONS, SHAPES, SIZES, all_scenes, render_scene, split_scenes,
                               write_bootstrap_dataset)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_world_is_every_composition_once_with_unique_captions():
    scenes = all_scenes()
    things = len(SIZES) * len(COLOURS) * len(SHAPES)
    assert len(scenes) == things * (things - 1) * len(RELATIONS) == 1104
    assert len({s.caption for s in scenes}) == len(scenes)
    assert scenes[0].caption.startswith("a ") and any(r in scenes[0].caption for r in RELATIONS)


def test_rendering_is_deterministic_and_variants_differ():
    scene = all_scenes()[5]
    a, b = render_scene(scene, size=64), render_scene(scene, size=64)
    assert a.tobytes() == b.tobytes()
    assert render_scene(scene, size=64, variant=1).tobytes() != a.tobytes()
    colours = {px for px in a.getdata()}
    assert COLOURS[scene.first.colour] in colours and COLOURS[scene.second.colour] in colours


def test_splits_are_disjoint_and_the_bootstrap_layout_reads_back(tmp_path):
    parts = split_scenes({"train": 0.02, "val": 0.01, "test": 0.01}, seed=3)
    assert not ({s.key for s in parts["train"]} & {s.key for s in parts["test"]})
    paths = write_bootstrap_dataset(parts, tmp_path, train_variants=2)
    pairs = read_pairs(paths["train"])
    assert [p.caption for p in pairs] == [s.caption for s in parts["train"]] * 2  # two pictures per caption
    assert len({p.image_path for p in pairs}) == len(pairs) and all(Path(p.image_path).is_file() for p in pairs)
    assert len(read_pairs(paths["test"])) == len(parts["test"])  # held-out: one picture per caption
    items = [json.loads(line) for line in paths["items"].read_text().splitlines()]
    assert {i["split"] for i in items} == {"train", "val", "test"}
    with pytest.raises(ValueError, match="missing"):
        write_bootstrap_dataset({"train": parts["train"]}, tmp_path / "x")
    with pytest.raises(ValueError, match="fractions"):
        split_scenes({"a": 0.8, "b": 0.5})


@pytest.fixture(scope="module")
def shapes_run(request, tmp_path_factory):
    """Tiny open_clip pre-trained on 60 % of the world (cached), bootstrap built on the rest."""
    import shapes_world

    cache = Path(request.config.cache.mkdir("shapes-world"))
    checkpoint = shapes_world.ensure_tiny_clip(cache)
    work = tmp_path_factory.mktemp("shapes")
    (work / "tiny-clip").symlink_to(checkpoint, target_is_directory=True)
    return shapes_world.run(work)


def _mean_r1(report: dict) -> float:
    return (report["image_to_text"]["R@1"] + report["text_to_image"]["R@1"]) / 2


def test_clip_profile_serves_at_least_the_native_score_and_projections_only_falls_below(shapes_run):
    r = shapes_run
    assert r["baseline"] == "native"
    native, served, proj = (_mean_r1(r[k]) for k in ("native", "served", "projections_only"))
    print(json.dumps(shapes_world_summary(r), indent=2))
    assert native > 0.2  # the tiny towers really learned the world (chance is 1/221)
    assert served >= native - 1e-9, (served, native)
    assert proj < native, (proj, native)
    # the bootstrap's own evaluation rows agree with eval-retrieval --model native
    assert r["bootstrap_metrics"]["test_baseline"]["image_to_text"]["R@1"] == r["native"]["image_to_text"]["R@1"]


def shapes_world_summary(r: dict) -> dict:
    import shapes_world

    return shapes_world.summary(r)


@pytest.mark.server
def test_python_app_py_profile_clip_captions_a_shape(shapes_run, tmp_path):
    """`python app.py --profile clip` against the tiny local checkpoint: it serves the bootstrap
    version and captions a rendered scene from the bank."""

    import shapes_world
    from tests.app.conftest import caption_with_app_py

    home = Path(shapes_run["home"])
    env = {k: v for k, v in shapes_world.clip_env(home, Path(shapes_run["checkpoint"])).items()
           if k != "MMAPP_PROFILE"}
    env["PYTHONUNBUFFERED"] = "1"
    scene = split_scenes(shapes_world.FRACTIONS, seed=0)["test"][0]
    picture = tmp_path / "scene.png"
    render_scene(scene, size=64).save(picture)
    details, log_text = caption_with_app_py('clip', env, picture, tmp_path, timeout_s=240)
    assert details["model_version"] == shapes_run["version"]
    assert details["caption"], details
    assert "openclip-" in log_text or f"serving model {shapes_run['version']!r}" in log_text
