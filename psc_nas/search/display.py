"""What a person watching ``psc-search`` sees, from the engine's events (``events``).

In a terminal: a line per result (trial scored, over budget, failed, front moved, retrained) scrolling
above a live bar that says what runs now, architectures done of planned, the front's size, the time
elapsed and an honest estimate of the time left (``Clock``), both ticking every refresh. Anywhere else
(a pipe, a batch job's log): the same lines, plain text, one per event, each flushed as it happens and
prefixed by the time elapsed; no live display, no ANSI codes; when nothing happened for a while, one
status line says what is still running. The run ends with the front table and the commands that open
the run (``psc-dashboard``) and export its pick (``psc-export``).

Imports nothing heavy (rich and the standard library only), so the command line shows its first line
before PyTorch, Lightning and Optuna load.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from psc_nas.costs import format_count
from psc_nas.search.events import (
    Evaluated,
    Evaluating,
    Event,
    Failed,
    FrontChanged,
    OverBudget,
    Preparing,
    Promoting,
    Retrained,
    Retraining,
    RetrainPlanned,
    Started,
    clock,
    describe,
)

if TYPE_CHECKING:
    from psc_nas.search.front import Front
    from psc_nas.search.record import Objective

PLAIN_WIDTH = 160  # a log file has no width; tables are laid out at this one
HEARTBEAT_S = 60.0  # plain output: a status line after this long without one


# ---------------------------------------------------------------------------------------------- time
class Clock:
    """Time elapsed since the command started, and the time left, estimated from what the run measured.

    The search loop's rest: architectures to go × the wall time per architecture measured so far (sampling,
    pricing, training and promotions included), plus the promoted evaluations to go at their measured length;
    never past the loop's time limit plus one evaluation (the limit stops only the start of evaluations).
    Retraining after it: with a time budget it fills the time left (its schedule is chosen to), so the run's
    end is the budget's end; once its schedule is known, members to go × epochs × the measured epoch, minus
    the time the current one has run. Without a time budget, retraining's length is unknown until planned
    and the text says so.
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.start = now()
        self.phase = "preparing"  # preparing | search | retrain | finished
        self.done = self.planned = 0
        self.loop_start: float | None = None
        self.done_at_start = 0
        self.loop_end: float | None = None
        self.run_end: float | None = None
        self.retrain = 0
        self.plan: RetrainPlanned | None = None
        self.retrained = 0
        self.retrain_mark: float | None = None  # when the current retraining started (or the plan was made)
        self.retrain_seconds: list[float] = []
        self.seconds: dict[int, list[float]] = {}  # measured evaluations by fidelity key
        self.promotions: dict[int, int] = {}  # trial -> fidelity key: promoted, not evaluated there yet
        self.evaluating: tuple[int, int, float] | None = None  # trial, fidelity key, since

    def elapsed(self) -> float:
        return self.now() - self.start

    def update(self, event: Event) -> None:
        t = self.now()
        if not isinstance(event, Preparing):
            self.done, self.planned = event.done, event.planned
        if isinstance(event, Started):
            self.phase, self.loop_start, self.done_at_start = "search", t, event.done
            self.loop_end = None if event.loop_s is None else t + event.loop_s
            self.run_end = None if event.end_s is None else t + event.end_s
            self.retrain = event.retrain
        elif isinstance(event, Promoting):
            self.promotions.update({number: event.fidelity.key for number in event.numbers})
        elif isinstance(event, Evaluating):
            if not event.promoted:  # a new bracket: promotions the time limit skipped will not come
                self.promotions.clear()
            self.evaluating = (event.number, event.fidelity.key, t)
        elif isinstance(event, (Evaluated, Failed)):
            if isinstance(event, Evaluated) and not event.reused:
                self.seconds.setdefault(event.fidelity.key, []).append(event.seconds)
            self.promotions.pop(event.number, None)
            self.evaluating = None
        elif isinstance(event, Retraining):
            self.phase = "retrain"
            self.retrain_mark = t
        elif isinstance(event, RetrainPlanned):
            self.phase, self.plan, self.retrained, self.retrain_mark = "retrain", event, 0, t
        elif isinstance(event, Retrained):
            self.retrain_seconds.append(event.seconds)
            if self.plan is not None and event.number in self.plan.numbers:
                self.retrained += 1
            self.retrain_mark = t

    def finish(self) -> None:
        self.phase = "finished"

    def left(self) -> tuple[float | None, str]:
        """Seconds left (None: not known yet) and what bounds the estimate: ``measured``, ``budget``
        (the time limit comes first), ``search only`` (retraining follows, length unknown) or ``unknown``."""
        t = self.now()
        if self.phase == "search":
            loop, how = self._loop_left(t)
            if not self.retrain:
                return loop, how
            if self.run_end is not None:  # retraining fills the budget's rest
                return max(self.run_end - t, loop or 0.0), "budget"
            return loop, "search only"
        if self.phase == "retrain":
            budget = None if self.run_end is None else max(0.0, self.run_end - t)
            estimate = self._retrain_left(t)
            if estimate is None:
                return budget, "budget" if budget is not None else "unknown"
            if budget is not None and budget < estimate:
                return budget, "budget"
            return estimate, "measured"
        return (0.0, "measured") if self.phase == "finished" else (None, "unknown")

    def _loop_left(self, t: float) -> tuple[float | None, str]:
        measured = None
        finished = self.done - self.done_at_start
        if self.loop_start is not None and finished > 0:
            measured = max(0, self.planned - self.done) * (t - self.loop_start) / finished
        promotions = self._promotions_left(t)
        if promotions is not None:
            measured = (measured or 0.0) + promotions
        if self.loop_end is None:
            return measured, "measured" if measured is not None else "unknown"
        every = [s for seconds in self.seconds.values() for s in seconds]
        mean = sum(every) / len(every) if every else 0.0
        if t < self.loop_end:  # the limit stops starting evaluations: one may start just before it
            budget = self.loop_end - t + mean
        elif self.evaluating is not None:  # the last one runs past the limit
            budget = max(0.0, mean - (t - self.evaluating[2]))
        else:
            budget = 0.0
        if measured is None or budget < measured:
            return budget, "budget"
        return measured, "measured"

    def _promotions_left(self, t: float) -> float | None:
        """The promoted evaluations still to run, each as long as the mean measured at its fidelity (or the
        next lower one, scaled by the keys: epochs), less what the running one has run."""
        if not self.promotions:
            return None
        total = sum(self._evaluation_s(key) for key in self.promotions.values())
        if self.evaluating is not None and self.evaluating[0] in self.promotions:
            total -= t - self.evaluating[2]
        return max(0.0, total)

    def _evaluation_s(self, key: int) -> float:
        if self.seconds.get(key):
            return sum(self.seconds[key]) / len(self.seconds[key])
        lower = [k for k in self.seconds if k < key and self.seconds[k]]
        if not lower:
            return 0.0
        below = max(lower)
        return sum(self.seconds[below]) / len(self.seconds[below]) * key / max(below, 1)

    def _retrain_left(self, t: float) -> float | None:
        if self.plan is None or self.retrain_mark is None:
            return None
        to_go = max(0, len(self.plan.numbers) - self.retrained)
        if self.plan.epoch_s is not None:
            each = self.plan.epochs * self.plan.epoch_s
        elif self.retrain_seconds:
            each = sum(self.retrain_seconds) / len(self.retrain_seconds)
        else:
            return None
        return max(0.0, to_go * each - (t - self.retrain_mark)) if to_go else 0.0

    def eta(self) -> str:
        """The time left in words: ``~4:10 left``, ``≤4:10 left (time budget)``, ``~2:00 + retraining``."""
        seconds, how = self.left()
        if self.phase == "finished":
            return "done"
        if seconds is None:
            return "time left: measuring" if self.phase != "preparing" else ""
        if seconds <= 0:
            return "finishing"
        if how == "budget":
            return f"≤{clock(seconds)} left (time budget)"
        if how == "search only":
            return f"~{clock(seconds)} + retraining"
        return f"~{clock(seconds)} left"


