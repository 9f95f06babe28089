"""An exclusive lock on a file under the shared home, for work several app replicas must not do twice at once.

``fcntl.flock`` is released by the kernel when its holder dies (even by SIGKILL), so a crashed replica
never leaves a stale lock behind. On NFS, Linux maps ``flock`` to POSIX byte-range locks, which need the
NFS lock service (NFSv4, or NFSv3 with lockd; not ``nolock`` mounts) to be exclusive across hosts
(docs/deploy.md). Unix only.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def exclusive_file_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing, never deleted) for the ``with`` block;
    blocks until every other holder, in this or another process, has left its block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
