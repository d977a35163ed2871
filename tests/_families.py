"""Hypothesis strategies over every registered op family, for the property tests of ops and nets.

A family's arguments are drawn through its own search-space domain (its YAML defaults), so a family
registered anywhere is covered without naming it here. The shipped families also have arguments
their default domains never produce (kernel sizes, explicit widths, arbitrary CAKES allocations);
``WIDER`` draws those instead, as the tests did before the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from psc_nas.arch import BlockChoice, Slot
from psc_nas.ops import families, realize
from psc_nas.ops.cakes import SHAPES
from psc_nas.ops.pmscn import ORIENTATIONS

Draw = Callable[[st.SearchStrategy], Any]


def _conv3d(draw: Draw, slot: Slot) -> dict:
    return {"kernel_size": draw(st.sampled_from([1, 3, 5, (1, 3, 3), (3, 1, 1)]))}


def _p3d(draw: Draw, slot: Slot) -> dict:
    mid = draw(st.one_of(st.none(), st.integers(1, 16)))
    return {"orientation": draw(st.sampled_from(ORIENTATIONS)), "mid_channels": mid}


def _pmscn(draw: Draw, slot: Slot) -> dict:
    m = draw(st.integers(1, min(3, slot.out_channels)))
    orientations = draw(st.permutations(ORIENTATIONS))[:m]
    mid = draw(st.one_of(st.none(), st.integers(m, 16)))
    return {"m": m, "n": draw(st.integers(1, 3)), "orientations": list(orientations), "mid_channels": mid}


def _cakes(draw: Draw, slot: Slot) -> dict:
    cout = slot.out_channels
    cuts = sorted(draw(st.lists(st.integers(0, cout), min_size=len(SHAPES) - 1, max_size=len(SHAPES) - 1)))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, cout])]
    return {"allocation": dict(zip(SHAPES, counts))}


WIDER = {"conv3d": _conv3d, "p3d": _p3d, "pmscn": _pmscn, "cakes": _cakes}


@st.composite
def domain_choice(draw: Draw, op: str, slot: Slot) -> BlockChoice:
    """A choice the family's default search domain resolves for ``slot``."""
    domain = families()[op].domain.parse(op, {}, op)
    decision = domain.decide(lambda param: draw(st.sampled_from(domain.params[param])))
    return domain.resolve(decision, slot)


@st.composite
def block_choice(draw: Draw, slot: Slot) -> BlockChoice:
    """A valid choice for ``slot`` of any registered family."""
    op = draw(st.sampled_from(sorted(families())))
    choice = BlockChoice(op, WIDER[op](draw, slot)) if op in WIDER else draw(domain_choice(op, slot))
    try:
        realize(slot, choice)
    except ValueError:  # a default domain can offer more than a narrow slot takes (m=3 streams, 2 channels)
        assume(False)
    return choice
