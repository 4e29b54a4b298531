"""Architecture rules: core/ and ml/ never import Celery or tasks; pure modules do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PURE = ["core/signals/__init__.py", "core/signals/orb.py", "core/risk.py", "core/exits.py",
        "core/decision.py", "core/orders.py", "core/models.py", "core/report.py",
        "core/market/synthetic.py", "core/scoring.py", "core/signals/vwap.py",
        "ml/features.py", "ml/labels.py"]
IO_MODULES = {"redis", "celery", "tasks", "requests", "socket", "os", "subprocess",
              "alpaca", "polygon", "urllib"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((REPO / "core").rglob("*.py")) +
                         sorted((REPO / "ml").rglob("*.py")), ids=lambda p: p.name)
def test_core_and_ml_never_import_celery_or_tasks(path: Path) -> None:
    assert not imported_roots(path) & {"celery", "tasks"}, path


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_no_io(rel: str) -> None:
    bad = imported_roots(REPO / rel) & IO_MODULES
    assert not bad, f"{rel} imports {bad}"
