"""Dependencies point one way (README, "Architecture"): checked on the source, so a shortcut fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"peftfx": ROOT / "peftfx", "peftfx.passes": ROOT / "passes"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _top_level(body: list[ast.stmt]):
    """Statements run at import: the module's, and those in its top-level ``try`` and ``if`` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _top_level(block)
        elif isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported peftfx module, at module level) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in _top_level(tree.body)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level and not node.module:  # from . import a, b: the modules a and b, or names of the package
                targets = [f"{base}.{a.name}" for a in node.names]
                targets = [t if t in MODULES or t in NATIVE else base for t in targets]
            else:
                targets = [f"{base}.{node.module}" if node.level else node.module]
            out += [(t, id(node) in top) for t in targets if t and t.startswith("peftfx")]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("peftfx")]
    return out


NATIVE = {"peftfx._round"}  # C extensions (setup.py): they import nothing of peftfx
MODULES = modules()
ALL = {name: imports(name, path) for name, path in MODULES.items()}


def test_adapter_kinds_import_only_the_kind_contract():
    leaves = {name for name, targets in ALL.items() if {t for t, _ in targets} <= NATIVE}  # errors, sizes, rounding
    allowed = {"peftfx.sites", "peftfx.rewrite", *leaves}
    for name, targets in ALL.items():
        if name.startswith("peftfx.adapters"):
            assert [t for t, _ in targets if t not in allowed and not t.startswith("peftfx.adapters")] == [], name


def test_passes_do_not_reach_back_into_the_planner_or_the_entry_points():
    upstream = ("plan", "driver", "spec", "pattern", "values", "verify", "save", "swap", "export", "cli", "inputs")
    for name, targets in ALL.items():
        if name.startswith("peftfx.passes"):
            assert [t for t, _ in targets if t.removeprefix("peftfx.") in upstream] == [], name


def test_only_the_driver_and_verify_run_passes():
    users = {name for name, targets in ALL.items() if any(t.startswith("peftfx.passes") for t, _ in targets)}
    users = {u for u in users if not u.startswith("peftfx.passes")}
    assert users == {"peftfx.driver", "peftfx.verify", "peftfx.out_of_core"}  # out_of_core: merge's finite check


def test_no_lazy_imports_but_the_cli_commands():
    """The CLI imports what a command needs when it runs (onnx is slow to import); nothing else imports lazily,
    but the package's own version (``peftfx`` imports everything)."""
    lazy = {name for name, targets in ALL.items() for target, top in targets if not top and target != "peftfx"}
    assert lazy <= {"peftfx.cli"}


def test_graph_metadata_is_read_through_the_ir():
    for name, path in modules().items():
        if name != "peftfx.ir":
            assert not re.search(r"\bmeta(\.get|\.setdefault)?\(?\[?\"peftfx\"", path.read_text()), name
