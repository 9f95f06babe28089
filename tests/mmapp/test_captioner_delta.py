"""Captioner fine-tuning parts (issue 12): caption metrics, decoder deltas stored beside a version with the
base's identity and hash, old versions still loading, and serving base + delta (fast: a tiny BLIP)."""
from __future__ import annotations

import json

import pytest
import torch

from mmapp.caption_metrics import bootstrap_ci, score_caption_sets, score_captions, tokenize
from mmapp.joint import JointSpace
from mmapp.model_store import CAPTIONER_FILE, ModelIntegrityError, ModelStore, VersionMeta, read_meta


def test_caption_metrics_reward_the_right_caption_and_tokenize_alike():
    refs = [["a small red circle above a blue square"], ["a large green triangle to the left of a small red circle"],
            ["a small blue square above a large yellow circle"]]
    right = score_captions(["A small red circle above a blue square.", refs[1][0], refs[2][0]], refs)
    wrong = score_captions(["a large green square", "a small red circle", "a blue circle above a red square"], refs)
    assert right.exact == 1.0 and right.per_item_exact == (1.0, 1.0, 1.0)  # case and punctuation do not count
    assert right.bleu4 > 0.99 and right.cider_d > wrong.cider_d and right.bleu4 > wrong.bleu4 and wrong.exact == 0
    assert right.cider_d_ci[0] <= right.cider_d <= right.cider_d_ci[1]
    assert tokenize("  A red, circle!  ") == "a red circle"
    lo, hi = bootstrap_ci([0, 1] * 50, n_bootstrap=500)
    assert lo < 0.5 < hi
    with pytest.raises(ValueError, match="candidates"):
        score_captions(["x"], refs)
    with pytest.raises(ValueError, match="reference"):
        score_captions(["x"], [[]])


def test_cider_pools_document_frequencies_over_the_sets_scored_together():
    """A set whose references all name one colour gives that word little weight scored alone; pooled with
    other sets (as the gate scores held-out corrections with the guard pairs) naming it right counts more."""
    refs = [["a small yellow circle above a red square"], ["a large yellow triangle to the left of a blue circle"],
            ["a small yellow square above a green circle"]]
    right = [r[0] for r in refs]
    wrong = [r.replace("yellow", "green") for r in right]
    old = (["a small red circle above a blue square", "a large green triangle above a red circle"],
           [["a small red circle above a blue square"], ["a large green triangle above a red circle"]])
    alone = score_captions(right, refs).cider_d - score_captions(wrong, refs).cider_d
    pooled = (score_caption_sets({"new": (right, refs), "old": old})["new"].cider_d
              - score_caption_sets({"new": (wrong, refs), "old": old})["new"].cider_d)
    assert pooled > alone > 0
    with pytest.raises(ValueError, match="old: no captions"):
        score_caption_sets({"new": (right, refs), "old": ([], [])})


def _space():
    return JointSpace(torch.randn(4, 3), 2)


def test_a_version_stores_only_the_decoder_delta_with_the_base_identity_and_hash(tmp_path):
    store = ModelStore(tmp_path)
    delta = {"text_decoder.w": torch.randn(3, 2)}
    with pytest.raises(ValueError, match="base"):
        store.save("v0", _space(), meta=VersionMeta(), captioner_delta=delta)
    store.save("v1", _space(), meta=VersionMeta(captioner={"base": "captioner-X@abc", "kind": "decoder"}),
               captioner_delta=delta)
    loaded = store.load("v1")
    assert torch.equal(loaded.captioner_delta["text_decoder.w"], delta["text_decoder.w"])
    assert loaded.meta.captioner["base"] == "captioner-X@abc" and loaded.meta.captioner["file"] == CAPTIONER_FILE
    assert len(loaded.meta.captioner["sha256"]) == 64
    store.save("v2", _space(), meta=VersionMeta())  # no captioner: nothing extra, as before
    assert store.load("v2").captioner_delta is None and store.load("v2").meta.captioner == {}
    assert not (tmp_path / "v2" / CAPTIONER_FILE).exists()
    (tmp_path / "v1" / CAPTIONER_FILE).write_bytes((tmp_path / "v1" / CAPTIONER_FILE).read_bytes()[:-1] + b" ")
    with pytest.raises(ModelIntegrityError, match="captioner delta"):
        store.load("v1")


def test_versions_written_before_captioner_deltas_still_load(tmp_path):
    old = {"labels": ["positive"], "encoders": {"image": "e"}, "space": {"top_t": 2}, "version": "r1", "schema": 1,
           "created_at": 1.0, "later_key": {"kept": True}}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    meta = read_meta(tmp_path)
    assert meta.captioner == {} and meta.extra == {"later_key": {"kept": True}}
    # and code without the field keeps ours as an unknown key (VersionMeta.extra) — shown by the dict round trip
    assert VersionMeta.from_dict({**meta.to_dict(), "captioner": {"base": "b"}}).captioner == {"base": "b"}


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from tests.mmapp.test_captioner import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_serving_puts_a_versions_decoder_on_the_base_and_takes_it_off_again(tiny_blip, tmp_path):
    from mmapp.captioner import GenerativeCaptioner
    from mmapp.device import resolve_placement

    captioner = GenerativeCaptioner(tiny_blip, placement=resolve_placement("cpu"), max_new_tokens=8)
    base = captioner.decoder_state()
    assert base and all(k.startswith("text_decoder.") for k in base)
    changed = {k: v + 0.5 for k, v in base.items()}
    captioner.set_delta(changed, name="r1")
    assert captioner.delta_name == "r1"
    assert all(torch.equal(v, changed[k]) for k, v in captioner.decoder_state().items())
    copy = captioner.with_delta(None)  # a copy with its own weights: the served one is untouched
    assert all(torch.equal(v, changed[k]) for k, v in copy.decoder_state().items())
    captioner.set_delta(None)
    assert captioner.delta_name is None and all(torch.equal(v, base[k]) for k, v in captioner.decoder_state().items())
    with pytest.raises(ValueError, match="does not fit"):
        captioner.set_delta({"text_decoder.nope": torch.zeros(1)})
    assert captioner.identity.startswith("captioner-BlipForConditionalGeneration@")
