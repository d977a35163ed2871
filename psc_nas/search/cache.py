"""The search's view of its study: every trial read once per decision, then asked many questions.

Workers share results through the study. Before each evaluation a worker refreshes this view (one
read of the study), and an architecture that any trial of the study already evaluated at that
fidelity, on this worker or another, is reused rather than evaluated again. A worker's own results
go into the view as it records them, so between refreshes the view lags other workers only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState

from psc_nas.evaluators.base import Evaluation
from psc_nas.search.promotion import Scored
from psc_nas.search.record import Objective, TrialRecord, read_trials


class StudyView:
    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._records: dict[int, TrialRecord] = {}
        self._by_hash: dict[str, list[TrialRecord]] = defaultdict(list)

    def refresh(self) -> None:
        self._records = {r.number: r for r in read_trials(self.study)}
        self._index()

    def update(self, record: TrialRecord) -> None:
        """This worker's own change, known without reading the study."""
        self._records[record.number] = record
        self._index()

    def _index(self) -> None:
        self._by_hash = defaultdict(list)
        for record in self._records.values():
            if record.arch_hash is not None:
                self._by_hash[record.arch_hash].append(record)

    @property
    def records(self) -> list[TrialRecord]:
        return sorted(self._records.values(), key=lambda r: r.number)

    def result(self, arch_hash: str, fidelity_key: int) -> Evaluation | None:
        """A result for this architecture at this fidelity from any trial of the study."""
        for record in self._by_hash.get(arch_hash, []):
            found = record.evaluation_at(fidelity_key)
            if found is not None:
                return found
        return None

    def latency_ms(self, arch_hash: str) -> float | None:
        return next((r.latency_ms for r in self._by_hash.get(arch_hash, []) if r.latency_ms is not None), None)

    def pool(self, fidelity_key: int, objectives: Sequence[Objective]) -> list[Scored]:
        """Every result of the study at this fidelity, one per architecture, for the promotion rule."""
        pool = []
        for arch_hash, records in self._by_hash.items():
            for record in records:
                found = record.evaluation_at(fidelity_key)
                score = merit(None if found is None else found.metrics.get(objectives[0].name), objectives[0])
                if score > -math.inf:
                    pool.append(Scored(arch_hash, score, costs(record, objectives)))
                    break
        return pool

    def over_budget(self) -> int:
        return sum(1 for r in self._records.values() if r.over_budget)

    def running(self) -> int:
        return sum(1 for r in self._records.values() if r.state == TrialState.RUNNING)

    def pending(self) -> int:
        """Queue entries not evaluated yet: waiting, or claimed with no result so far."""
        return sum(
            1
            for r in self._records.values()
            if r.state in (TrialState.WAITING, TrialState.RUNNING) and not r.evaluations
        )


def merit(score: float | None, metric: Objective) -> float:
    """A metric as the promotion rule reads it, higher is better; missing or NaN is the worst."""
    if score is None or math.isnan(score):
        return -math.inf
    return score if metric.maximize else -score


def costs(record: TrialRecord, objectives: Sequence[Objective]) -> tuple[float, ...]:
    """The cost objectives' values (all but the metric); unmeasured ones count as infinitely costly."""
    values = (record.measure(o.name) for o in objectives[1:])
    return tuple(math.inf if v is None else float(v) for v in values)
