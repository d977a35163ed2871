"""The promotion policy: Pareto-aware successive halving over an evaluator's fidelities.

Optuna cannot prune multi-objective studies (no ``trial.report`` there), so the search runs its
own rungs. A *bracket* of candidates is evaluated at the evaluator's cheapest fidelity; a
candidate moves to the next fidelity only if it is *within epsilon of the front for its cost*:

    metric(c) >= max{ metric(p) : p evaluated at this fidelity, every cost of p <= that of c } - epsilon

i.e. nothing at most as expensive scores more than ``epsilon`` better (costs are the non-metric
objectives: params, MACs, latency). The pool holds every result of the study at that fidelity, so
a candidate competes with the whole search, not just its bracket. Among the survivors at most
``ceil(n / eta)`` are promoted, chosen by NSGA-II rank then crowding distance, which bounds a
bracket's cost at about ``len(fidelities)`` times its cheapest evaluation.

A trial's values are its highest fidelity's result (psc_nas.search.record). A front therefore
mixes fidelities; with training, low fidelities underestimate (fewer epochs), so the front is
conservative, never flattered by a short training.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from psc_nas.pareto import select_best


@dataclass(frozen=True)
class Scored:
    key: Hashable
    metric: float  # higher is better
    costs: tuple[float, ...]  # lower is better


@dataclass(frozen=True)
class SuccessiveHalving:
    bracket: int  # candidates evaluated at the cheapest fidelity before a promotion round
    eta: int  # at most 1 in eta candidates is promoted per fidelity
    epsilon: float  # metric tolerance of the promotion rule

    def __post_init__(self) -> None:
        if self.bracket < 1:
            raise ValueError(f"a bracket holds at least one candidate, got {self.bracket}")
        if self.eta < 2:
            raise ValueError(f"eta must be at least 2, got {self.eta}")

    def promote(self, bracket: Sequence[Scored], pool: Sequence[Scored]) -> list[Hashable]:
        """Keys of the bracket members that move to the next fidelity."""
        survivors = [c for c in bracket if c.metric >= _best_no_costlier(c, pool) - self.epsilon]
        keep = math.ceil(len(bracket) / self.eta)
        chosen = select_best([(-c.metric, *c.costs) for c in survivors], keep)
        return [survivors[i].key for i in sorted(chosen)]


def _best_no_costlier(candidate: Scored, pool: Sequence[Scored]) -> float:
    cheaper = [p.metric for p in pool if all(a <= b for a, b in zip(p.costs, candidate.costs))]
    return max(cheaper, default=-math.inf)
