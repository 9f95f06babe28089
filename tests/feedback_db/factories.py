"""Small builders for feedback rows used across the feedback_db tests."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Optional

from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.blobstore import BlobStore
from feedback_db.models import Prediction, Upload

_counter = itertools.count()


def fake_image(tag: str = "") -> bytes:
    # Arbitrary bytes behind a PNG signature: the store and DB never decode images.
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(tag.encode()).digest() * 4


def add_upload(s: Session, store: Optional[BlobStore] = None, *, tag: str = "img") -> Upload:
    data = fake_image(tag)
    if store is not None:
        sha, relpath = store.put(data, "png")
    else:
        sha = hashlib.sha256(data).hexdigest()
        relpath = f"{sha[:2]}/{sha}.png"
    return repo.record_upload(s, sha256=sha, relpath=relpath, format="png", width=64, height=48, n_bytes=len(data))


def add_prediction(
    s: Session,
    upload: Upload,
    *,
    kind: str = "meme",
    label: str = "sarcastic",
    request_id: Optional[str] = None,
    **kw: Any,
) -> Prediction:
    outputs = {"label": label, "scores": {label: 0.9}} if kind == "meme" else {"caption": f"a photo of {label}"}
    return repo.record_prediction(
        s,
        request_id=request_id or f"pred-{next(_counter)}",
        kind=kind,
        image_sha256=upload.sha256,
        model_version=kw.pop("model_version", "v0"),
        outputs=outputs,
        latency_ms=kw.pop("latency_ms", 12.5),
        stage_ms=kw.pop("stage_ms", {"ocr": 3.0, "encode": 7.5}),
        session_id=kw.pop("session_id", "sess-a"),
        **kw,
    )
