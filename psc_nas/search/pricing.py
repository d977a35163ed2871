"""Pricing before any evaluation: a candidate's exact cost at the task's input size, against the budget."""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass

import optuna

from psc_nas.arch import ArchConfig
from psc_nas.costs import Cost
from psc_nas.nets import cost
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Answers, Catalog
from psc_nas.search.feasible import Feasibility

SAMPLING = ("restrict", "project", "reject")

log = logging.getLogger("psc_nas.search")


@dataclass(frozen=True)
class Pricing:
    budget: Budget
    catalog: Catalog  # the space, priced at the task's input size
    # how candidates meet the budget (``feasible``): restrict: every decision only among answers that
    # can still fit; project: the sampler's candidate, its costliest decisions shrunk until it fits;
    # reject: the sampler's candidate as it is, over budget ones pruned and replaced
    sampling: str = "restrict"

    @functools.cached_property
    def feasibility(self) -> Feasibility:
        return Feasibility(self.catalog, self.budget)

    def sample(self, trial: optuna.Trial, avoid: Collection[str] = ()) -> ArchConfig:
        """The trial's candidate; under ``restrict``, not one of the architectures ``avoid`` hashes
        where the last decision can tell. Under ``project`` a shrunk candidate is stored in the trial's
        user attribute ``built_params`` (the parameters that build it; ``trial.params`` are what was asked)."""
        if self.sampling == "reject":
            return self.catalog.space.sample(trial)
        if self.sampling == "restrict":
            return self.feasibility.sample(trial, avoid)
        config, picks = self.feasibility.decide(
            lambda name, choices, admissible: trial.suggest_categorical(name, choices)
        )  # type: ignore[arg-type]
        built = self.feasibility.project(picks)
        if built == picks:
            return config
        trial.set_user_attr("built_params", self.feasibility.answers(built))
        return self.catalog.compose([options[b] for options, b in zip(self.catalog.options, built)])

    def price(self, config: ArchConfig) -> Cost:
        return cost(config, self.catalog.spatial)

    def fits(self, config: ArchConfig) -> bool:
        """Within the budget at the task's input size (what an evaluator may sample, e.g. a super-network)."""
        return self.budget.fits(self.price(config))

    def presets(self) -> dict[str, Answers]:
        """The space's hand-designed networks that fit the budget, as the trial parameters that give them."""
        space = self.catalog.space
        found: dict[str, Answers] = {}
        outside: list[str] = []
        over: list[str] = []
        for name, config in space.presets().items():
            answers = self.catalog.answers_for(config)
            if answers is None:
                outside.append(name)
            elif not self.budget.fits(self.price(config)):
                over.append(name)
            else:
                found[name] = answers
        skipped = [f"{', '.join(over)} over budget"] if over else []
        skipped += [f"{', '.join(outside)} not in space {space.name}"] if outside else []
        if skipped:  # one line, not one per preset
            log.info("presets seeded first: %s; not seeded: %s", ", ".join(found) or "none", "; ".join(skipped))
        return found
