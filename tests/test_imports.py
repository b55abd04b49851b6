"""The runtime's import graph: no circle, and ``model/`` (which the hooks run) stays on the standard library floor.

Read with ``ast`` from the template's source, so every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "{{cookiecutter.app_name}}" / "xlab_chat"
MAX_LINES = 500  # a file a person can hold in their head


def module_name(path: Path) -> str:
    parts = ["xlab_chat", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> Set[str]:
    """Every module this file imports, relative imports resolved against its own package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import protocol`
    return found


def runtime_graph() -> Dict[str, Set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_names(path) if m in files and m != name} for name, path in files.items()}


def find_circle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, …, a], or [] when the graph has none."""
    state: Dict[str, int] = {}  # 1 on the current path, 2 done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return []


def test_the_circle_finder_sees_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_the_runtime_has_no_import_circle():
    graph = runtime_graph()
    assert "xlab_chat.engines.lora" in graph and "xlab_chat.model.check" in graph
    assert find_circle(graph) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("model/*.py")), ids=lambda p: p.name)
def test_model_imports_only_the_standard_library_and_never_reaches_up(path: Path):
    """The hooks run model/ with cookiecutter's interpreter: no engines/, no page/, nothing installed."""
    upward = sorted(m for m in imported_names(path) if m.startswith(("xlab_chat.engines", "xlab_chat.page")))
    assert upward == [], f"{path.name} imports {upward}"
    outside = sorted(m for m in imported_names(path) if not m.startswith("xlab_chat")
                     and m.split(".")[0] not in sys.stdlib_module_names and m != "__future__")
    assert outside == [], f"{path.name} imports {outside}"


def test_no_runtime_file_is_over_the_size_a_person_can_hold():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
