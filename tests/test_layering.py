"""The layering rules of docs/concepts.md#folders-and-what-each-may-import, read from the source's import statements.

contracts/ imports no other part of raylight; rollout/, rewards/ and learners/ never import
ray, actors/ or cluster/; rollout/ and rewards/ never import each other; learners/ reaches
rollout/ and rewards/ not at all (it learns from contracts). Inside cluster/, each room imports
only its own room and the rooms below it (``ROOMS``), and no two modules import each other,
directly or around a circle. Imports inside functions count too.
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


# cluster/'s rooms, lowest first: a module imports cluster modules of its own room or below
ROOMS = ["observe", "ground", "capacity", "keeping", "features", "loop", "commands"]


def imported_modules(path: Path) -> set[str]:
    """The full name of every module ``path`` imports from (module level and in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


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
    assert not broken, f"{layer}/ imports what docs/concepts.md forbids it: {broken}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from cluster.loop.driver import Trainer\n    import ray.util\n")
    assert imported_packages(source) == {"os", "cluster", "ray"}


def cluster_modules() -> dict[str, Path]:
    """Every module of cluster/ by its dotted name (a package by its __init__)."""
    modules = {}
    for path in sorted((ROOT / "cluster").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def room(module: str) -> str:
    """``cluster.loop.driver`` -> ``loop``; ``cluster.config`` (the top of cluster/) -> ``ground``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "ground"


def test_cluster_rooms_import_only_their_room_and_below():
    modules = cluster_modules()
    assert {room(m) for m in modules} == set(ROOMS), "a cluster/ room is missing from ROOMS"
    broken = {}
    for module, path in modules.items():
        above = {m for m in imported_modules(path) if m in modules and ROOMS.index(room(m)) > ROOMS.index(room(module))}
        if above:
            broken[module] = sorted(above)
    assert not broken, f"cluster/ modules import a room above their own (docs/concepts.md#the-rooms-of-cluster): {broken}"


def test_cluster_has_no_import_circle():
    modules = cluster_modules()
    edges = {m: {i for i in imported_modules(p) if i in modules and i != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(f"import circle in cluster/: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        for imported in sorted(edges[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(modules):
        visit(module, [])


def test_the_circle_check_sees_a_circle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other through a function are a circle."""
    package = tmp_path / "cluster"
    (package / "loop").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "loop" / "__init__.py").write_text("")
    (package / "loop" / "a.py").write_text("from cluster.loop.b import x\n")
    (package / "loop" / "b.py").write_text("def x():\n    from cluster.loop.a import y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="cluster.loop.a -> cluster.loop.b -> cluster.loop.a"):
        test_cluster_has_no_import_circle()
