"""The layering contract of docs/DESIGN.md, held by tests.

- The client path (``dinoserve.client``, ``dinoserve.index``, ``dinoserve.images`` and the
  model card) imports neither torch nor the training code, the app or the shell, so a
  client-only install stays small.
- No module of the library (``dinoserve/`` without the shell: ``cli.py``, ``commands/``,
  ``__main__.py``) imports the training code, the app or the shell, and the
  library's imports form no circle. Every import counts: module level, inside functions and
  under ``if TYPE_CHECKING:``, since each is a dependency a reader has to hold.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinoserve"

#: The shell: allowed to import anything, never imported by the library.
SHELL = ("dinoserve.cli", "dinoserve.commands", "dinoserve.__main__")
#: What the library must never import: the layers above it (and their pre-namespace names).
FORBIDDEN = ("dinoserve.training", "dinoserve.app", "dinoserve.commands", "dinoserve.cli",
             "training", "app")
#: Library modules that still break the contract, with why; each is xfailed, not hidden.
KNOWN_VIOLATIONS: dict[str, str] = {}


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _library_modules() -> dict[str, Path]:
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: path for name, path in modules.items() if not _is_under(name, SHELL)}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module,
    else of ``pkg``; ``importlib.import_module("x")`` with a literal name counts as well.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in known or _looks_like_module(candidate) else source)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _looks_like_module(name: str) -> bool:
    """``dinoserve.training.knn`` and friends: modules outside dinoserve/ that we forbid anyway."""
    return _is_under(name, FORBIDDEN)


def _graph() -> dict[str, set[str]]:
    modules = _library_modules()
    known = set(modules) | {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _forbidden_imports() -> dict[str, list[str]]:
    return {name: sorted(i for i in imports if _is_under(i, FORBIDDEN))
            for name, imports in _graph().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --- the client path, imported for real --------------------------------------------------------
def test_layers_client_path_imports_no_torch_training_app_or_shell():
    client_path = ["dinoserve.client", "dinoserve.backends", "dinoserve.index", "dinoserve.images"]
    if (PACKAGE / "card.py").is_file():
        client_path.append("dinoserve.card")
    code = (
        "import importlib, json, sys\n"
        f"for m in {client_path!r}:\n"
        "    importlib.import_module(m)\n"
        "from dinoserve import Client\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    unwanted = ("torch", "timm", "gradio", "onnx", "dinoserve.training", "dinoserve.app", "training", "app",
                "dinoserve.commands", "dinoserve.cli")
    assert [m for m in loaded if _is_under(m, unwanted)] == []
    assert set(client_path) <= set(loaded)


# --- the whole library, read statically -------------------------------------------------------
def _forbidden_cases():
    cases = []
    for name in sorted(_library_modules()):
        marks = []
        if name in KNOWN_VIOLATIONS:
            marks.append(pytest.mark.xfail(reason=KNOWN_VIOLATIONS[name], strict=True))
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


@pytest.mark.parametrize("module", _forbidden_cases())
def test_layers_library_module_never_imports_training_app_or_shell(module):
    bad = _forbidden_imports()[module]
    assert bad == [], f"{module} ({_library_modules()[module].relative_to(ROOT)}) imports {', '.join(bad)}"


def test_layers_library_has_no_import_circle():
    graph = _graph()
    # Every `import dinoserve.x` runs the package's __init__ first, so an edge to the package
    # root exists everywhere and says nothing about layers; the root is a lazy facade (PEP 562)
    # whose own imports are checked above. Edges inside the library are what can circle.
    library = set(graph) - {"dinoserve"}
    inner = {name: {i for i in imports if i in library and i != name} | ({name} & imports)
             for name, imports in graph.items() if name in library}
    assert _cycles(inner) == []


def test_layers_graph_sees_lazy_and_type_checking_imports(tmp_path):
    """The checker itself: imports inside functions and TYPE_CHECKING blocks are edges."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dinoserve.client import Client\n"
                 "def f():\n    from dinoserve import index_store\n    import dinoserve.training.knn\n")
    got = _imports(a, "dinoserve.a", {"dinoserve.client", "dinoserve.index_store"})
    assert {"dinoserve.client", "dinoserve.index_store", "dinoserve.training.knn"} <= got
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
