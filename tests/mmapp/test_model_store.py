"""VersionMeta: one typed schema for a version's metadata, one writer, one loader, old files still load."""
from __future__ import annotations

import json

import pytest
import torch

from mmapp.joint import JointSpace
from mmapp.model_store import META_SCHEMA, ModelStore, VersionMeta, read_meta


def test_meta_roundtrip_through_the_store(tmp_path):
    store = ModelStore(tmp_path)
    meta = VersionMeta(labels=("a", "b"), encoders={"image": "img@1"}, caption_temperature=0.07, parent="p",
                       metrics={"retrieval": {"x": 1}}, training={"mix": 0.5})
    store.save("v1", JointSpace(torch.randn(4, 3), 2), meta=meta)
    loaded = store.load("v1").meta
    assert loaded.labels == ("a", "b") and loaded.encoders == {"image": "img@1"} and loaded.parent == "p"
    assert loaded.caption_temperature == 0.07 and loaded.training == {"mix": 0.5}
    assert loaded.version == "v1" and loaded.created_at > 0 and loaded.schema == META_SCHEMA
    assert loaded.space["top_t"] == 2 and loaded.fusion is None


def test_meta_written_by_the_previous_code_still_loads(tmp_path):
    old = {"labels": ["positive", "sarcastic"], "encoders": {"image": "e"}, "caption_temperature": 0.05,
           "train": {"mix": 0.75, "best_epoch": 3}, "history": [{"epoch": 0}], "metrics": {"memes": {}},
           "parent": "bootstrap", "fusion_name": "concat", "manifest": {"run_id": 4},
           "fusion": {"name": "concat", "config": {}}, "space": {"top_t": 10}, "version": "r0004",
           "created_at": 1.0, "something_new": [1, 2]}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    meta = read_meta(tmp_path)
    assert meta.schema == 0 and meta.training == {"mix": 0.75, "best_epoch": 3}
    assert meta.fusion_name == "concat" and meta.manifest == {"run_id": 4} and meta.labels == ("positive", "sarcastic")
    assert meta.extra == {"something_new": [1, 2]}  # unknown keys are kept, not dropped
    assert meta.to_dict()["something_new"] == [1, 2] and "fusion_name" not in meta.to_dict()


def test_meta_from_newer_code_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"schema": META_SCHEMA + 1}))
    with pytest.raises(ValueError, match="newer"):
        read_meta(tmp_path)
