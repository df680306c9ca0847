"""No import cycles inside ``src/avec`` (issue 19, item 3).

Every module is parsed with :mod:`ast` (nothing is imported) and the graph of intra-package
imports is built. The rule:

* Module-level **and** function-level (lazy) imports count: a lazy import still ties two modules
  together, and the point is layering, not import-time order.
* Imports under ``if TYPE_CHECKING:`` do not count (they never run).
* ``import avec.a.b`` and ``from avec.a import b`` where ``b`` is a submodule are edges to
  ``avec.a.b``; ``from avec.a import name`` where ``name`` is not a submodule is an edge to the
  package ``avec.a`` (its ``__init__``). Relative imports are resolved first.
* Edges **into a package's ``__init__`` from inside that package** are dropped: a package
  ``__init__`` re-exports its submodules, so ``avec.x.y -> avec.x`` (or ``avec.y -> avec``) would
  make every re-export a trivial cycle. Such a submodule should import the defining module
  directly anyway; the rule keeps the test about real dependencies between modules.

The test fails listing every strongly connected component of size > 1, with the import lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Yield every Import/ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, dict[str, list[str]]]:
    """``{module: {imported module: [import lines]}}`` for the package under ``root``."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        name, is_pkg = _module_name(root, path)
        files[name] = (path, is_pkg)
    modules = set(files)

    def resolve(target: str) -> str | None:
        # the longest prefix of ``target`` that is a module of the package
        parts = target.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                return cand
            parts.pop()
        return None

    graph: dict[str, dict[str, list[str]]] = {m: defaultdict(list) for m in modules}
    for name, (path, is_pkg) in files.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        here = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(text, filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    if node.level > 1:
                        anchor = anchor[:-(node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            line = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
            for target in targets:
                dst = resolve(target)
                if dst is None or dst == name:
                    continue
                if files[dst][1] and (name + ".").startswith(dst + "."):
                    continue  # a submodule importing its own package's __init__ (see docstring)
                entry = f"{path.relative_to(root)}:{node.lineno}: {line}"
                if entry not in graph[name][dst]:
                    graph[name][dst].append(entry)
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def describe(graph: dict[str, dict[str, list[str]]], cycles: list[list[str]]) -> str:
    parts = []
    for comp in cycles:
        members = set(comp)
        parts.append("cycle: " + " <-> ".join(comp))
        for src in comp:
            for dst in sorted(graph[src]):
                if dst in members:
                    parts.extend(f"    {src} -> {dst}   {ln}" for ln in graph[src][dst])
    return "\n".join(parts)


def test_no_import_cycles_in_avec():
    graph = import_graph(SRC, "avec")
    assert "avec.vector" in graph  # the parser found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/avec:\n" + describe(graph, cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_cycle_finder_finds_a_lazy_relative_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from . import b\n\ndef f():\n    return b\n",
        "pkg/b.py": "def g():\n    from pkg.sub.c import h\n    return h\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def h():\n    from ..a import f\n    return f\n",
    })
    graph = import_graph(tmp_path, "pkg")
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert "pkg/sub/c.py:2" in describe(graph, cycles)


def test_cycle_finder_passes_an_acyclic_package(tmp_path):
    _write(tmp_path, {
        # __init__ re-exports; submodules importing `from pkg import x` are not cycles (rule)
        "pkg/__init__.py": "from pkg.a import f\nfrom pkg.b import g\n",
        "pkg/a.py": "import pkg.b\nfrom pkg import errors\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n"
                    "from pkg.errors import E\n",
        "pkg/errors.py": "class E(Exception):\n    pass\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"].keys() == {"pkg.b", "pkg.errors"}
    assert find_cycles(graph) == []


# The flow, bottom to top (DESIGN.md "Layout"): a module may import only from its own top-level
# folder or from a folder with a lower rank. A new top-level entry must be placed here.
LAYERS: dict[str, int] = {
    "_version": 0, "errors": 0,
    "formats": 1, "report": 1,
    "vector": 2,
    "models": 3,
    "data": 4,
    "directions": 5,
    "intervene": 6,
    "generation": 7,
    "evaluate": 8,
    "sae": 9, "discover": 9, "tuning": 9,
    "studies": 10,
    "serve": 11,
    "vllm": 12,  # the vLLM plugin reuses serve's request schema and limits
    "cli": 13,
    "": 14,  # avec/__init__.py, the public API
}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, dict[str, list[str]]],
                   layers: dict[str, int]) -> list[str]:
    """Every import from a top-level folder into one of the same or a higher rank; a top-level
    entry missing from ``layers`` is reported too."""
    bad = sorted({f"{_top(m) or '(root)'}: not placed in LAYERS"
                  for m in graph if _top(m) not in layers})
    for src, targets in sorted(graph.items()):
        a = _top(src)
        for dst, lines in sorted(targets.items()):
            b = _top(dst)
            if a == b or a not in layers or b not in layers:
                continue
            if layers[b] >= layers[a]:
                bad.extend(f"{a} (rank {layers[a]}) imports {b} (rank {layers[b]}): {ln}"
                           for ln in lines)
    return bad


def test_no_upward_imports_in_avec():
    graph = import_graph(SRC, "avec")
    bad = upward_imports(graph, LAYERS)
    assert not bad, "imports against the flow in src/avec:\n" + "\n".join(bad)


def test_layer_check_finds_an_upward_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "def f():\n    from pkg.high.b import g\n    return g\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from pkg.low.a import f\n",
        "pkg/side/c.py": "",
    })
    bad = upward_imports(import_graph(tmp_path, "pkg"), {"low": 1, "high": 2, "": 3})
    assert "side: not placed in LAYERS" in bad
    assert any(line.startswith("low (rank 1) imports high (rank 2): pkg/low/a.py:2") for line in bad)
    assert not any(line.startswith("high ") for line in bad)