class _ClockColumn(ProgressColumn):
    """Elapsed and time left, recomputed at every refresh: they move while one long evaluation runs."""

    def __init__(self, clock_: Clock) -> None:
        super().__init__()
        self.clock = clock_

    def render(self, task: object) -> Text:
        eta = self.clock.eta()
        return Text(f"{clock(self.clock.elapsed())} elapsed" + (f", {eta}" if eta else ""), style="cyan")


# ---------------------------------------------------------------------------------------------- displays
def console_for(stream: IO[str] | None = None) -> Console:
    """A console on ``stream`` (stdout by default): live and coloured in a terminal; plain text, no
    ANSI codes, lines never wrapped or cut, anywhere else."""
    console = Console(file=stream, highlight=False)
    if console.is_terminal and not console.is_dumb_terminal:
        return console
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PLAIN_WIDTH
    return Console(
        file=stream, highlight=False, color_system=None, force_terminal=False, emoji=False, width=width, soft_wrap=True
    )


_ACTIVE: list[Display] = []  # displays entered and not exited, innermost last


def active_display() -> Display | None:
    """The display the command line entered, which a search started inside it reports to."""
    return _ACTIVE[-1] if _ACTIVE else None


def make_display(console: Console, *, heartbeat_s: float = HEARTBEAT_S) -> Display:
    """The live display on an interactive terminal, else plain lines."""
    if console.is_terminal and not console.is_dumb_terminal and not console.quiet:
        return LiveDisplay(console)
    return PlainDisplay(console, heartbeat_s=heartbeat_s)


