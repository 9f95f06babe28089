"""The one configuration surface: every knob from YAML or the environment, secrets never printed."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmapp.config import Config, load_config, redacted
from mmapp.paths import Paths

REPO = Path(__file__).resolve().parents[2]


def test_every_knob_of_every_section_can_be_set_from_the_environment():
    defaults = Config()
    env = {}
    for section in dataclasses.fields(Config):
        if section.name == "profile":
            continue
        for knob in dataclasses.fields(getattr(defaults, section.name)):
            value = getattr(getattr(defaults, section.name), knob.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                continue
            changed = {str: "x", int: 7, float: 0.123}[type(value)] if value != "x" else "y"
            env[f"MMAPP__{section.name.upper()}__{knob.name.upper()}"] = str(changed)
    config = load_config(env=env)
    for var, value in env.items():
        _, section, knob = var.lower().split("__")
        assert str(getattr(getattr(config, section), knob)) == value, var
    assert {"retrain", "finetune", "scheduler"} <= {k.split("__")[1].lower() for k in env}


def test_unknown_knobs_are_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="min_agreement"):
        load_config(env={"MMAPP__RETRAIN__MIN_AGREEMNT": "2"})


def test_one_ocr_det_side_default():
    from mmapp.encoders import EncoderOptions
    from mmapp.encoders.ocr import OCRConfig

    assert Config().model.ocr_det_side == OCRConfig().det_side
    assert EncoderOptions(placement=None, cache_dir=Path(".")).ocr_det_side is None  # = the reader's default


def test_paths_live_under_home(tmp_path):
    config = load_config(env={"MMAPP_HOME": str(tmp_path)})
    paths = config.paths
    assert paths == Paths(tmp_path)
    for p in (paths.models, paths.embeddings, paths.uploads, paths.exports, paths.reports, paths.dataset(),
              paths.memes, paths.corpus, paths.run_dir(3), paths.database):
        assert p.is_relative_to(tmp_path)
    assert config.storage.resolved_database_url == f"sqlite:///{tmp_path / 'mmapp.db'}"


def test_the_guard_photos_ship_with_the_app():
    guard = Config().data.guard_photos
    assert guard.is_file() and not guard.is_relative_to(REPO / "tests")
    assert len([line for line in guard.read_text().splitlines() if line and not line.startswith("#")]) >= 20


def test_redacted_hides_the_operator_password_and_database_password():
    config = load_config(env={"MMAPP_OPERATOR_PASSWORD": "hunter2-secret",
                              "MMAPP_DATABASE_URL": "postgresql+psycopg://mm:pg-secret@db:5432/mmapp"})
    text = json.dumps(redacted(config))
    assert "hunter2-secret" not in text and "pg-secret" not in text
    assert redacted(config)["storage"]["database_url"].startswith("postgresql+psycopg://mm:***@db")
    assert redacted(config)["app"]["operator_password"] == "***"


def test_config_command_prints_the_effective_configuration(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MMAPP_HOME": str(tmp_path),
           "MMAPP_OPERATOR_PASSWORD": "hunter2-secret", "MMAPP__FINETUNE__EPOCHS": "9"}
    out = subprocess.run([sys.executable, "-m", "mmapp", "config", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["finetune"]["epochs"] == 9 and data["storage"]["home"] == str(tmp_path)
    assert "hunter2-secret" not in out.stdout + out.stderr
