"""The package is layered bottom-up (docs/architecture.md): each floor imports only from the
floors below it (and from itself). This reads every module's imports, static and inside
functions, and fails on any that reaches up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import mxfp8

PACKAGE = Path(mxfp8.__file__).parent

# floor of each top-level package or module of mxfp8; a floor may import lower numbers only
FLOORS = {
    "errors": 0,  # shared leaf modules: the user-facing error type, atomic file writes
    "fileio": 0,
    "numerics": 1,
    "layers": 2,
    "stats": 3,
    "parallel": 3,  # beside train, below it: train drives the parallel set-up
    "train": 4,
    "interop": 5,  # export / import / evaluation / generation of trained models
    "report": 6,  # reads what training and evaluation wrote (eval.json's entries: interop)
    "compare": 7,
    "cli": 8,
}
ENTRY = {"__init__", "__main__"}  # the lazy public names and ``python -m mxfp8``


def _unit(root: Path, path: Path) -> str:
    rel = path.relative_to(root).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mxfp8" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def violations(root: Path) -> list[str]:
    """Every import under ``root`` (an mxfp8 package tree) that reaches up or sideways."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(root, path)
        if unit in ENTRY:
            continue
        if unit not in FLOORS:
            wrong.append(f"{unit} has no floor: add it to FLOORS and the architecture doc")
            continue
        for line, target in _imports(path):
            if target != unit and FLOORS.get(target, 99) >= FLOORS[unit]:
                wrong.append(f"{path.relative_to(root)}:{line} ({unit}) imports {target}")
    return wrong


def test_every_module_imports_only_from_lower_floors():
    wrong = violations(PACKAGE)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_checker_catches_upward_sideways_and_unplaced_modules(tmp_path):
    (tmp_path / "numerics").mkdir()
    (tmp_path / "numerics" / "q.py").write_text(
        "import torch\n\ndef f():\n    from mxfp8.train.model import Transformer\n"
    )
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "s.py").write_text("import mxfp8.parallel.comm\nimport mxfp8.layers\n")
    (tmp_path / "extra.py").write_text("")
    assert violations(tmp_path) == [
        "extra has no floor: add it to FLOORS and the architecture doc",
        "numerics/q.py:4 (numerics) imports train",
        "stats/s.py:1 (stats) imports parallel",
    ]
