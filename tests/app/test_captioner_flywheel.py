"""The flywheel fine-tunes a generative captioner (issue 12), end to end on the shapes world.

A tiny BLIP pre-trained on scenes with no yellow thing (cached under pytest's cache dir, like the tiny
open_clip of ``tests/mmapp/test_shapes.py``) is the blip profile's captioner; the real app serves it;
corrections of yellow scenes go in through ``/caption`` + ``/rate_caption``; one retrain fine-tunes the
text decoder and the served captions of yellow scenes no retrain saw improve with intervals apart,
while scenes without yellow do not regress; poisoned corrections are refused. The run itself is
``benchmarks/shapes_captioner.py`` (the numbers in docs/results.md come from it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def flywheel(request, tmp_path_factory):
    import shapes_captioner

    work = Path(request.config.cache.mkdir("shapes-captioner"))
    return shapes_captioner.run(work, home=tmp_path_factory.mktemp("captioner-home") / "home")


def test_corrections_through_the_app_teach_the_captioner_a_new_colour(flywheel):
    r = flywheel
    import shapes_captioner

    print(json.dumps(shapes_captioner.summary(r), indent=2))
    first = r["first"]
    assert first["status"] == "promoted" and first["captioner_status"] == "promote", first["message"]
    assert r["served_version"] == first["version"]  # the app hot-swapped to base + the new decoder
    new_before, new_after = r["before"]["new"], r["after"]["new"]
    assert new_after["cider_d_ci"][0] > new_before["cider_d_ci"][1], (new_before, new_after)  # intervals apart
    assert new_after["exact"] > new_before["exact"]
    assert "yellow" not in new_before["example"]["said"]  # it had never seen yellow ...
    old_before, old_after = r["before"]["old"], r["after"]["old"]
    # ... and what it knew stays: old concepts within the gate's CIDEr-D tolerance or better
    assert old_after["cider_d"] >= old_before["cider_d"] - 0.1, (old_before, old_after)
    gate = {c["metric"]: c for c in first["gate"]["checks"]}
    assert gate["caption_heldout_cider_d"]["improved"] and gate["caption_guard_cider_d"]["passed"]
    # the version stores only what was tuned (here the decoder and, as configured, the vision encoder),
    # tied to the base captioner's identity; serving loads base + delta
    from mmapp.captioner import decoder_parameters
    from mmapp.model_store import ModelStore

    version = ModelStore(Path(r["home"]) / "models").load(first["version"])
    delta = version.captioner_delta
    assert delta and all(k.startswith(("text_decoder.", "vision_model.")) for k in delta)
    assert any(k.startswith("vision_model.") for k in delta) and version.meta.captioner["kind"] == "decoder+vision"
    assert version.meta.captioner["base"].startswith("captioner-BlipForConditionalGeneration@")
    from mmapp.captioner import GenerativeCaptioner
    from mmapp.device import resolve_placement

    base = GenerativeCaptioner(r["checkpoint"], placement=resolve_placement("cpu"))
    assert set(decoder_parameters(base.model)) <= set(delta) and version.meta.captioner["base"] == base.identity
    report = json.loads(Path(first["report"]["json"]).read_text())
    assert {row["set"] for row in report["captioner"]["by_run"]} == {"heldout", "guard"}


def test_poisoned_corrections_are_refused(flywheel):
    """Corrections that give each picture another scene's caption: refused by the captioner's cleaning (they
    fit their pictures no better than random captions) or, for what gets through, by its gate."""
    p = flywheel["poison"]
    assert p["captioner_status"] in ("skipped", "refused"), p
    assert flywheel["served_version_after_poison"] == flywheel["first"]["version"]  # the taught version serves on
    cleaning = p["cleaning"] or {}
    print("poison cleaning:", {k: cleaning.get(k) for k in ("accepted", "rejected_low_agreement")},
          "| captioner:", p["captioner_message"])
    assert flywheel["after_poison"]["new"]["cider_d"] == flywheel["after"]["new"]["cider_d"]


def test_python_app_py_profile_blip_serves_the_fine_tuned_captioner(flywheel, tmp_path):
    """`python app.py --profile blip` against the tiny local captioner folder: it serves the promoted
    version (base + decoder delta) and its generated caption names the colour it was taught."""
    import os


    import shapes_captioner
    from mmapp.data.shapes import render_scene
    from tests.app.conftest import caption_with_app_py

    home = Path(flywheel["home"])
    env = {**os.environ, **shapes_captioner.blip_env(home, Path(flywheel["checkpoint"]).parent),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    scene = shapes_captioner.world()["test_new"][0]
    picture = tmp_path / "scene.png"
    render_scene(scene, size=shapes_captioner.UPLOAD_SIZE, variant=shapes_captioner.TEST_VARIANT).save(picture)
    details, log_text = caption_with_app_py('blip', env, picture, tmp_path, timeout_s=240)
    assert details["model_version"] == flywheel["first"]["version"]
    assert details["source"] == "generated" and "yellow" in details["caption"], details
