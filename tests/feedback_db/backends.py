"""Which database backends the feedback_db tests run on, and throwaway Postgres databases for them."""
from __future__ import annotations

import itertools
import os
import secrets
import pytest
from sqlalchemy.engine import make_url

from feedback_db.engine import make_engine

POSTGRES_URL_ENV = "MMAPP_TEST_POSTGRES_URL"
# Test sessions run 14 hours ahead of UTC, so code that leans on the server's zone being UTC
# (e.g. a per-day bucket computed in session time) fails here rather than in production.
POSTGRES_SESSION_TIMEZONE = "Pacific/Kiritimati"
BACKENDS = ("sqlite", "postgres")

# Override the ``backend`` fixture for tests of one backend's own behaviour (pragmas, lock modes).
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
postgres_only = pytest.mark.parametrize("backend", ["postgres"])


class PostgresDatabases:
    """Creates and drops throwaway databases on the server behind ``MMAPP_TEST_POSTGRES_URL``."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self._admin = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
        # Unique per pytest process, so parallel CI jobs can share one server.
        self._prefix = f"mmapp_t{os.getpid()}_{secrets.token_hex(3)}"
        self._counter = itertools.count()
        self._live: set[str] = set()

    def create(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"{self._prefix}_{next(self._counter)}"
        with self._admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self._live.add(name)
        options = " ".join(filter(None, [self.url.query.get("options"), f"-c timezone={POSTGRES_SESSION_TIMEZONE}"]))
        return self.url.set(database=name, query={**self.url.query, "options": options}).render_as_string(
            hide_password=False
        )

    def drop(self, url: str) -> None:
        self._drop(make_url(url).database)

    def close(self) -> None:
        for name in list(self._live):
            self._drop(name)
        self._admin.dispose()

    def _drop(self, name: str) -> None:
        with self._admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends leaked connections
        self._live.discard(name)
