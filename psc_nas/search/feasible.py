"""Sampling inside the budget: every decision only among answers that can still end within it.

A config's cost is the reference config's plus one delta per unit (``catalog``). Going from the last
unit to the first, the Pareto-minimal (params, MACs) sums of the remaining units' deltas are the
cheapest completions of a partial config; an answer is *admissible* when some answer path of its
unit through it, plus some cheapest completion, stays within the budget. Sampling unit by unit with
only admissible answers therefore never leaves the feasible region and never dead-ends.

Optuna's sampler stays in charge. A parameter's distribution must stay the same in every trial of a
study (Optuna refuses a categorical whose choices change), so the study's sampler is wrapped
(:class:`RestrictedSampler`): asked for a restricted parameter, it returns the wrapped sampler's own
proposal (its relative one where it made one) if admissible, else draws again from the wrapped
sampler until one is, which is the sampler's distribution conditioned on the admissible answers.

:func:`project` is the alternative the issue names, kept for the benchmark
(``benchmarks/tight_sampling.py``): take the sampler's unrestricted candidate and shrink its
costliest decisions until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from psc_nas.arch import ArchConfig
from psc_nas.nets import cost
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Answers, Catalog
from psc_nas.search.optuna_adapter import trial_id
from psc_nas.space import Choice

Propose = Callable[[str, tuple[Choice, ...], tuple[Choice, ...]], Choice]  # (name, choices, admissible)

REDRAWS = 32  # draws from the wrapped sampler before an admissible answer is picked at random


def _pareto_min(points: np.ndarray) -> np.ndarray:
    """The rows of an (n, 2) integer array not dominated in both columns (minimized), deduplicated."""
    points = np.unique(points, axis=0)  # sorted by params, then MACs
    keep, best = [], math.inf
    for row in points:
        if row[1] < best:
            keep.append(row)
            best = row[1]
    return np.array(keep, dtype=np.int64).reshape(-1, 2)


class Feasibility:
    """The space's answer paths, priced, against one budget."""

    def __init__(self, catalog: Catalog, budget: Budget) -> None:
        self.catalog = catalog
        self.budget = budget
        base = cost(catalog.reference, catalog.spatial)
        self.base = np.array([base.params, base.macs], dtype=np.int64)
        big = np.iinfo(np.int64).max // 4
        self.limit = np.array(
            [big if budget.params is None else budget.params, big if budget.macs is None else budget.macs],
            dtype=np.int64,
        )
        self.units = {unit.label: index for index, unit in enumerate(catalog.space.units)}
        self.deltas = [np.array([[d.params, d.macs] for d in unit], dtype=np.int64) for unit in catalog.deltas]
        # suffix[i]: the cheapest completions of units i.. (Pareto-minimal sums); suffix[n] is "nothing left"
        self.suffix = [np.zeros((1, 2), dtype=np.int64)]
        for deltas in reversed(self.deltas):
            sums = (deltas[:, None, :] + self.suffix[0][None, :, :]).reshape(-1, 2)
            self.suffix.insert(0, _pareto_min(sums))

    def admissible_options(self, unit: int, spent: np.ndarray) -> np.ndarray:
        """Which options of ``unit`` leave a completion within the budget, ``spent`` being the cost so far."""
        room = self.limit - spent - self.deltas[unit]  # (options, 2)
        return (self.suffix[unit + 1][None, :, :] <= room[:, None, :]).all(axis=2).any(axis=1)

    def cost_of(self, picks: Sequence[int]) -> np.ndarray:
        """The exact cost of the config with option ``picks[i]`` in unit ``i`` (additive)."""
        return self.base + sum((self.deltas[i][p] for i, p in enumerate(picks)), np.zeros(2, dtype=np.int64))

    def fits(self, total: np.ndarray) -> bool:
        return bool((total <= self.limit).all())

    # ------------------------------------------------------------------ sampling
    def decide(self, propose: Propose, avoid: Collection[str] = ()) -> tuple[ArchConfig, list[int]]:
        """``space.decide`` with ``propose(name, choices, admissible)`` answering each question; the
        config and the option it took in each unit. An answer outside the admissible ones (a fixed
        parameter of an enqueued trial) is followed, and later questions are no longer restricted.

        ``avoid``: hashes of configs already in the study. Answers whose every completion within the
        budget is one of them are not admissible while another admissible answer remains, so near the
        space's minimum, where few configs fit, a sampler is steered to ones not yet evaluated."""
        walk = _Walk(self, propose, avoid)
        config = self.catalog.space.decide(walk)
        walk.close_through(len(self.deltas))
        return config, walk.picks

    def sample(self, trial: optuna.Trial, avoid: Collection[str] = ()) -> ArchConfig:
        """Define-by-run through ``trial``; restricted where the study's sampler is a :class:`RestrictedSampler`."""
        return self.draw(trial, avoid)[0]

    def draw(self, trial: optuna.Trial, avoid: Collection[str] = ()) -> tuple[ArchConfig, list[int]]:
        """``sample``, with the option taken in each unit."""
        sampler = trial.study.sampler
        restricting = isinstance(sampler, RestrictedSampler)
        number = trial_id(trial)

        def propose(name: str, choices: tuple[Choice, ...], admissible: tuple[Choice, ...]) -> Choice:
            if restricting and len(admissible) < len(choices):
                sampler.restrict(number, name, admissible)
            return trial.suggest_categorical(name, choices)  # type: ignore[arg-type]

        try:
            return self.decide(propose, avoid)
        finally:
            if restricting:
                sampler.forget(number)

    def project(self, picks: Sequence[int]) -> list[int]:
        """The sampler's candidate ``picks`` brought within the budget by shrinking its costliest decisions.

        Repeatedly, the unit whose option costs most above that unit's cheapest (in shares of the
        budget) moves to the costliest of its cheaper options that makes the whole fit, or, when
        none does, to its cheapest option; a candidate that fits is returned unchanged.
        """
        picks = list(picks)
        budgeted = self.limit < np.iinfo(np.int64).max // 4
        weight = np.where(budgeted, 1.0 / self.limit, 0.0)
        scores = [d @ weight for d in self.deltas]  # each option's cost, in shares of the budget
        while not self.fits(self.cost_of(picks)):
            excess = [scores[i][p] - scores[i].min() for i, p in enumerate(picks)]
            unit = int(np.argmax(excess))
            if excess[unit] <= 0:  # every unit at its cheapest by weight: fall back to a feasible walk
                return self._cheapest_feasible(picks, scores)
            others = self.cost_of(picks) - self.deltas[unit][picks[unit]]
            cheaper = np.flatnonzero(scores[unit] < scores[unit][picks[unit]])
            fitting = [o for o in cheaper if self.fits(others + self.deltas[unit][o])]
            options = fitting or [int(np.argmin(scores[unit]))]
            picks[unit] = int(max(options, key=lambda o: scores[unit][o]))
        return picks

    def _cheapest_feasible(self, picks: list[int], scores: list[np.ndarray]) -> list[int]:
        spent, found = self.base.copy(), []
        for unit, pick in enumerate(picks):
            ok = self.admissible_options(unit, spent)
            choice = pick if ok[pick] else int(np.flatnonzero(ok)[np.argmin(scores[unit][ok])])
            found.append(choice)
            spent = spent + self.deltas[unit][choice]
        return found

    def answers(self, picks: Sequence[int]) -> Answers:
        """Trial parameters that build the config with these options."""
        found: Answers = {}
        for unit, pick in enumerate(picks):
            found.update(self.catalog.options[unit][pick].answers)
        return found


