"""The package layout: imports point one way (models <- core <- drafter/serving <- services <- stack/bench <- cli),
no service folder imports another (they meet over gRPC only), and every sub-package says in its docstring what
lives there. Imports are read with `ast` from the source, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "services" / "dspark"
SERVICES = ("draft", "verifier", "router")
# what each part of the package may import from dspark; "v1" is the generated gRPC stubs, shared ground
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "core": {"models"},
    "drafter": {"core", "models"},
    "serving": {"core", "models", "v1"},
    "runtime": {"drafter", "core", "models"},
    "draft": {"serving", "drafter", "core", "models", "v1"},
    "verifier": {"serving", "core", "models", "v1"},
    "router": {"serving", "core", "models", "v1"},
    "stack": {*SERVICES, "serving", "runtime", "drafter", "core", "models", "v1"},
    "bench": {"stack", "runtime", "drafter", "core", "models", "v1"},
    "cli": {"stack", "bench", *SERVICES, "serving", "runtime", "drafter", "core", "models", "v1"},
}


def part_of(module: str) -> str | None:
    """The layout part a dotted dspark module belongs to ("dspark.core.engine" -> "core"); None for the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dspark" and len(parts) > 1 else None


def dspark_imports(source: str, module: str) -> set[str]:
    """Every dspark module `source` (the text of `module`) imports, at any depth, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dspark"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "dspark":
                continue
            if base == "dspark":  # from dspark import core, ...: each name is a module
                found |= {f"dspark.{a.name}" for a in node.names}
            else:
                found.add(base)
    return found


def package_modules() -> dict[str, str]:
    """dotted module name -> source, for every hand-written module of the package (generated stubs excluded)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "v1" in rel.parts:
            continue
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path.read_text()
    return out


def violations(modules: dict[str, str]) -> list[str]:
    bad = []
    for module, source in modules.items():
        here = part_of(module)
        if here is None:
            continue
        for target in sorted(dspark_imports(source, module)):
            there = part_of(target)
            if there is None or there == here:
                continue
            if there not in ALLOWED.get(here, set()):
                bad.append(f"{module} imports {target} ({here} may import {sorted(ALLOWED.get(here, ()))})")
    return bad


MODULES = package_modules()


def test_every_module_belongs_to_a_known_part():
    parts = {part_of(m) for m in MODULES} - {None}
    assert parts == set(ALLOWED), f"parts without import rules: {parts - set(ALLOWED)}"


def test_imports_point_one_way():
    assert violations(MODULES) == []


def test_core_imports_no_drafter_serving_router_or_service():
    for module, source in MODULES.items():
        if part_of(module) == "core":
            parts = {part_of(t) for t in dspark_imports(source, module)}
            assert not parts & {"drafter", "serving", "stack", "bench", "runtime", "cli", *SERVICES}, module


def test_no_service_folder_imports_another():
    for module, source in MODULES.items():
        here = part_of(module)
        if here in SERVICES:
            others = {part_of(t) for t in dspark_imports(source, module)} & (set(SERVICES) - {here})
            assert not others, f"{module} imports the {others} service folder(s); services meet over gRPC only"


@pytest.mark.parametrize(
    "source",
    [
        "from dspark.router.loop import Router",
        "import dspark.serving.wire",
        "def f():\n    from dspark.draft import service\n",
        "from dspark import serving",
    ],
)
def test_the_check_catches_a_wrong_import(source):
    assert violations({"dspark.core.engine": source}), source


def test_relative_imports_are_resolved():
    assert dspark_imports("from ..serving import wire\nfrom . import x", "dspark.core.engine") == {
        "dspark.serving",
        "dspark.core",
    }


@pytest.mark.parametrize("part", sorted(set(ALLOWED) - {"runtime", "cli"}))
def test_each_subpackage_says_what_lives_there(part):
    init = PACKAGE / part / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and "import" in doc, f"{init}: one sentence on what lives there and what it may import"
