"""Every option of every decision unit of a search space, priced: exact answers before any training.

A space's units are disjoint groups of slots and a slot's cost depends only on its own choice, so
a config's cost is the reference config's cost (every unit at its first option) plus one delta
per unit. That makes two questions exact and cheap (a few hundred pricings per unit, no search
over the 10^12 configs):

- can any architecture of the space meet a budget? Merge the units' (params, MACs) deltas while
  keeping only the Pareto-minimal sums; the space's cheapest trade-offs come out, and a witness
  config is priced for real to confirm the additivity the merge relies on;
- which trial parameters make the space produce a given config (a hand-designed preset)?
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psc_nas.arch import ArchConfig, BlockChoice
from psc_nas.costs import Cost, Spatial, format_count
from psc_nas.nets import cost
from psc_nas.pareto import pareto_front
from psc_nas.search.budget import Budget
from psc_nas.space import Ask, SearchSpace, Unit, replay_all

Answers = dict[str, Any]


@dataclass(frozen=True)
class Option:
    answers: Answers  # trial parameters of this unit that give this option
    config: ArchConfig  # the reference config with this option in the unit's slots
    blocks: tuple[BlockChoice, ...]  # the choices it puts in the unit's slots


class Catalog:
    def __init__(self, space: SearchSpace, spatial: Spatial) -> None:
        self.space = space
        self.spatial = tuple(spatial)
        self.reference = space.decide(lambda name, choices: choices[0])
        # per unit: its distinct options, and every answer path with the index of the option it gives
        self.options: list[list[Option]] = []
        self.paths: list[list[tuple[Answers, int]]] = []
        for unit in space.units:
            options, paths = self._unit_options(unit)
            self.options.append(options)
            self.paths.append(paths)

    def _unit_options(self, unit: Unit) -> tuple[list[Option], list[tuple[Answers, int]]]:
        options: list[Option] = []
        paths: list[tuple[Answers, int]] = []
        seen: dict[tuple[BlockChoice, ...], int] = {}
        for answers in _answer_paths(self.space, unit.label):
            config = self.space.decide(lambda name, choices: answers.get(name, choices[0]))
            blocks = tuple(config.blocks[i] for i in unit.slots)
            if blocks not in seen:  # two answer paths can resolve to one network (e.g. equal widths)
                seen[blocks] = len(options)
                options.append(Option(answers, config, blocks))
            paths.append((answers, seen[blocks]))
        return options, paths

    @functools.cached_property
    def deltas(self) -> list[list[Cost]]:
        """Each option's cost relative to the reference: the seconds-long part, done only when asked."""
        base = cost(self.reference, self.spatial)
        return [[cost(o.config, self.spatial) + Cost(-base.params, -base.macs) for o in unit] for unit in self.options]

    def compose(self, picks: Sequence[Option]) -> ArchConfig:
        blocks = list(self.reference.blocks)
        for unit, option in zip(self.space.units, picks):
            for slot, block in zip(unit.slots, option.blocks):
                blocks[slot] = block
        return self.reference.with_blocks(blocks)

    def cheapest(self) -> list[tuple[Cost, ArchConfig]]:
        """The space's Pareto-minimal (params, MACs) architectures, exactly priced."""
        front: list[tuple[Cost, tuple[Option, ...]]] = [(cost(self.reference, self.spatial), ())]
        for unit_options, deltas in zip(self.options, self.deltas):
            merged = [(c + d, picks + (o,)) for c, picks in front for o, d in zip(unit_options, deltas)]
            front = [merged[i] for i in pareto_front([(c.params, c.macs) for c, _ in merged])]
        found = []
        for predicted, picks in front:
            config = self.compose(picks)
            actual = cost(config, self.spatial)
            if actual != predicted:
                raise RuntimeError(
                    f"{self.space.backbone}: slot costs are not additive ({predicted} vs {actual}); "
                    "the budget check cannot be exact for this backbone"
                )
            found.append((actual, config))
        return found

    def costliest_macs(self) -> Cost:
        """The cost of the space's architecture with the most MACs: each unit at its costliest option."""
        picks = [
            max(zip(options, deltas), key=lambda pair: pair[1].macs)[0]
            for options, deltas in zip(self.options, self.deltas)
        ]
        return cost(self.compose(picks), self.spatial)

    def check_reachable(self, budget: Budget) -> None:
        """Raise ``ValueError`` (one line) when no architecture of the space fits ``budget``.

        A preset that fits settles it at once; only otherwise is the space priced exactly.
        """
        if any(
            budget.fits(cost(config, self.spatial))
            for config in self.space.presets().values()
            if self.answers_for(config) is not None
        ):
            return
        cheapest = self.cheapest()
        if any(budget.fits(c) for c, _ in cheapest):
            return
        by_params = min(cheapest, key=lambda item: item[0].params)[0]
        by_macs = min(cheapest, key=lambda item: item[0].macs)[0]
        raise ValueError(
            f"no architecture in space {self.space.name!r} meets {budget.describe()}: the cheapest has "
            f"{format_count(by_params.params)} params ({format_count(by_params.macs)} MACs), the leanest "
            f"{format_count(by_macs.macs)} MACs ({format_count(by_macs.params)} params); MACs at input "
            f"{'x'.join(map(str, self.spatial))}"
        )

    def answers_for(self, config: ArchConfig) -> Answers | None:
        """Trial parameters under which the space produces ``config``, or None if it never does."""
        answers: Answers = {}
        for unit, unit_options in zip(self.space.units, self.options):
            wanted = tuple(config.blocks[i] for i in unit.slots)
            match = next((o for o in unit_options if o.blocks == wanted), None)
            if match is None:
                return None
            answers.update(match.answers)
        return answers


def _answer_paths(space: SearchSpace, label: str) -> list[Answers]:
    """Every distinct sequence of answers ``space.decide`` can ask for unit ``label``.

    ``replay_all`` branches on this unit's questions only; other units stay at their first choice.
    """
    prefix = f"{label}."

    def run(ask: Ask) -> Answers:
        answers: Answers = {}

        def unit_ask(name: str, choices: tuple[Any, ...]) -> Any:
            if not name.startswith(prefix):
                return choices[0]
            answers[name] = ask(name, choices)
            return answers[name]

        space.decide(unit_ask)
        return answers

    return replay_all(run)
