"""Progress as events: what happened to which trial, with what a one-line report of it needs.

The engine emits them; the console's display, the run's log file (and any other consumer) subscribe.
Every event but ``Preparing`` carries the run's progress: architectures evaluated so far of those planned.

    Preparing ─► Started ─► (Evaluating ─► Evaluated | Failed) / OverBudget ... FrontChanged ... Promoting ...
    ─► Retraining (timing) ─► RetrainPlanned ─► (Retraining ─► Retrained) ...

This module imports nothing heavy (no torch, no Optuna), so the command line can show its first line
before those load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from psc_nas.costs import Cost, format_count

if TYPE_CHECKING:
    from psc_nas.evaluators.base import Fidelity
    from psc_nas.search.front import Front


@dataclass(frozen=True)
class Preparing:
    """Work before the first trial, or between phases: what is being done now, in words."""

    what: str


@dataclass(frozen=True)
class Started:
    """The search loop starts (or resumes) with ``planned - done`` architectures to go."""

    created: bool  # a new study, not a resumed one
    loop_s: float | None  # seconds from now after which the loop starts no evaluation (None: no time limit)
    end_s: float | None  # seconds from now by which the run, retraining included, should end (None: no limit)
    retrain: int  # front trials retrained after the loop (0: none)
    done: int
    planned: int


@dataclass(frozen=True)
class Promoting:
    """The promotion rule moves these trials of a bracket to the next fidelity (front candidates)."""

    numbers: tuple[int, ...]
    fidelity: Fidelity
    done: int
    planned: int


@dataclass(frozen=True)
class Evaluating:
    """An evaluation starts (not sent for a result reused from another trial)."""

    number: int
    fidelity: Fidelity
    promoted: bool  # to a higher fidelity than the cheapest
    summary: str
    done: int
    planned: int


@dataclass(frozen=True)
class Evaluated:
    number: int
    fidelity: Fidelity
    metric: str
    score: float
    seconds: float
    summary: str
    reused: bool  # another trial's result for the same architecture, not evaluated again
    done: int
    planned: int
    cost: Cost | None = None  # exact params and MACs at the task's input shape
    arch_hash: str = ""


@dataclass(frozen=True)
class OverBudget:
    number: int
    cost: Cost
    budget: str  # the budget in words
    summary: str
    done: int
    planned: int


@dataclass(frozen=True)
class Failed:
    number: int
    reason: str
    done: int
    planned: int
    summary: str = ""  # the architecture, when one was sampled


@dataclass(frozen=True)
class FrontChanged:
    """The feasible front moved: after a result (each trial counted at the highest fidelity it has
    reached so far, as the study will be told) or after the run folder was written."""

    front: Front
    done: int
    planned: int


@dataclass(frozen=True)
class Retraining:
    """One front trial's retraining from scratch starts; the first, before ``RetrainPlanned``, times one
    epoch of the costliest member to choose the schedule."""

    number: int
    epochs: int
    summary: str
    done: int
    planned: int


@dataclass(frozen=True)
class RetrainPlanned:
    """Retraining starts: these front trials, from scratch, for this many epochs (chosen to fit the time left)."""

    numbers: tuple[int, ...]
    epochs: int
    epoch_s: float | None  # one epoch of the costliest of them, measured; None without a time limit
    done: int
    planned: int


@dataclass(frozen=True)
class Retrained:
    """One front trial's architecture retrained: its retrained score beside its search score."""

    number: int
    metric: str
    score: float  # retrained
    fidelity: str  # how it was retrained, in words
    search_score: float | None
    search_fidelity: str | None  # how the search scored it, in words
    seconds: float
    summary: str
    done: int
    planned: int


Event = Union[
    Preparing,
    Started,
    Promoting,
    Evaluating,
    Evaluated,
    OverBudget,
    Failed,
    FrontChanged,
    Retraining,
    RetrainPlanned,
    Retrained,
]
Listener = Callable[[Event], None]


def describe(event: Event) -> str:
    """One line for a log or a plain terminal."""
    if isinstance(event, Preparing):
        return event.what
    if isinstance(event, Started):
        return _started(event)
    if isinstance(event, Promoting):
        numbers = ", ".join(map(str, event.numbers))
        return f"promoting trial{'s' if len(event.numbers) != 1 else ''} {numbers} to {event.fidelity.words}"
    if isinstance(event, Evaluating):
        step = "promoted to" if event.promoted else "at"
        return f"trial {event.number} {step} {event.fidelity.words}: evaluating {event.summary}"
    if isinstance(event, Evaluated):
        how = "result reused" if event.reused else f"{event.seconds:.1f}s"
        cost = f"{format_count(event.cost.params)} params, {format_count(event.cost.macs)} MACs; " if event.cost else ""
        arch = f" [{event.arch_hash[:8]}]" if event.arch_hash else ""
        return (
            f"trial {event.number} at {event.fidelity.words} ({how}): {event.metric} = {_score(event.score)}; "
            f"{cost}{event.summary}{arch}"
        )
    if isinstance(event, OverBudget):
        return (
            f"trial {event.number} over budget ({event.budget}; {format_count(event.cost.params)} params, "
            f"{format_count(event.cost.macs)} MACs), not evaluated: {event.summary}"
        )
    if isinstance(event, Failed):
        return f"trial {event.number} failed: {event.reason}" + (f" ({event.summary})" if event.summary else "")
    if isinstance(event, Retraining):
        return f"trial {event.number}: retraining from scratch, {_epochs(event.epochs)}: {event.summary}"
    if isinstance(event, RetrainPlanned):
        timing = f", {event.epoch_s:.1f}s per epoch measured" if event.epoch_s is not None else ""
        return (
            f"retraining {len(event.numbers)} front trials ({', '.join(map(str, event.numbers))}) from scratch, "
            f"{_epochs(event.epochs)}{timing}"
        )
    if isinstance(event, Retrained):
        search = (
            f"search: {_score(event.search_score)} at {event.search_fidelity}"
            if event.search_score is not None
            else "no search score"
        )
        return (
            f"trial {event.number} {event.fidelity} ({event.seconds:.1f}s): {event.metric} = "
            f"{_score(event.score)} ({search}; {event.summary})"
        )
    knee = event.front.knee.number if event.front.knee else "none"
    if event.front.retrained_knee is not None:
        knee = f"{knee} (retrained knee trial {event.front.retrained_knee.number})"
    members = ", ".join(str(m.number) for m in event.front.members)
    return (
        f"{event.done}/{event.planned} architectures evaluated; front: {len(event.front.members)} trials"
        f"{f' ({members})' if members else ''}, knee trial {knee}, hypervolume {event.front.hypervolume:.4f}"
    )


def _started(event: Started) -> str:
    todo = event.planned - event.done
    head = (
        f"searching {todo} architecture{'s' if todo != 1 else ''}"
        if event.created or not event.done
        else f"resuming: {event.done}/{event.planned} architectures done, {todo} to go"
    )
    limit = f", no evaluation starts after {clock(event.loop_s)}" if event.loop_s is not None else ""
    if not event.retrain:
        return f"{head}{limit}; no retraining"
    until = f", within {clock(event.end_s)} from now" if event.end_s is not None else ""
    return f"{head}{limit}; then retraining up to {event.retrain} front trials from scratch{until}"


def clock(seconds: float | None) -> str:
    """``7:05`` or ``1:02:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _epochs(count: int) -> str:
    return f"{count} epoch{'s' if count != 1 else ''}"


def _score(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
