"""The package's modules import each other without a circle (imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PKG = "dualpipe_ext"


def _modules() -> Dict[str, Path]:
    """Module name -> source file: dualpipe_ext/**/*.py, and kernels/*.py as dualpipe_ext.kernels.*."""
    mods = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "kernels", f"{PKG}.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([prefix] + parts)] = path
    return mods


def _imports(name: str, path: Path, mods: Dict[str, Path]) -> Set[str]:
    """The package modules ``name`` imports anywhere in its file (a name ``from X import Y`` binds counts
    as an import of ``X.Y`` when that is a module, else of ``X``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in mods and t != name)
    return out


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle of ``graph`` as a list of modules, or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "dualpipe_ext.moe.ep_memory" in graph["dualpipe_ext.moe.ep_buffer"]
    assert "dualpipe_ext.kernels._triton" in graph["dualpipe_ext.kernels._common"]  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = _graph()
    cycle = _cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)