class _Walk:
    """The ask function of one sampling: tracks the cost spent by closed units and, in the open unit,
    the answer paths still consistent with the answers given and still admissible."""

    def __init__(self, feasibility: Feasibility, propose: Propose, avoid: Collection[str] = ()) -> None:
        self.f = feasibility
        self.propose = propose
        self.avoid = avoid
        self.unit = 0
        self.spent = feasibility.base.copy()
        self.answers: Answers = {}
        self.open: list[tuple[Answers, int]] | None = None
        self.picks: list[int] = []
        self.restricted = True

    def __call__(self, name: str, choices: tuple[Choice, ...]) -> Choice:
        unit = self.f.units[name.split(".", 1)[0]]
        self.close_through(unit)
        consistent: list[tuple[Answers, int]] = []
        admissible: tuple[Choice, ...] = ()
        if self.restricted:
            if self.open is None:
                ok = self.f.admissible_options(unit, self.spent)
                self.open = [p for p in self.f.catalog.paths[unit] if ok[p[1]]]
            consistent = [p for p in self.open if name in p[0]]  # the same next question on every one
            admissible = tuple(c for c in choices if any(_same(p[0][name], c) for p in consistent))
            if self.avoid:
                admissible = tuple(c for c in admissible if self._fresh(name, c, consistent)) or admissible
        if not admissible:
            self.restricted = False
            admissible = choices
        answer = self.propose(name, choices, admissible)
        self.answers[name] = answer
        if self.restricted:
            self.open = [p for p in consistent if _same(p[0][name], answer)]
            self.restricted = bool(self.open)
        return answer

    def _fresh(self, name: str, choice: Choice, consistent: list[tuple[Answers, int]]) -> bool:
        """Whether answering ``choice`` leaves a completion within the budget that is not in ``avoid``.

        Depth-first over admissible options only, so every branch reaches a config; it stops at the
        first config not in ``avoid``, after at most ``len(avoid) + 1`` configs."""
        unit = self.unit
        for option in dict.fromkeys(o for answers, o in consistent if _same(answers[name], choice)):
            if self._fresh_after(unit + 1, self.spent + self.f.deltas[unit][option], [*self.picks, option]):
                return True
        return False

    def _fresh_after(self, unit: int, spent: np.ndarray, picks: list[int]) -> bool:
        catalog = self.f.catalog
        if unit == len(self.f.deltas):
            return catalog.compose([opts[p] for opts, p in zip(catalog.options, picks)]).hash not in self.avoid
        for option in np.flatnonzero(self.f.admissible_options(unit, spent)):
            if self._fresh_after(unit + 1, spent + self.f.deltas[unit][option], [*picks, int(option)]):
                return True
        return False

    def close_through(self, unit: int) -> None:
        """Close the open unit and every unit before ``unit`` (units that asked nothing take their one path)."""
        while self.unit < unit:
            paths = self.f.catalog.paths[self.unit]
            option = next((o for answers, o in paths if _same_answers(answers, self.answers)), None)
            if option is None:
                raise RuntimeError(f"answers {self.answers} are no answer path of unit {self.unit}")
            self.picks.append(option)
            self.spent = self.spent + self.f.deltas[self.unit][option]
            self.unit += 1
            self.answers, self.open = {}, None


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _same_answers(a: Answers, b: Answers) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


