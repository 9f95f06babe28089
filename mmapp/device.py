"""Device, dtype and seeding: decided here once and injected everywhere else."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # dtype the frozen towers run in; trainable parts stay float32

    def __str__(self) -> str:
        return f"{self.device} ({str(self.dtype).removeprefix('torch.')})"


def resolve_placement(preference: str = "auto") -> Placement:
    """``auto`` picks CUDA (bf16 where supported, else fp16) when present, else CPU float32."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        device = torch.device(preference)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Placement(device, dtype)
    if preference != "cpu":
        raise ValueError(f"unknown device {preference!r}; valid: auto, cpu, cuda, cuda:N")
    return Placement(torch.device("cpu"), torch.float32)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; called once at each entry point."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cuda_auto_setting(setting: str, placement: Placement | None, *, knob: str) -> bool:
    """An ``auto | on | off`` knob whose ``auto`` means "on when the tower runs on CUDA"."""
    value = str(setting).strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    if value != "auto":
        raise ValueError(f"{knob} must be auto, on or off, got {setting!r}")
    return placement is not None and placement.device.type == "cuda"
