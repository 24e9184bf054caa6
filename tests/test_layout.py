"""The layout is a map: no import circles, and no module imports another package's private name.

Read from the source with :mod:`ast` (nothing is imported), counting every import: top level,
``TYPE_CHECKING`` blocks and imports inside functions alike.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every mmsafe import in ``name``."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmsafe"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("mmsafe")]
    return [(m, n) for m, n in found if m in MODULES and m != name]


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def test_the_module_graph_has_no_cycle() -> None:
    graph = {m: {d for d, _ in _imports(m)} for m in MODULES}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_no_module_imports_a_private_name_of_another_package() -> None:
    bad = [
        f"{m} imports {name} from {dep}"
        for m in MODULES
        for dep, name in _imports(m)
        if name
        and name.startswith("_")
        and not name.endswith("__")
        and _package(dep) != _package(m)
    ]
    assert not bad, bad


def test_a_planted_circle_and_private_import_are_caught(tmp_path, monkeypatch) -> None:
    (tmp_path / "mmsafe").mkdir()
    (tmp_path / "mmsafe" / "__init__.py").write_text("")
    (tmp_path / "mmsafe" / "a.py").write_text("from mmsafe.b import x\n")
    (tmp_path / "mmsafe" / "sub").mkdir()
    (tmp_path / "mmsafe" / "sub" / "__init__.py").write_text("")
    (tmp_path / "mmsafe" / "b.py").write_text("def f():\n    from mmsafe.sub.c import _y\n")
    (tmp_path / "mmsafe" / "sub" / "c.py").write_text("import mmsafe.a\n_y = 1\n")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "SRC", tmp_path)
    monkeypatch.setattr(here, "MODULES", _modules())
    try:
        test_the_module_graph_has_no_cycle()
    except AssertionError as err:
        assert "mmsafe.a -> mmsafe.b -> mmsafe.sub.c -> mmsafe.a" in str(err)
    else:
        raise AssertionError("the planted circle was not found")
    try:
        test_no_module_imports_a_private_name_of_another_package()
    except AssertionError as err:
        assert "mmsafe.b imports _y from mmsafe.sub.c" in str(err)
    else:
        raise AssertionError("the planted private import was not found")
