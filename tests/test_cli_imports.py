"""The command line's imports point one way: `cli.py` imports the subcommands and the shared
flag groups (`flags.py`); no module imports `cli.py` back, and `flags.py` imports no CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import sie_server

PACKAGE = Path(sie_server.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Absolute names of the sie_server modules that `path` imports (top level or inside a
    function)."""
    module = ".".join(("sie_server", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import cli`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("sie_server")}


def test_no_module_imports_the_cli_back() -> None:
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "sie_server.cli" in imports_of(p)}
    assert importers == set(), importers


def test_flags_import_no_command_module() -> None:
    found = imports_of(PACKAGE / "flags.py")
    assert not {n for n in found if n.endswith(".cli") or ".cli." in n}, found
    assert "sie_server.flags" in imports_of(PACKAGE / "corpus/cli.py")
    assert "sie_server.flags" in imports_of(PACKAGE / "ray/cli.py")
