"""Console scripts; each command is its own Typer app, named in ``[project.scripts]``.

User errors (``ValueError``, including ``ConfigError``) become one line on stderr and exit code 1.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from psc_nas import cost
from psc_nas.costs import format_count
from psc_nas.space import SearchSpace, shipped_spaces

space_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def fail(command: str, err: Exception) -> typer.Exit:
    typer.echo(f"{command}: {err}", err=True)
    return typer.Exit(1)


def format_size(size: int) -> str:
    """Exact below a million, scientific above (space sizes reach 1e+45)."""
    return str(size) if size < 10**6 else f"{size:.2e}"


@space_app.command()
def space(
    name_or_path: Annotated[
        Optional[str], typer.Argument(metavar="[NAME|PATH]", help="A shipped space name or a space YAML; all shipped spaces if omitted.")
    ] = None,
) -> None:
    """Show search spaces: backbone, slots, number of distinct architectures, and the presets' cost."""
    try:
        spaces = [SearchSpace.load(name) for name in ([name_or_path] if name_or_path else shipped_spaces())]
    except ValueError as err:
        raise fail("psc-space", err) from None
    console = Console()
    overview = Table("space", "backbone", "task", "slots", "decisions", "size", "input", title="search spaces")
    for item in spaces:
        input_size = "x".join(map(str, item.input_size))
        overview.add_row(
            item.name, item.backbone, item.task or "-", str(len(item.slots)), str(len(item.units)), format_size(item.size()), input_size
        )
    console.print(overview)
    for item in spaces:
        if name_or_path:
            console.print(decisions_table(item))
        console.print(presets_table(item))


def decisions_table(space: SearchSpace) -> Table:
    table = Table("decision", "slots", "ops", "choices", title=f"{space.name}: decisions ({space.source})")
    for unit, count in zip(space.units, space.option_counts):
        names = [space.slots[i].name for i in unit.slots]
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        table.add_row(unit.label, shown, ", ".join(unit.domains), str(count))
    return table


def presets_table(space: SearchSpace) -> Table:
    shape = "x".join(map(str, space.input_size))
    table = Table("preset", "params", "MACs", title=f"{space.name}: presets at {shape}")
    for name, config in space.presets().items():
        price = cost(config, space.input_size)
        table.add_row(name, format_count(price.params), format_count(price.macs))
    return table
