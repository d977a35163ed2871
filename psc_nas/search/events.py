"""Progress as events: what happened to which trial, with what a one-line report of it needs.

The engine emits them; the console's progress bar, the run's log file (and any other consumer)
subscribe. Every event carries the run's progress: architectures evaluated so far of those planned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from psc_nas.costs import Cost, format_count
from psc_nas.evaluators.base import Fidelity
from psc_nas.search.front import Front


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


@dataclass(frozen=True)
class FrontChanged:
    front: Front
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


Event = Union[Evaluated, OverBudget, Failed, FrontChanged, RetrainPlanned, Retrained]
Listener = Callable[[Event], None]


def describe(event: Event) -> str:
    """One line for a log or a plain terminal."""
    if isinstance(event, Evaluated):
        how = "reused" if event.reused else f"{event.seconds:.1f}s"
        score = "nan" if math.isnan(event.score) else f"{event.score:.4f}"
        return f"trial {event.number} {event.fidelity.words} ({how}): {event.metric} = {score} ({event.summary})"
    if isinstance(event, OverBudget):
        return (
            f"trial {event.number} over budget ({event.budget}; {format_count(event.cost.params)} params, "
            f"{format_count(event.cost.macs)} MACs), not evaluated: {event.summary}"
        )
    if isinstance(event, Failed):
        return f"trial {event.number} failed: {event.reason}"
    if isinstance(event, RetrainPlanned):
        timing = f", {event.epoch_s:.1f}s per epoch measured" if event.epoch_s is not None else ""
        return (
            f"retraining {len(event.numbers)} front trials ({', '.join(map(str, event.numbers))}) from scratch, "
            f"{event.epochs} epoch{'s' if event.epochs != 1 else ''}{timing}"
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
    return (
        f"{event.done}/{event.planned} architectures evaluated; front: {len(event.front.members)} trials, "
        f"knee trial {knee}, hypervolume {event.front.hypervolume:.4f}"
    )


def _score(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