class RestrictedSampler(BaseSampler):
    """Wraps a study's sampler so that a restricted parameter gets one of the admissible answers.

    The wrapped sampler's relative proposals (NSGA-II's children, multivariate TPE) are kept aside and
    handed out one parameter at a time, so each can be checked against the answers admissible by then;
    an inadmissible one is replaced by a fresh independent draw of the wrapped sampler, redrawn until
    admissible (the sampler's own distribution conditioned on the admissible answers).
    """

    def __init__(self, inner: BaseSampler, *, seed: int | None = None) -> None:
        self.inner = inner
        self._rng = np.random.RandomState(seed)
        self._admissible: dict[tuple[int, str], tuple[Choice, ...]] = {}
        self._proposals: dict[int, dict[str, Any]] = {}
        self.restricted = 0  # questions asked with only some answers admissible
        self.refused = 0  # of those, questions whose first proposal was not admissible
        self.redrawn = 0  # answers the wrapped sampler proposed outside the admissible ones
        self.fallbacks = 0  # times REDRAWS draws found none admissible

    def restrict(self, trial: int, name: str, admissible: tuple[Choice, ...]) -> None:
        self._admissible[(trial, name)] = admissible

    def forget(self, trial: int) -> None:
        self._proposals.pop(trial, None)
        for key in [k for k in self._admissible if k[0] == trial]:
            del self._admissible[key]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._proposals[trial_id(trial)] = self.inner.sample_relative(study, trial, search_space)
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, param_distribution: BaseDistribution
    ) -> Any:
        number = trial_id(trial)
        admissible = self._admissible.pop((number, name), None)
        proposal = self._proposals.get(number, {})
        self.restricted += admissible is not None
        first = True
        if name in proposal:
            if _admits(admissible, proposal[name]):
                return proposal[name]
            self.refused += 1
            first = False
        for _ in range(REDRAWS):
            value = self.inner.sample_independent(study, trial, name, param_distribution)
            if _admits(admissible, value):
                return value
            self.refused += first
            first = False
            self.redrawn += 1
        self.fallbacks += 1
        return admissible[self._rng.randint(len(admissible))]  # type: ignore[index]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.forget(trial_id(trial))
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
        self._rng.seed()


def _admits(admissible: tuple[Choice, ...] | None, value: Any) -> bool:
    return admissible is None or any(_same(value, c) for c in admissible)
