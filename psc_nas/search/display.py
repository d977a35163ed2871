"""What a person watching ``psc-search`` sees: a progress bar while it runs, the front when it ends."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from psc_nas.costs import format_count
from psc_nas.search.events import Event, FrontChanged, Retrained, RetrainPlanned, describe
from psc_nas.search.front import Front
from psc_nas.search.record import Objective


class ProgressBar:
    """Architectures evaluated of those planned, and the front's size, from the engine's events."""

    def __init__(self, console: Console, planned: int) -> None:
        self.progress = Progress(
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
        self.bar = self.progress.add_task("search", total=planned, front=0)

    def __call__(self, event: Event) -> None:
        fields = {"front": len(event.front.members)} if isinstance(event, FrontChanged) else {}
        self.progress.update(self.bar, completed=event.done, total=event.planned, **fields)
        if isinstance(event, (RetrainPlanned, Retrained)):  # a line per retrained network, above the bar
            self.progress.console.print(describe(event), highlight=False)

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def front_table(front: Front, objectives: Sequence[Objective]) -> Table:
    """The front by cost: search scores at the fidelity the search reached, and, for the members retrained
    after the search, the retrained score with how it was retrained; best.yaml's trial is marked."""
    table = Table(title=f"Pareto front ({len(front.members)} trials, hypervolume {front.hypervolume:.3f})")
    table.add_column("trial", justify="right")
    table.add_column("preset")
    for index, objective in enumerate(objectives):
        table.add_column(
            f"{objective.name} (search)" if index == 0 and front.retrained else objective.name, justify="right"
        )
    table.add_column("search fidelity" if front.retrained else "fidelity", justify="right")
    if front.retrained:
        table.add_column(f"{objectives[0].name} (retrained)", justify="right")
        table.add_column("retrained how", justify="right")
    table.add_column("architecture")
    best = front.best.number if front.best is not None else None
    for record in sorted(front.members, key=lambda r: r.values[1:]):  # type: ignore[index]
        mark = " (knee)" if front.knee is not None and record.number == front.knee.number else ""
        if front.retrained_knee is not None and record.number == best:
            mark += " (best.yaml)"
        cells = [_cell(o.name, v) for o, v in zip(objectives, record.values or ())]
        if front.retrained:
            retrained = record.retrained
            cells += [
                record.fidelity.words if record.fidelity else "",
                _cell(objectives[0].name, retrained.metrics.get(objectives[0].name, float("nan"))) if retrained else "",
                retrained.fidelity.words if retrained else "",
            ]
        else:
            cells.append(record.fidelity.words if record.fidelity else "")
        table.add_row(f"{record.number}{mark}", record.preset or "", *cells, record.summary() or "")
    return table


def _cell(name: str, value: float) -> str:
    if name in ("params", "macs"):
        return format_count(int(value))
    if name == "latency_ms":
        return f"{value:.1f}"
    return f"{value:.4f}"
