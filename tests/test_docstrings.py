"""Every public entry point says what it is for: a docstring on each public module, class and
function of the package, and a description on each named API endpoint (``client.view_api()``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "studio"


def _public(tree: ast.AST, prefix: str = ""):
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from _public(node, prefix + node.name + ".")


def test_every_public_module_class_and_function_has_a_docstring():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(PACKAGE.parent)
        if not ast.get_docstring(tree) and path.name != "__main__.py":
            missing.append(f"{rel}: the module")
        for name, node in _public(tree):
            # dataclass-style fields-only classes and trivial property accessors still need a line
            if not ast.get_docstring(node):
                missing.append(f"{rel}:{node.lineno} {name}")
    assert not missing, f"{len(missing)} public entry points without a docstring:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def api_info(tmp_path_factory):
    from studio.config import StudioConfig
    from studio.service import Studio
    from studio.ui.app import build_app

    demo = build_app(Studio(StudioConfig(data_dir=tmp_path_factory.mktemp("doc"), demo=True)))
    return demo.get_api_info()


def test_every_named_endpoint_has_a_description(api_info):
    endpoints = api_info["named_endpoints"]
    assert {"/txt2img", "/img2img", "/inpaint", "/turbo", "/load_model", "/gallery_list", "/read_png_info"} <= set(endpoints)
    bare = [name for name, e in endpoints.items() if not (e.get("description") or "").strip()]
    assert not bare, f"endpoints without a description: {bare}"
