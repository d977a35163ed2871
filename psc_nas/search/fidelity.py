"""Pareto-aware successive halving: cheap training for every candidate, longer only for promising ones.

Optuna cannot prune multi-objective studies (no ``trial.report`` there), so the search runs its
own rungs. A *bracket* of candidates trains at the lowest fidelity (``rungs[0]`` epochs); a
candidate is promoted to the next rung only if it is *within epsilon of the front for its cost*:

    metric(c) >= max{ metric(p) : p trained at this rung, every cost of p <= that of c } - epsilon

i.e. nothing at most as expensive scores more than ``epsilon`` better (costs are the non-metric
objectives: params, MACs, latency). The pool holds every result of the study at that rung, so a
candidate competes with the whole search, not just its bracket. Among the survivors at most
``ceil(n / eta)`` are promoted, chosen by NSGA-II rank then crowding distance, which bounds a
bracket's cost at about ``len(rungs)`` times its lowest rung.

How results are stored: one Optuna trial per architecture. Every rung's result is kept in the
trial's ``rungs`` user attribute as soon as it is known (so a crash loses no training), and the
trial's *values are its highest-fidelity result*, with ``fidelity`` naming that rung. A front
therefore mixes fidelities, each point measured at least at ``rungs[0]`` epochs; promoted points
at more. Low-fidelity values underestimate (fewer epochs), so the front is conservative, never
flattered by a short training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

from psc_nas.pareto import select_best


@dataclass(frozen=True)
class Scored:
    key: Hashable
    metric: float  # higher is better
    costs: tuple[float, ...]  # lower is better


@dataclass(frozen=True)
class Schedule:
    rungs: tuple[int, ...]  # epochs per rung, increasing
    eta: int  # at most 1 in eta candidates is promoted per rung
    epsilon: float  # metric tolerance of the promotion rule

    def __post_init__(self) -> None:
        if not self.rungs or list(self.rungs) != sorted(set(self.rungs)) or self.rungs[0] < 1:
            raise ValueError(f"rungs must be increasing positive epoch counts, got {self.rungs}")
        if self.eta < 2:
            raise ValueError(f"eta must be at least 2, got {self.eta}")

    @property
    def top(self) -> int:
        return self.rungs[-1]

    def single(self) -> Schedule:
        """The schedule without multi-fidelity: everything trains at the top rung."""
        return Schedule((self.top,), self.eta, self.epsilon)

    def promote(self, bracket: Sequence[Scored], pool: Sequence[Scored]) -> list[Hashable]:
        """Keys of the bracket members that move to the next rung."""
        survivors = [c for c in bracket if c.metric >= _best_no_costlier(c, pool) - self.epsilon]
        keep = math.ceil(len(bracket) / self.eta)
        chosen = select_best([(-c.metric, *c.costs) for c in survivors], keep)
        return [survivors[i].key for i in sorted(chosen)]


def _best_no_costlier(candidate: Scored, pool: Sequence[Scored]) -> float:
    cheaper = [p.metric for p in pool if all(a <= b for a, b in zip(p.costs, candidate.costs))]
    return max(cheaper, default=-math.inf)
