"""The package's shape: imports run one way, with no cycles — function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "studio"

# Lower layers never import higher ones (a helper a lower layer needs from a higher one lives in
# the wrong place). Each entry: module prefix → prefixes it must not import.
FORBIDDEN = {
    "studio.errors": ("studio.",),
    "studio.logs": ("studio.",),
    "studio.files": ("studio.",),
    "studio.catalog": ("studio.engine", "studio.models", "studio.memory", "studio.service", "studio.ui", "studio.app"),
    "studio.hardware": ("studio.engine", "studio.models", "studio.memory", "studio.service", "studio.ui", "studio.app"),
    "studio.metadata": ("studio.engine", "studio.models", "studio.memory", "studio.service", "studio.ui",
                        "studio.app", "studio.gallery"),
    "studio.gallery": ("studio.engine", "studio.models", "studio.memory", "studio.service", "studio.ui", "studio.app"),
    "studio.blobs": ("studio.engine", "studio.models", "studio.service", "studio.ui", "studio.app", "studio.gallery"),
    "studio.memory": ("studio.engine", "studio.models", "studio.service", "studio.ui", "studio.app"),
    "studio.models": ("studio.engine", "studio.service", "studio.ui", "studio.app"),
    "studio.demo": ("studio.engine", "studio.models", "studio.service", "studio.ui", "studio.app"),
    "studio.engine": ("studio.service", "studio.ui", "studio.app"),
    "studio.service": ("studio.ui", "studio.app"),
    "studio.ui": ("studio.app",),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every studio module ``name`` imports, anywhere in the file (function bodies too). Importing
    ``a.b.c`` imports the packages ``a`` and ``a.b`` first, so those count as edges as well."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("studio"):
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    out.add(candidate)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        edges = _imports(name, path, known)
        # a package's __init__ importing its own submodules is not a cycle with them
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def test_there_are_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_imports_run_one_way():
    graph = _graph()
    wrong = []
    for name, edges in graph.items():
        for prefix, banned in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                wrong += [f"{name} imports {e}" for e in edges
                          if any(e == b.rstrip(".") or e.startswith(b if b.endswith(".") else b + ".") or e == b
                                 for b in banned) and not (e == prefix or e.startswith(prefix + "."))]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checker_sees_function_local_imports(tmp_path):
    """The cycle finder reads imports inside functions (the kind that hid the old 19-module cycle)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from studio.service import Studio\n    from .engine import validate\n")
    edges = _imports("studio.models.manager", src, {"studio.service", "studio.models.engine", "studio"})
    assert edges == {"studio", "studio.service", "studio.models.engine"}


def test_the_ui_touches_no_files_or_models_directly():
    """The UI builds requests and shows results; it opens no files, and imports neither torch nor
    the model manager (STYLE: callbacks never reach into torch, the file system or SQLite)."""
    offenders = []
    for path in (PACKAGE / "ui").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "open" and \
                        getattr(getattr(node.func, "value", None), "id", "") in ("Image", "os"):
                    offenders.append(f"{path.name}: {ast.unparse(node)[:60]}")
                continue
            for n in names:
                if n.split(".")[0] in ("torch", "diffusers", "sqlite3", "PIL") or n.startswith("studio.models"):
                    offenders.append(f"{path.name} imports {n}")
    assert not offenders, "\n".join(offenders)
