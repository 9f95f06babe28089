"""Model versions on disk: immutable folders, written atomically, plus a ``current`` pointer.

A version folder holds ``weights.safetensors`` (joint space + fusion head) and ``meta.json``.
It is written in a temporary sibling folder, fsynced and renamed into place, so a crash
never leaves a partial version. The pointer ``current.json`` is replaced atomically too.
The database registry (feedback_db) records history; this module knows no database.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmapp.encoders.base import file_sha256
from mmapp.fusion import FusionConfig, create_fusion_head
from mmapp.joint import JointSpace

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BRIDGE = "bridge"  # pseudo-version: the zero-training ConSE baseline


@dataclass
class ModelVersion:
    version: str
    space: JointSpace
    fusion_head: torch.nn.Module | None
    fusion_config: FusionConfig | None
    meta: dict[str, Any]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta.get("labels", ()))


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

    def save(self, version: str, space: JointSpace, *, meta: dict[str, Any],
             fusion_head: torch.nn.Module | None = None, fusion_config: FusionConfig | None = None,
             fusion_name: str | None = None) -> Path:
        target = self.path(version)
        if target.exists():
            raise FileExistsError(f"model version {version!r} already exists at {target}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{version}-"))
        try:
            tensors = {f"space.{k}": v.detach().contiguous().cpu() for k, v in space.state().items()}
            if fusion_head is not None:
                tensors.update({f"fusion.{k}": v.detach().contiguous().cpu() for k, v in fusion_head.state_dict().items()})
            save_file(tensors, str(tmp / "weights.safetensors"))
            full_meta = {**meta, "version": version, "created_at": meta.get("created_at", time.time()),
                         "space": space.meta(),
                         "fusion": ({"name": fusion_name, "config": fusion_config.__dict__}
                                    if fusion_head is not None and fusion_config is not None else None)}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
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

    def load(self, version: str) -> ModelVersion:
        folder = self.path(version)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"model version {version!r} not found under {self.root} "
                                    f"(have: {self.list_versions() or 'none'})")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(folder / "weights.safetensors"))
        space = JointSpace.from_state({k[len("space."):]: v for k, v in tensors.items() if k.startswith("space.")},
                                      meta["space"])
        head, fcfg = None, None
        if meta.get("fusion"):
            fcfg = FusionConfig(**meta["fusion"]["config"])
            head = create_fusion_head(meta["fusion"]["name"], fcfg)
            head.load_state_dict({k[len("fusion."):]: v for k, v in tensors.items() if k.startswith("fusion.")})
            head.eval()
        return ModelVersion(version, space, head, fcfg, meta)

    def current(self) -> str | None:
        pointer = self.root / "current.json"
        if not pointer.is_file():
            return None
        return json.loads(pointer.read_text())["version"]

    def set_current(self, version: str) -> None:
        if not self.exists(version):
            raise FileNotFoundError(f"cannot make {version!r} current: no such version under {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / "current.json", json.dumps({"version": version, "set_at": time.time()}, indent=2))
