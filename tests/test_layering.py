"""The layering rules of docs/architecture.md, read from the source's import statements.

contracts/ imports no other part of raylight; rollout/, rewards/ and learners/ never import
ray, actors/ or cluster/; rollout/ and rewards/ never import each other; learners/ reaches
rollout/ and rewards/ not at all (it learns from contracts). Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "contracts": {"ray", "rollout", "rewards", "learners", "actors", "cluster", "torch", "vllm"},
    "rollout": {"ray", "actors", "cluster", "rewards", "learners"},
    "rewards": {"ray", "actors", "cluster", "rollout", "learners", "torch"},
    "learners": {"ray", "actors", "cluster", "rollout", "rewards"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in ``path`` (module level and in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_design_allows(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no source files under {layer}/"
    broken = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[layer])
        for f in files
        if imported_packages(f) & FORBIDDEN[layer]
    }
    assert not broken, f"{layer}/ imports what docs/architecture.md forbids it: {broken}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from cluster.driver import Trainer\n    import ray.util\n")
    assert imported_packages(source) == {"os", "cluster", "ray"}
