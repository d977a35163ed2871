"""The feasible Pareto front of a study and its knee: one computation for every reader.

The run folder (pareto.json, front/, best.yaml), the console table, the dashboard and psc-export
all call :func:`find_front`, on trials ordered by number, so they name the same front and knee.

Where front members were retrained after the search (``record.Retrained``), the same knee rule over
the retrained members, scored by their retrained metric, gives the *retrained knee*: ``Front.best``,
the network best.yaml holds and psc-export's "knee" picks. Without retraining it is the search's knee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from psc_nas.pareto import hypervolume, knee_point, normalize, pareto_front, to_minimization
from psc_nas.search.record import Objective, StudyRecord, TrialRecord

DEFAULT_METRIC_RANGE = (0.0, 1.0)  # Dice and accuracy are fractions


@dataclass(frozen=True)
class Front:
    members: tuple[TrialRecord, ...]  # the feasible non-dominated trials, by trial number
    knee: TrialRecord | None  # psc_nas.pareto.knee_point over all the study's objectives
    hypervolume: float  # of (metric, params or MACs) in the unit box, see ``quality_hypervolume``
    # front members retrained after the search, their metric replaced by the retrained one (``as_retrained``)
    retrained: tuple[TrialRecord, ...] = ()
    retrained_knee: TrialRecord | None = None  # the knee rule over ``retrained``
    retrained_hypervolume: float | None = None  # ``quality_hypervolume`` of ``retrained``

    @property
    def best(self) -> TrialRecord | None:
        """The network a user gets (best.yaml): the retrained knee, else the search's knee."""
        return self.retrained_knee or self.knee


def find_front(records: Iterable[TrialRecord], study: StudyRecord) -> Front:
    done = sorted((r for r in records if r.feasible), key=lambda r: r.number)
    if not done:
        return Front((), None, 0.0)
    maximize = [o.maximize for o in study.objectives]
    points = to_minimization([r.values for r in done], maximize)  # type: ignore[misc]
    members = tuple(done[i] for i in pareto_front(points))
    retrained = tuple(as_retrained(r, study) for r in members if _retrained_score(r, study) is not None)
    if not retrained:
        return Front(members, done[knee_point(points)], quality_hypervolume(done, study))
    knee = knee_point(to_minimization([r.values for r in retrained], maximize))  # type: ignore[misc]
    return Front(
        members,
        done[knee_point(points)],
        quality_hypervolume(done, study),
        retrained,
        retrained[knee],
        quality_hypervolume(retrained, study),
    )


def as_retrained(record: TrialRecord, study: StudyRecord) -> TrialRecord:
    """``record`` with its metric (the first value) replaced by its retrained score; costs stay."""
    score = _retrained_score(record, study)
    if score is None or record.values is None:
        raise ValueError(f"trial {record.number} has no retrained {study.objectives[0].name}")
    return replace(record, values=(score, *record.values[1:]))


def _retrained_score(record: TrialRecord, study: StudyRecord) -> float | None:
    if record.retrained is None or record.values is None:
        return None
    score = record.retrained.metrics.get(study.objectives[0].name)
    return None if score is None or not math.isfinite(score) else float(score)


@dataclass(frozen=True)
class HypervolumeBox:
    """Where ``quality_hypervolume`` measures: (metric, cost), each mapped affinely onto [0, 1] with 0 at
    ``ideal`` (the metric's best value, zero cost) and 1 at ``reference`` (its worst value, the cost bound)."""

    metric: str
    cost: str  # "params" or "macs"
    ideal: tuple[float, float]  # as recorded: (best metric, 0)
    reference: tuple[float, float]  # as recorded: (worst metric, cost bound); (1, 1) once normalized
    cost_bound: str  # what the cost bound is: "the params budget", ..., "the largest params seen"
    by_budget: bool = True  # the cost bound is the budget (fixed), not the trials' largest cost

    def normalized(self, points: Sequence[tuple[float, float]], maximize: bool) -> list[tuple[float, ...]]:
        """(metric, cost) as recorded -> minimization points in the unit box."""
        flip = [maximize, False]
        ideal, reference = to_minimization([self.ideal], flip)[0], to_minimization([self.reference], flip)[0]
        return normalize(to_minimization(points, flip), ideal, reference)

    def describe(self) -> dict[str, Any]:
        """pareto.json's account of the hypervolume: what it measures, where, and how it is scaled."""
        metric_low, metric_high = sorted((self.ideal[0], self.reference[0]))
        return {
            "objectives": [self.metric, self.cost],
            "reference_point": {self.metric: self.reference[0], self.cost: self.reference[1]},
            "ideal_point": {self.metric: self.ideal[0], self.cost: self.ideal[1]},
            "normalisation": (
                f"{self.metric} and {self.cost} are each mapped linearly onto [0, 1], 0 at the ideal point and 1 at "
                f"the reference point: {self.metric} over its range [{metric_low:g}, {metric_high:g}], "
                f"{self.cost} over [0, {self.reference[1]:,.0f}] ({self.cost_bound}); the hypervolume is the area "
                "the feasible trials dominate in that unit square (reference (1, 1)): 1.0 would be the best score "
                "at zero cost" + (", and runs of the same task and budget compare directly" if self.by_budget else "")
            ),
        }


def hypervolume_box(feasible: Sequence[TrialRecord], study: StudyRecord) -> HypervolumeBox | None:
    """The box ``quality_hypervolume`` measures ``feasible`` in; None where it measures nothing (no trial,
    or neither params among the objectives nor a MACs budget)."""
    if not feasible or (not any(o.name == "params" for o in study.objectives) and study.budget.macs is None):
        return None
    metric = study.objectives[0]
    by_macs = study.budget.params is None and study.budget.macs is not None
    cost = "macs" if by_macs else "params"
    budget = study.budget.macs if by_macs else study.budget.params
    best, worst = _bounds(metric)  # as minimized
    if metric.maximize:
        best, worst = -best, -worst
    bound = budget or max(_cost_of(r, cost, study) for r in feasible)
    words = f"the {cost} budget" if budget else f"the largest {cost} of these trials: no {cost} budget"
    return HypervolumeBox(metric.name, cost, (best, 0.0), (worst, float(bound)), words, bool(budget))


def _cost_of(record: TrialRecord, name: str, study: StudyRecord) -> float:
    """The record's own cost field, else the objective value of that name (a record told by hand)."""
    value = record.params if name == "params" else record.macs
    if value is not None:
        return value
    return record.values[[o.name for o in study.objectives].index(name)]  # type: ignore[index]


def quality_hypervolume(feasible: Sequence[TrialRecord], study: StudyRecord) -> float:
    """Hypervolume of (metric, cost) of feasible trials, both scaled to [0, 1]: the metric over its
    range (recorded with the objective; [0, 1] when none is), the cost over [0, budget]. The cost is
    params under a params budget (or none), MACs under a MACs-only budget, so that a budget given
    in MACs is the scale its searches are compared at; with no budget, params over the largest seen.
    Fixed bounds make runs of the same task and budget comparable; 1.0 would be the best score at
    zero cost. ``hypervolume_box`` says where it was measured."""
    box = hypervolume_box(feasible, study)
    if box is None:
        return 0.0
    points = [(r.values[0], _cost_of(r, box.cost, study)) for r in feasible]  # type: ignore[index]
    return hypervolume(box.normalized(points, study.objectives[0].maximize), (1.0, 1.0))


def _bounds(metric: Objective) -> tuple[float, float]:
    """The metric's best and worst values, as minimized."""
    low, high = metric.range or DEFAULT_METRIC_RANGE
    return (-high, -low) if metric.maximize else (low, high)
