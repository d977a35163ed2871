"""Layering: every module of psc_nas imports only from its own layer or lower ones.

The layer table lives in one place, docs/architecture.md ("Layers"), and is read from there.
Every import counts, at module level or inside a function; only ``if TYPE_CHECKING:`` blocks are
exempt, since they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "psc_nas"
TABLE = re.compile(r"<!-- layers:.*?-->(.*?)<!-- /layers -->", re.DOTALL)


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer name, module prefixes) from docs/architecture.md, lowest layer first."""
    match = TABLE.search((ROOT / "docs" / "architecture.md").read_text())
    assert match, "docs/architecture.md has no <!-- layers: ... --> table"
    rows = [line.split("|")[1:3] for line in match.group(1).splitlines() if line.startswith("| ")]
    return [(name.strip(), re.findall(r"`([\w.]+)`", modules)) for name, modules in rows[1:]]


LAYERS = layer_table()
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int | None:
    """The rank of the longest listed prefix of ``module``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in RANK:
            return RANK[".".join(parts[:end])]
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def exists(module: str) -> bool:
    relative = Path(*module.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, imported psc_nas module) for every import outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    own = module_name(path)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = own.split(".") if is_package(path) else own.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from psc_nas import ops` imports the module psc_nas.ops
                found.append((node.lineno, f"{base}.{alias.name}" if exists(f"{base}.{alias.name}") else base))
    return [(line, name) for line, name in found if name == "psc_nas" or name.startswith("psc_nas.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_table_is_read_and_names_the_layers_in_order():
    names = [name for name, _ in LAYERS]
    assert names[:4] == ["base", "arch", "ops", "nets"] and names[-1] == "facade"
    assert layer_of("psc_nas.search.runner") > layer_of("psc_nas.dashboard") > layer_of("psc_nas.search.engine")


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    own = module_name(path)
    rank = layer_of(own)
    assert rank is not None, f"{own} is in no layer of docs/architecture.md's table"
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name} ({LAYERS[layer_of(name)][0]}) from layer {LAYERS[rank][0]}"
        for line, name in imports(path, source)
        if layer_of(name) is not None and layer_of(name) > rank
    ]


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_module_imports_from_a_higher_layer(path: Path):
    upward = upward_imports(path)
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", [p for p in SOURCES if p.stem == "registry"], ids=lambda p: str(p.parent.name))
def test_registries_are_leaves(path: Path):
    """A registry imports nothing of its own layer: the modules it registers import it, not the reverse."""
    rank = layer_of(module_name(path))
    same = [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imports(path) if layer_of(name) == rank]
    assert not same, "\n".join(same)


def test_an_upward_import_inside_a_function_is_reported_with_file_and_line():
    """The check can fail: arch importing nets in a function is caught, a TYPE_CHECKING import is not."""
    source = (
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import psc_nas.train\n\n\n"
        "def later():\n    from psc_nas.nets import validate\n    from . import ops\n"
    )
    assert upward_imports(PACKAGE / "arch.py", source) == [
        "psc_nas/arch.py:8 imports psc_nas.nets (nets) from layer arch",
        "psc_nas/arch.py:9 imports psc_nas.ops (ops) from layer arch",
    ]
    assert upward_imports(PACKAGE / "cli.py", "from psc_nas import cost\n") == [
        "psc_nas/cli.py:1 imports psc_nas (facade) from layer cli"
    ]
