"""First-run setup for a fresh machine: Python requirements and Debian packages. Standard library only.

``python app.py`` calls :func:`ensure_installed` before importing anything heavy, so one command
sets up and starts the app. Nothing here runs at import.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PACKAGES = ("fonts-dejavu-core",)  # meme text rendering; the corpus .debs are fetched by mmapp itself


def missing_requirements(requirements: Path = REPO / "requirements.txt") -> list[str]:
    """Requirement lines whose distribution is not installed at the pinned version."""
    missing = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(==\s*([^\s;,]+))?", line)
        if not m:
            continue
        name = re.sub(r"\[.*\]", "", m.group(1))
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if m.group(3) and installed.split("+")[0] != m.group(3):
            missing.append(line)
    return missing


def ensure_installed(*, requirements: Path = REPO / "requirements.txt") -> None:
    missing = missing_requirements(requirements)
    if missing:
        print(f"[setup] installing {len(missing)} missing Python packages "
              f"({', '.join(m.split('=')[0] for m in missing[:6])}{'…' if len(missing) > 6 else ''})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--progress-bar", "on", "-r", str(requirements)],
                       check=True)
    absent = [p for p in DEBIAN_PACKAGES if not _dpkg_installed(p)]
    if absent and shutil.which("apt-get"):
        print(f"[setup] installing Debian packages: {' '.join(absent)}", flush=True)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-q"], check=False)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-q", *absent], check=False)


def _dpkg_installed(package: str) -> bool:
    if not shutil.which("dpkg-query"):
        return True
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return "install ok installed" in out.stdout
