"""House rules of DESIGN.md checked on the source: no module uses another module's `_private`
names (make the name public in the right room instead)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "modelscope_tui"

# Private names still crossing modules: none since the `values/` move of issue #13 (diff reached
# into audit's value layer). Add nothing here: make the name public in the right room instead.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The module a `from ... import` names, resolved against the importing module."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def private_uses(modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(user, 'module._name') for every `from X import _name` and every `X._name` where X is a
    module of the package bound by an import, across module boundaries."""
    found: set[tuple[str, str]] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        bound: dict[str, str] = {}  # local name -> package module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = absolute(name, is_package, node.level, node.module)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
                    elif is_private(alias.name) and source in modules and source != name:
                        found.add((name, full))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
                    elif alias.name.split(".")[0] in modules:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                target = dotted(node.value, bound)
                if target in modules and target != name:
                    found.add((name, f"{target}.{node.attr}"))
    return found


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """`a.b.c` (a chain of names) with its first name resolved through the imports; else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    return ".".join([bound[node.id], *reversed(parts)])


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_private_names_across_modules():
    found = private_uses(package_modules())
    new = sorted(found - ALLOWED)
    assert not new, "private names used across modules (make them public in their module):\n" + "\n".join(
        f"  {user}: {name}" for user, name in new
    )
    gone = sorted(ALLOWED - found)
    assert not gone, f"no longer used, drop from ALLOWED: {gone}"


def test_the_walk_sees_each_spelling(tmp_path):
    """The checker itself: relative and absolute imports, aliases, attribute access."""
    pkg = tmp_path / "modelscope_tui"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_x = _y = 1\nclass _K: ...\ndef f(): return _x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from ..a import _x, f\n"
        "from .. import a as aa\n"
        "import modelscope_tui.a\n"
        "def g():\n"
        "    from modelscope_tui.a import _K\n"
        "    return aa._K, modelscope_tui.a._y, aa.f, aa.__name__, f._private\n"
    )
    modules = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = p
    assert private_uses(modules) == {
        ("modelscope_tui.sub.b", "modelscope_tui.a._x"),
        ("modelscope_tui.sub.b", "modelscope_tui.a._K"),
        ("modelscope_tui.sub.b", "modelscope_tui.a._y"),
    }