class Display:
    """Events in, lines out; what runs now and the front's size for the status. Enter to show, exit to
    stop (re-entrant: the command line enters it before the search does).

    Preparation (``stage``) is shown as the status, not as lines, until the search starts: a user error
    found while preparing (a budget nothing meets, a space of another task) stays the command's only line.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.clock = Clock()
        self.activity = "starting"
        self.activity_since = self.clock.now()
        self.front_size: int | None = None
        self.depth = 0
        self.lock = threading.RLock()

    # -- context
    def __enter__(self) -> Display:
        with self.lock:
            self.depth += 1
            if self.depth == 1:
                _ACTIVE.append(self)
                self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        with self.lock:
            self.depth -= 1
            last = self.depth == 0
            if last:
                _ACTIVE.remove(self)
        if last:
            self.stop(failed=kind is not None)  # not under the lock: a status thread may be waiting for it

    def start(self) -> None:
        pass

    def stop(self, *, failed: bool = False) -> None:
        pass

    # -- input
    def __call__(self, event: Event) -> None:
        with self.lock:
            self.clock.update(event)
            if isinstance(event, FrontChanged):
                self.front_size = len(event.front.members)
            self._set_activity(event)
            if isinstance(event, Preparing):
                self.staged(describe(event))
            elif not isinstance(event, (Evaluating, Retraining)):  # starts show in the status, results as lines
                self.line(describe(event), progress=isinstance(event, (Evaluated, OverBudget, Failed, Retrained)))
            self.refresh()

    def stage(self, what: str) -> None:
        """Work before the search (loading, pricing, opening the study): the status, and a line once the
        search has started (plain output prints the held ones then, with their times)."""
        self(Preparing(what))

    def note(self, text: str, *, warning: bool = False) -> None:
        """A message the search logged (not an event): a line."""
        with self.lock:
            self.line(f"warning: {text}" if warning else text, progress=False)

    def _set_activity(self, event: Event) -> None:
        activity = None
        if isinstance(event, Preparing):
            activity = event.what
        elif isinstance(event, Started):
            activity = "sampling"
        elif isinstance(event, Evaluating):
            step = "promoted to" if event.promoted else "at"
            activity = f"trial {event.number} {step} {event.fidelity.words}"
        elif isinstance(event, Retraining):
            activity = f"retraining trial {event.number}, {event.epochs} epoch{'s' if event.epochs != 1 else ''}"
        elif isinstance(event, Promoting):
            activity = describe(event)
        elif isinstance(event, (Evaluated, OverBudget, Failed)):
            activity = "sampling and pricing the next architecture"
        if activity is not None:
            self.activity, self.activity_since = activity, self.clock.now()

    # -- output
    def line(self, text: str, *, progress: bool) -> None:
        raise NotImplementedError

    def staged(self, text: str) -> None:
        """A preparation step: a line once the search has started, the status only before."""
        if self.clock.phase != "preparing":
            self.line(text, progress=False)

    def refresh(self) -> None:
        pass

    def finish(self, front: Front, objectives: Sequence[Objective], out_dir: Path, best: str) -> None:
        """The end of a run: the front, the run folder, the commands to look at it and export it."""
        self.clock.finish()
        self.stop()
        with self.lock:
            self.console.print(front_table(front, objectives))
            self.console.print(
                f"run: {out_dir}  (trials.csv, pareto.json, front/, best.yaml = {best}, dashboard.html, search.log)",
                markup=False,
            )
            for text in commands(out_dir):
                self.console.print(text, markup=False)

    def progress_text(self, *, front: bool = True) -> str:
        planned = f"{self.clock.done}/{self.clock.planned} architectures" if self.clock.planned else ""
        front = f"front {self.front_size}" if front and self.front_size is not None else ""
        return ", ".join(part for part in (planned, front, self.clock.eta()) if part)


class PlainDisplay(Display):
    """One line per event, elapsed time first, flushed; a status line after ``heartbeat_s`` of silence."""

    def __init__(self, console: Console, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        super().__init__(console)
        self.heartbeat_s = heartbeat_s
        self.last_line = self.clock.now()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.held: list[str] | None = []  # preparation lines, printed with the first other line (None: since)

    def start(self) -> None:
        self.stopping.clear()
        if self.heartbeat_s > 0 and not self.console.quiet:
            self.thread = threading.Thread(target=self._beat, name="psc-search status", daemon=True)
            self.thread.start()

    def stop(self, *, failed: bool = False) -> None:
        self.stopping.set()
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self.lock:
            if failed:
                self.held = None  # the error is the line to read
            self._release()

    def staged(self, text: str) -> None:
        if self.held is None:
            self.line(text, progress=False)
        else:
            self.held.append(self._stamped(text))

    def line(self, text: str, *, progress: bool) -> None:
        status = self.progress_text(front=False)  # a result's line comes before the front it moves
        suffix = f"  [{status}]" if progress and status else ""
        self._release()
        self._print(self._stamped(text + suffix))

    def _stamped(self, text: str) -> str:
        return f"[{clock(self.clock.elapsed())}] {text}"

    def _release(self) -> None:
        held, self.held = self.held, None
        for text in held or ():
            self._print(text)

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)
        self.console.file.flush()
        self.last_line = self.clock.now()

    def _beat(self) -> None:
        while not self.stopping.wait(min(self.heartbeat_s, 5.0)):
            with self.lock:
                now = self.clock.now()
                if self.stopping.is_set() or now - self.last_line < self.heartbeat_s or self.clock.phase == "finished":
                    continue
                since = clock(now - self.activity_since)
                self.line(f"still {self.activity} ({since} so far)", progress=True)


class LiveDisplay(Display):
    """Result lines scroll above a live status bar: activity, architectures, front, elapsed and time left."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=60)),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("architectures · front {task.fields[front]} ·"),
            _ClockColumn(self.clock),
            console=console,
            refresh_per_second=2,
            transient=True,  # the result lines above it stay; an error after it is the last line on screen
        )
        self.bar = self.progress.add_task(self.activity, total=None, front="-")
        self.live = False

    def start(self) -> None:
        self.progress.start()
        self.live = True

    def stop(self, *, failed: bool = False) -> None:
        with self.lock:
            if self.live:
                self.progress.stop()
                self.live = False

    def line(self, text: str, *, progress: bool) -> None:
        stamp = Text(f"{clock(self.clock.elapsed()):>7} ", style="dim")
        self.progress.console.print(stamp + Text(text), highlight=False)

    def refresh(self) -> None:
        planned = self.clock.planned or None
        self.progress.update(
            self.bar,
            description=self.activity,
            completed=self.clock.done,
            total=planned,
            front="-" if self.front_size is None else str(self.front_size),
        )


class DisplayHandler(logging.Handler):
    """The package's log messages (not the events, which the display gets directly) as display lines."""

    def __init__(self, display: Display) -> None:
        super().__init__(logging.INFO)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "psc_event", False):
            return
        try:
            self.display.note(record.getMessage(), warning=record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)


def commands(out_dir: Path) -> list[str]:
    run = shlex.quote(str(out_dir))
    return [f"dashboard: psc-dashboard {run}", f"export best.yaml's network: psc-export {run}"]


# ---------------------------------------------------------------------------------------------- the end
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
    return "nan" if math.isnan(value) else f"{value:.4f}"
