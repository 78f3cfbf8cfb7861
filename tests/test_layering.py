"""The package is layered bottom-up (docs/architecture.md): each floor imports only from the
floors below it (and from itself). This reads every module's imports, static and inside
functions, and fails on any that reaches up or sideways, and on any circle of modules that
import each other (within a floor too)."""

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
    "parallel": 3,  # process groups, FSDP2 / DDP wrapping, DCP state: beside the stats
    "optim": 3,  # AdamW with 8-bit moments, bf16 gradient store: on the numerics only
    "model": 4,  # the transformer, attention, presets, the Llama naming and directories
    "data": 4,  # corpus sources, tokenizer, preparation, batches (beside the model)
    "config": 5,  # the run config: composes the model, data, recipe and parallel settings
    "checkpoint": 6,  # write, read, manifest, which checkpoint, where a run starts
    "train": 7,  # optimizer, session, step, hooks, preemption, run log, the loop, golden
    "interop": 8,  # export / import / evaluation / generation of trained models
    "report": 9,  # reads what training and evaluation wrote (eval.json's entries: interop)
    "compare": 10,
    "cli": 11,
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
        "import torch\n\ndef f():\n    from mxfp8.model.transformer import Transformer\n"
    )
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "s.py").write_text("import mxfp8.parallel.comm\nimport mxfp8.layers\n")
    (tmp_path / "extra.py").write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.py").write_text("from mxfp8.model.config import ModelConfig\n")
    assert violations(tmp_path) == [
        "data/d.py:1 (data) imports model",
        "extra has no floor: add it to FLOORS and the architecture doc",
        "numerics/q.py:4 (numerics) imports model",
        "stats/s.py:1 (stats) imports parallel",
    ]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["mxfp8", *parts])


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (imports for annotations only: never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the mxfp8 modules it imports (at import time or inside functions; not under
    TYPE_CHECKING). ``from mxfp8.a import b`` names the module ``mxfp8.a.b`` when b is one."""
    files = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        edges = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                edges.update(s if s in files else node.module for s in subs)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of two or more
    modules (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_module_imports_a_module_that_imports_it_back():
    found = circles(import_graph(PACKAGE))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_circles_and_only_them(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "a" / "x.py").write_text("from mxfp8.a import y\n")
    (tmp_path / "a" / "y.py").write_text("def f():\n    from mxfp8.a.z import g\n")
    (tmp_path / "a" / "z.py").write_text("import mxfp8.a.x\n")
    (tmp_path / "a" / "w.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mxfp8.a.v import h\n"
    )
    (tmp_path / "a" / "v.py").write_text("from mxfp8.a.w import k\nfrom mxfp8.a import x\n")
    graph = import_graph(tmp_path)
    assert graph["mxfp8.a.x"] == {"mxfp8.a.y"} and graph["mxfp8.a.w"] == set()
    assert circles(graph) == [["mxfp8.a.x", "mxfp8.a.y", "mxfp8.a.z"]]
