"""Cost budgets: which candidates may train, and how far over budget the others are."""

from __future__ import annotations

from dataclasses import dataclass

from psc_nas.costs import Cost, format_count


@dataclass(frozen=True)
class Budget:
    params: int | None = None
    macs: int | None = None

    def fits(self, cost: Cost) -> bool:
        return cost.fits(params=self.params, macs=self.macs)

    def violations(self, cost: Cost) -> dict[str, float]:
        """Optuna constraint values, feasible iff all <= 0: the relative excess over each budget.

        Relative, so that 10% over on params weighs like 10% over on MACs when a sampler ranks
        infeasible trials by total violation.
        """
        found = {}
        if self.params is not None:
            found["params"] = cost.params / self.params - 1.0
        if self.macs is not None:
            found["macs"] = cost.macs / self.macs - 1.0
        return found

    def describe(self) -> str:
        parts = [
            f"params <= {format_count(self.params)}" if self.params is not None else "",
            f"MACs <= {format_count(self.macs)}" if self.macs is not None else "",
        ]
        return " and ".join(p for p in parts if p) or "no budget"
