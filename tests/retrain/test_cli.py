"""The command line: exact command names, one JSON object for --json, rollback and report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmapp.model_store import ModelStore
from retrain.__main__ import main
from retrain.job import run_retrain

from .world import feed_new_concepts

REPO = Path(__file__).resolve().parents[2]


def test_status_json_from_a_fresh_process(home, tmp_path):
    done = subprocess.run([sys.executable, "-m", "retrain", "--home", str(home), "status", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads(done.stdout)
    assert status["current_version"] is None and status["recent_runs"] == []
    assert status["schedule"]["cron"] == "0 3 * * *"


def test_rollback_and_report_commands(config, engine, source, home, capsys):
    feed_new_concepts(engine, source, 100)
    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted"
    assert main(["--home", str(home), "rollback", "bootstrap"]) == 0
    assert "current version: bootstrap" in capsys.readouterr().out
    assert ModelStore(home / "models").current() == "bootstrap"
    assert main(["--home", str(home), "report", out.version]) == 0
    html_path = capsys.readouterr().out.split()[0]
    assert html_path.endswith(f"reports/{out.version}/report.html") and Path(html_path).is_file()
    assert main(["--home", str(home), "status"]) == 0
    text = capsys.readouterr().out
    assert "current version: bootstrap" in text and out.version in text
    assert main(["--home", str(home), "rollback", "no-such-version"]) == 1
