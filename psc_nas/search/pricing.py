"""Pricing before any evaluation: a candidate's exact cost at the task's input size, against the budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from psc_nas.nets import cost
from psc_nas.arch import ArchConfig
from psc_nas.costs import Cost
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Answers, Catalog

log = logging.getLogger("psc_nas.search")


@dataclass(frozen=True)
class Pricing:
    budget: Budget
    catalog: Catalog  # the space, priced at the task's input size

    def price(self, config: ArchConfig) -> Cost:
        return cost(config, self.catalog.spatial)

    def fits(self, config: ArchConfig) -> bool:
        """Within the budget at the task's input size (what an evaluator may sample, e.g. a super-network)."""
        return self.budget.fits(self.price(config))

    def presets(self) -> dict[str, Answers]:
        """The space's hand-designed networks that fit the budget, as the trial parameters that give them."""
        space = self.catalog.space
        found = {}
        for name, config in space.presets().items():
            answers = self.catalog.answers_for(config)
            if answers is None:
                log.info("preset %s is not in space %s; not seeded", name, space.name)
            elif not self.budget.fits(self.price(config)):
                log.info("preset %s is over budget; not seeded", name)
            else:
                found[name] = answers
        return found
