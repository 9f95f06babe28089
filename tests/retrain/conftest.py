from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from feedback_db.engine import make_engine

from .world import SyntheticSource, build_bootstrap_home, make_config


# Tiny models: one thread is faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def template_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("template") / "home"
    build_bootstrap_home(home, SyntheticSource())
    return home


@pytest.fixture
def home(template_home: Path, tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(template_home, target)
    return target


@pytest.fixture
def source(home: Path) -> SyntheticSource:
    return SyntheticSource(registry_path=home / "world.json")


@pytest.fixture
def config(home: Path):
    return make_config(home)


@pytest.fixture
def engine(home: Path):
    engine = make_engine(f"sqlite:///{home / 'mmapp.db'}")
    yield engine
    engine.dispose()
