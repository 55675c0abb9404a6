"""The A2A agents and clients that stand for what organizations already run import no Fedgate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    ROOT / "gateway" / "edges" / "a2a" / "demo_agent.py",
    ROOT / "tests" / "a2a" / "scenario_agent.py",
    ROOT / "tests" / "a2a" / "agents.py",
]


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_written_only_with_a2a_sdk(path: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"gateway", "participant_sdk", "fedgate", "tests"}, imported
