"""The intended direction of dependencies (shared/STYLE.md): mmapp/ knows no UI, database or schedule;
feedback_db/ imports none of the others; every database query lives in feedback_db/."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_mmapp_library_imports_no_ui_database_or_schedule():
    # mmapp/__main__.py is an entry point (like app.py): it may promote through retrain.promotion.
    for path in sorted((REPO / "mmapp").rglob("*.py")):
        if path.name == "__main__.py" and path.parent == REPO / "mmapp":
            continue
        bad = imported_packages(path) & {"gradio", "feedback_db", "retrain", "app", "apscheduler", "sqlalchemy"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_feedback_db_imports_none_of_the_others():
    for path in sorted((REPO / "feedback_db").rglob("*.py")):
        bad = imported_packages(path) & {"mmapp", "retrain", "app", "gradio"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_orm_queries_outside_feedback_db():
    query = re.compile(r"\bselect\(|\.scalars?\(|\.execute\(|\bs\.get\(|\bfunc\.")
    for path in [REPO / "app.py", *sorted((REPO / "retrain").glob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]:
        hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if query.search(line)]
        assert not hits, f"{path.relative_to(REPO)} queries the database itself:\n" + "\n".join(hits)
