"""What a person watching ``psc-search`` sees: a progress bar while it runs, the front when it ends."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from psc_nas.costs import format_count
from psc_nas.search.outputs import Front, Objective


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]searching"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("architectures"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("front: {task.fields[front]}"),
        console=console,
    )


def front_table(front: Front, objectives: Sequence[Objective]) -> Table:
    table = Table(title=f"Pareto front ({len(front.trials)} trials, hypervolume {front.hypervolume:.3f})")
    table.add_column("trial", justify="right")
    table.add_column("preset")
    for objective in objectives:
        table.add_column(objective.name, justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("architecture")
    for trial in sorted(front.trials, key=lambda t: t.values[1:]):
        mark = " (knee)" if front.knee is not None and trial.number == front.knee.number else ""
        cells = [_cell(o.name, v) for o, v in zip(objectives, trial.values)]
        summary = trial.user_attrs["arch"]
        table.add_row(f"{trial.number}{mark}", trial.user_attrs.get("preset") or "", *cells,
                      str(trial.user_attrs.get("fidelity")), _summary(summary))
    return table


def _cell(name: str, value: float) -> str:
    if name in ("params", "macs"):
        return format_count(int(value))
    if name == "latency_ms":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _summary(arch: dict) -> str:
    from psc_nas.arch import ArchConfig
    from psc_nas.ops import summary

    return summary(ArchConfig.from_dict(arch))
