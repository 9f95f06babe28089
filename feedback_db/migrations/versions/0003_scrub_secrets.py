"""Scrub secrets older versions stored in JSON columns (issue 11, item 1).

A retrain used to put the whole config (``app.operator_password``, ``storage.database_url`` with its
password) into ``model_versions.manifest`` and, through its stats, ``retrain_runs.stats``. This
rewrites every JSON column of the registry and retrain tables with secret-named keys masked and URL
passwords masked. Data only, no schema change; idempotent (clean rows are not touched); downgrade is a
no-op (a secret is not put back). The walker is a frozen copy, not an import of app code: a
migration must do the same thing forever.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01
"""
import json
import re
from typing import Any, Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

MASK = "***"
SECRET_KEYS = frozenset({"operator_password", "password", "secret", "token"})
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:).*@")
# table -> (primary key, JSON columns)
JSON_COLUMNS = {
    "model_versions": ("id", ("manifest", "metrics")),
    "retrain_runs": ("id", ("stats",)),
    "rejected_items": ("id", ("detail",)),
}


def scrub(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: scrub(v, str(k).lower()) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        if key in SECRET_KEYS and value:
            return MASK
        return _URL_PASSWORD.sub(r"\1***@", value)
    return value


def upgrade() -> None:
    bind = op.get_bind()
    for table_name, (pk, columns) in JSON_COLUMNS.items():
        table = sa.table(table_name, sa.column(pk), *(sa.column(c, sa.JSON()) for c in columns))
        for row in bind.execute(sa.select(table)).mappings():
            changes = {}
            for column in columns:
                raw = row[column]
                value = json.loads(raw) if isinstance(raw, str) else raw
                clean = scrub(value)
                if clean != value:
                    changes[column] = clean
            if changes:
                bind.execute(table.update().where(table.c[pk] == row[pk]).values(**changes))


def downgrade() -> None:
    pass  # scrubbed secrets are not restored
