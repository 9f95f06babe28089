"""Model versions on disk: immutable folders, written atomically, each described by a :class:`VersionMeta`.

A version folder holds ``weights.safetensors`` (joint space + fusion head) and ``meta.json``; a version
whose generative captioner was fine-tuned also holds ``captioner.safetensors``: only the text decoder's
weights (a delta on the base captioner), described by ``meta.captioner`` (the base's identity, the
delta's sha256).
It is written in a temporary sibling folder, fsynced and renamed into place, so a crash
never leaves a partial version. :meth:`ModelStore.save` is the one writer of ``meta.json`` and
:func:`read_meta` its one reader.

Which version is current is decided by the database registry (``retrain.promotion``), never here.
``current.json`` is a pointer *derived* from the registry (written only by promotion and rollback) so
that tools without a database (``python -m mmapp caption``) serve the same version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors, save_file

from mmapp.encoders.base import file_sha256
from mmapp.fusion import FusionConfig, create_fusion_head
from mmapp.joint import JointSpace

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BRIDGE = "bridge"  # pseudo-version: the zero-training ConSE baseline
CAPTIONER_FILE = "captioner.safetensors"  # a fine-tuned captioner's decoder delta, beside weights.safetensors


META_SCHEMA = 1  # version of the meta.json layout; files without "schema" are the older layout (0)


@dataclass
class VersionMeta:
    """What a model version is: its labels, the towers it was trained on, how and from what, its metrics.

    Written by :meth:`ModelStore.save` only (which fills ``version``, ``created_at``, ``space`` and
    ``fusion``), read by :func:`read_meta` only. Keys this code does not know are kept in ``extra``.
    """

    labels: tuple[str, ...] = ()  # the meme head's label names, in logit order
    encoders: dict[str, str] = field(default_factory=dict)  # tower identities the version was trained on
    caption_temperature: float | None = None  # softmax temperature over caption scores (None: uncalibrated)
    parent: str | None = None  # the version it was fine-tuned from
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation when it was made
    training: dict[str, Any] = field(default_factory=dict)  # how it was fitted (epochs, mix, ...), no per-epoch history
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch training history
    data: dict[str, Any] = field(default_factory=dict)  # what it was trained on (sizes, files)
    config: dict[str, Any] = field(default_factory=dict)  # the settings used, secrets redacted
    manifest: dict[str, Any] | None = None  # the retrain run's manifest, for versions a retrain made
    # what the meme head reads as text (mmapp.text_features): "" = the text tower's embedding alone
    # (every version made before it existed), "vader-v1" = embedding + sentiment-incongruence features
    meme_text_features: str = ""
    # a fine-tuned generative captioner's delta: {"base": identity, "kind": "decoder", "file", "sha256",
    # "source_version", ...}; {} = the base captioner as configured (every version made before it existed)
    captioner: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    python: str = ""
    torch: str = ""
    # filled in by ModelStore.save:
    version: str = ""
    created_at: float = 0.0
    space: dict[str, Any] = field(default_factory=dict)  # JointSpace.meta()
    fusion: dict[str, Any] | None = None  # {"name", "config"} of the meme head
    schema: int = META_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    _RENAMED = {"train": "training"}  # schema 0 key -> field
    _DROPPED = ("fusion_name",)  # schema 0 keys now derived from another field

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["labels"] = list(self.labels)
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VersionMeta":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {"schema": 0}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            key = cls._RENAMED.get(key, key)
            if key in known:
                values[key] = value
            elif key not in cls._DROPPED:
                extra[key] = value
        if values["schema"] > META_SCHEMA:
            raise ValueError(f"meta.json schema {values['schema']} is newer than this code reads ({META_SCHEMA})")
        values["labels"] = tuple(values.get("labels") or ())
        for key in ("encoders", "metrics", "training", "data", "config", "space", "captioner"):
            values[key] = values.get(key) or {}
        values["history"] = values.get("history") or []
        return cls(**values, extra=extra)

    @property
    def fusion_name(self) -> str | None:
        return (self.fusion or {}).get("name")


def read_meta(folder: Path) -> VersionMeta:
    """The :class:`VersionMeta` of a version folder (any schema this code knows)."""
    return VersionMeta.from_dict(json.loads((Path(folder) / "meta.json").read_text()))


@dataclass
class ModelVersion:
    version: str
    space: JointSpace
    fusion_head: torch.nn.Module | None
    fusion_config: FusionConfig | None
    meta: VersionMeta
    captioner_delta: dict[str, torch.Tensor] | None = None  # the text decoder's weights (meta.captioner)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a unique temp file, fsynced, renamed, folder fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelIntegrityError(ValueError):
    """A saved version whose weights are not the bytes the registry recorded."""


class ModelStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def weights_sha256(self, version: str) -> str:
        """sha256 of a saved version's weights file (what the registry records)."""
        return file_sha256(self.path(version) / "weights.safetensors")

    def path(self, version: str) -> Path:
        if not VERSION_RE.match(version) or version == BRIDGE:
            raise ValueError(f"invalid model version name {version!r}")
        return self.root / version

    def exists(self, version: str) -> bool:
        return (self.path(version) / "meta.json").is_file()

    def list_versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "meta.json").is_file() and not p.name.startswith("."))

    def save(self, version: str, space: JointSpace, *, meta: VersionMeta,
             fusion_head: torch.nn.Module | None = None, fusion_config: FusionConfig | None = None,
             fusion_name: str | None = None, captioner_delta: dict[str, torch.Tensor] | None = None) -> Path:
        """``captioner_delta``: a fine-tuned captioner's decoder weights; ``meta.captioner`` must then name
        its base (``{"base": identity, ...}``); the file name and its sha256 are filled in here."""
        target = self.path(version)
        if captioner_delta is not None and not meta.captioner.get("base"):
            raise ValueError("a captioner delta needs meta.captioner['base'] (the base captioner's identity)")
        if target.exists():
            raise FileExistsError(f"model version {version!r} already exists at {target}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{version}-"))
        try:
            tensors = {f"space.{k}": v.detach().contiguous().cpu() for k, v in space.state().items()}
            if fusion_head is not None:
                tensors.update({f"fusion.{k}": v.detach().contiguous().cpu() for k, v in fusion_head.state_dict().items()})
            save_file(tensors, str(tmp / "weights.safetensors"))
            captioner_meta = dict(meta.captioner)
            if captioner_delta is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in captioner_delta.items()},
                          str(tmp / CAPTIONER_FILE))
                captioner_meta.update(file=CAPTIONER_FILE, sha256=file_sha256(tmp / CAPTIONER_FILE))
            else:
                captioner_meta.pop("file", None)
                captioner_meta.pop("sha256", None)
            full_meta = dataclasses.replace(
                meta, version=version, captioner=captioner_meta, created_at=meta.created_at or time.time(),
                space=space.meta(),
                schema=META_SCHEMA,
                fusion=({"name": fusion_name, "config": fusion_config.__dict__}
                        if fusion_head is not None and fusion_config is not None else None))
            (tmp / "meta.json").write_text(json.dumps(full_meta.to_dict(), indent=2, default=str))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.replace(tmp, target)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load(self, version: str, *, expected_sha256: str | None = None) -> ModelVersion:
        """Load ``version``; with ``expected_sha256`` (the registry's) the bytes read are checked against it
        before any tensor is built, and a mismatch raises :class:`ModelIntegrityError`."""
        folder = self.path(version)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"model version {version!r} not found under {self.root} "
                                    f"(have: {self.list_versions() or 'none'})")
        meta = read_meta(folder)
        raw = (folder / "weights.safetensors").read_bytes()  # hashed and parsed from the same bytes: no swap between
        if expected_sha256 is not None:
            actual = hashlib.sha256(raw).hexdigest()
            if actual != expected_sha256:
                raise ModelIntegrityError(f"model version {version!r}: weights sha256 {actual[:12]}… does not match "
                                          f"the registry's {expected_sha256[:12]}… (corrupt or replaced file)")
        tensors = load_tensors(raw)
        space = JointSpace.from_state({k[len("space."):]: v for k, v in tensors.items() if k.startswith("space.")},
                                      meta.space)
        head, fcfg = None, None
        if meta.fusion:
            fcfg = FusionConfig(**meta.fusion["config"])
            head = create_fusion_head(meta.fusion["name"], fcfg)
            head.load_state_dict({k[len("fusion."):]: v for k, v in tensors.items() if k.startswith("fusion.")})
            head.eval()
        return ModelVersion(version, space, head, fcfg, meta, captioner_delta=self._captioner_delta(folder, meta))

    @staticmethod
    def _captioner_delta(folder: Path, meta: VersionMeta) -> dict[str, torch.Tensor] | None:
        name = meta.captioner.get("file")
        if not name:
            return None
        raw = (folder / name).read_bytes()
        actual = hashlib.sha256(raw).hexdigest()
        if actual != meta.captioner.get("sha256"):
            raise ModelIntegrityError(f"model version {folder.name!r}: captioner delta sha256 {actual[:12]}… does not "
                                      f"match meta.json's {str(meta.captioner.get('sha256'))[:12]}…")
        return load_tensors(raw)

    def current(self) -> str | None:
        """The version ``current.json`` names: the registry's current version as last promoted (derived)."""
        pointer = self.root / "current.json"
        if not pointer.is_file():
            return None
        return json.loads(pointer.read_text())["version"]

    def set_current(self, version: str) -> None:
        """Point ``current.json`` at ``version``. Only ``retrain.promotion`` calls this: the registry decides."""
        if not self.exists(version):
            raise FileNotFoundError(f"cannot make {version!r} current: no such version under {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / "current.json", json.dumps({"version": version, "set_at": time.time()}, indent=2))
