"""The layout stays carryable: no import cycle between the top-level modules, none over 900 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
MAX_LINES = 900
# Modules over the limit until a pending split lands (strict: the test fails once the module fits, so the
# entry is removed then). Empty since issue #19 split retrieval.py into vector_index.py and catalogue.py.
OVER_LIMIT_PENDING_SPLIT: dict[str, str] = {}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere: at top level, inside functions, under
    ``if TYPE_CHECKING``, or by name through ``__import__("m")`` / ``importlib.import_module("m")``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if fn in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                out.add(node.args[0].value.split(".")[0])
    return out & known


def import_cycles(folder: Path) -> list[list[str]]:
    """Groups of modules of ``folder`` (top-level *.py) that import each other, directly or around a cycle."""
    names = sorted(p.stem for p in folder.glob("*.py"))
    index = {n: i for i, n in enumerate(names)}
    edges = [(index[n], index[m]) for n in names for m in imported_modules(folder / f"{n}.py", set(names))]
    self_imports = [[names[a]] for a, b in edges if a == b]
    rows, cols = (np.array(x, dtype=int) for x in zip(*edges)) if edges else (np.zeros(0, int), np.zeros(0, int))
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, label = connected_components(graph, directed=True, connection="strong")
    groups = [[names[i] for i in np.flatnonzero(label == c)] for c in np.unique(label)]
    return self_imports + [g for g in groups if len(g) > 1]


def test_import_cycle_detector_sees_function_level_and_by_name_imports(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("def g():\n    return __import__('a')\n")
    (tmp_path / "d.py").write_text("import importlib\nimportlib.import_module('d')\nimport numpy\n")
    (tmp_path / "e.py").write_text("import a\n")
    assert sorted(map(sorted, import_cycles(tmp_path))) == [["a", "b", "c"], ["d"]]
    (tmp_path / "c.py").write_text("def g():\n    return 1\n")
    assert import_cycles(tmp_path) == [["d"]]


def test_no_import_cycles_between_top_level_modules():
    assert len(MODULES) > 10
    assert import_cycles(ROOT) == [], "modules that import each other (move the shared part so the arrow goes one way)"


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=OVER_LIMIT_PENDING_SPLIT[m]))
    if m in OVER_LIMIT_PENDING_SPLIT else m for m in MODULES])
def test_no_module_over_900_lines(module):
    n = len((ROOT / f"{module}.py").read_text().splitlines())
    assert n <= MAX_LINES, f"{module}.py has {n} lines (> {MAX_LINES}): give it a flat sibling module"
