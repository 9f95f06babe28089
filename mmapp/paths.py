"""Every folder and file the app writes, under one home (``storage.home``, env ``MMAPP_HOME``).

One place that knows the layout, so no caller assembles ``home / "models"`` by hand.
Pure path arithmetic: nothing here touches the disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def database(self) -> Path:  # the default SQLite file (storage.database_url overrides)
        return self.home / "mmapp.db"

    @property
    def models(self) -> Path:  # model versions (mmapp.model_store.ModelStore)
        return self.home / "models"

    @property
    def embeddings(self) -> Path:  # the embedding cache (mmapp.cache.EmbeddingCache)
        return self.home / "cache" / "embeddings"

    @property
    def weights(self) -> Path:  # downloaded or reassembled encoder weights
        return self.home / "weights"

    @property
    def corpus(self) -> Path:  # the raw Open Clip Art packages
        return self.home / "corpus" / "openclipart"

    def dataset(self, name: str = "openclipart") -> Path:  # imported pairs: {train,val,test}.tsv, items.jsonl
        return self.home / "datasets" / name

    @property
    def memes(self) -> Path:  # the rendered synthetic meme set
        return self.dataset("memes")

    @property
    def uploads(self) -> Path:  # the content-addressed upload store (feedback_db.blobstore)
        return self.home / "uploads"

    @property
    def exports(self) -> Path:  # export files and report copies served under random names
        return self.home / "exports"

    @property
    def reports(self) -> Path:  # human-eval reports, one folder per version
        return self.home / "reports"

    def run_dir(self, run_id: int) -> Path:  # a retrain run's manifest
        return self.home / "retrain" / "runs" / f"{run_id:04d}"
