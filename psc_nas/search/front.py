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


def quality_hypervolume(feasible: Sequence[TrialRecord], study: StudyRecord) -> float:
    """Hypervolume of (metric, cost) of feasible trials, both scaled to [0, 1]: the metric over its
    range (recorded with the objective; [0, 1] when none is), the cost over [0, budget]. The cost is
    params under a params budget (or none), MACs under a MACs-only budget, so that a budget given
    in MACs is the scale its searches are compared at; with no budget, params over the largest seen.
    Fixed bounds make runs of the same task and budget comparable; 1.0 would be the best score at
    zero cost."""
    metric = study.objectives[0]
    if not feasible or (not any(o.name == "params" for o in study.objectives) and study.budget.macs is None):
        return 0.0
    by_macs = study.budget.params is None and study.budget.macs is not None
    names = [o.name for o in study.objectives]

    def cost_of(record: TrialRecord) -> float:
        """The record's own cost field, else the objective value of that name (a record told by hand)."""
        name, value = ("macs", record.macs) if by_macs else ("params", record.params)
        return value if value is not None else record.values[names.index(name)]  # type: ignore[index]

    points = [(r.values[0], cost_of(r)) for r in feasible]  # type: ignore[index]
    upper = (study.budget.macs if by_macs else study.budget.params) or max(c for _, c in points)
    low, high = _bounds(metric)
    scaled = normalize(to_minimization(points, [metric.maximize, False]), (low, 0.0), (high, upper))
    return hypervolume(scaled, (1.0, 1.0))


def _bounds(metric: Objective) -> tuple[float, float]:
    """The metric's best and worst values, as minimized."""
    low, high = metric.range or DEFAULT_METRIC_RANGE
    return (-high, -low) if metric.maximize else (low, high)
