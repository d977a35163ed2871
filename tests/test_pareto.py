"""Property tests of the Pareto toolkit against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from psc_nas.pareto import (
    crowding_distances,
    dominates,
    hypervolume,
    knee_point,
    non_dominated_ranks,
    normalize,
    pareto_front,
    select_best,
    to_minimization,
)

# Small integer grids make ties and duplicates common, which is where sorting bugs live.
coordinate = st.integers(min_value=0, max_value=6).map(float)


def point_sets(dims: int, max_size: int = 12) -> st.SearchStrategy[list[tuple[float, ...]]]:
    return st.lists(st.tuples(*[coordinate] * dims), min_size=1, max_size=max_size)


def union_volume(points: list[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    """Oracle: volume of the union of boxes [p, reference] by coordinate compression."""
    dims = len(reference)
    axes = [sorted({p[k] for p in points} | {reference[k]}) for k in range(dims)]
    total = 0.0
    for cell in itertools.product(*[range(len(axis) - 1) for axis in axes]):
        low = [axes[k][cell[k]] for k in range(dims)]
        if any(all(p[k] <= low[k] for k in range(dims)) for p in points):
            total += math.prod(axes[k][cell[k] + 1] - axes[k][cell[k]] for k in range(dims))
    return total


@given(point_sets(2))
def test_ranks_match_the_definition(points):
    ranks = non_dominated_ranks(points)
    for i, p in enumerate(points):
        # nothing dominates a point from its own or a later front ...
        assert not any(dominates(q, p) for j, q in enumerate(points) if ranks[j] >= ranks[i])
        # ... and a point beyond the first front is dominated by one from the front just before it
        if ranks[i] > 0:
            assert any(dominates(q, p) for j, q in enumerate(points) if ranks[j] == ranks[i] - 1)


@pytest.mark.parametrize("dims", [2, 3])
@given(data=st.data())
def test_front_is_exactly_the_non_dominated_points(dims, data):
    points = data.draw(point_sets(dims))
    expected = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    assert pareto_front(points) == expected


@pytest.mark.parametrize("dims", [2, 3, 4])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hypervolume_is_the_volume_of_the_dominated_region(dims, data):
    points = data.draw(point_sets(dims, max_size=8))
    reference = (7.0,) * dims
    assert hypervolume(points, reference) == pytest.approx(union_volume(points, reference))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(*[st.floats(0, 1)] * 3), min_size=1, max_size=6))
def test_hypervolume_of_real_valued_points_in_three_objectives(points):
    assert hypervolume(points, (1.0, 1.0, 1.0)) == pytest.approx(union_volume(points, (1.0, 1.0, 1.0)), abs=1e-12)


def test_hypervolume_of_a_known_set_in_three_objectives():
    # Under (2, 2, 2): the box of (0, 1, 1) is 2x1x1, that of (1, 0, 1) is 1x2x1, they share 1x1x1.
    assert hypervolume([(0, 1, 1), (1, 0, 1)], (2, 2, 2)) == 3.0


@given(point_sets(2), st.tuples(coordinate, coordinate))
def test_hypervolume_never_drops_when_a_point_is_added(points, extra):
    reference = (5.0, 5.0)  # some points lie outside it, which must add nothing
    assert hypervolume([*points, extra], reference) >= hypervolume(points, reference)


def test_hypervolume_of_a_known_staircase():
    # (1,3), (2,2), (3,1) under (4,4): 3 + 2 + 1 unit strips.
    assert hypervolume([(1, 3), (2, 2), (3, 1), (3, 3)], (4, 4)) == 6.0
    assert hypervolume([(4, 0)], (4, 4)) == 0.0  # touching the reference dominates no volume


@given(point_sets(2, max_size=10), st.floats(0.1, 100), st.floats(-50, 50))
@example(points=[(2.0, 6.0), (3.0, 3.0), (4.0, 0.0)], scale=64.0, shift=1.6366123042360812)  # collinear: a tie
def test_knee_lies_on_the_front_and_ignores_scale(points, scale, shift):
    knee = knee_point(points)
    assert knee in pareto_front(points)
    rescaled = [(p[0] * scale + shift, p[1]) for p in points]
    assert knee_point(rescaled) == knee


@given(point_sets(3, max_size=10), st.floats(0.1, 100), st.floats(-50, 50))
def test_knee_ignores_scale_in_three_objectives(points, scale, shift):
    knee = knee_point(points)
    assert knee in pareto_front(points)
    assert knee_point([(p[0], p[1] * scale + shift, p[2]) for p in points]) == knee


def test_collinear_knees_tie_and_the_earliest_wins():
    assert knee_point([(2.0, 6.0), (3.0, 3.0), (4.0, 0.0)]) == 0
    assert knee_point([(4.0, 0.0), (3.0, 3.0), (2.0, 6.0)]) == 0


def test_knee_is_the_point_farthest_from_the_line_between_extremes():
    # Extremes (0, 10) and (10, 0); (2, 2) bulges farthest towards the origin.
    points = [(0, 10), (10, 0), (5, 4), (2, 2), (9, 9)]
    assert knee_point(points) == 3


def test_to_minimization_negates_maximized_objectives():
    assert to_minimization([(0.8, 5e6)], maximize=[True, False]) == [(-0.8, 5e6)]


def test_normalize_maps_bounds_to_unit_interval():
    assert normalize([(2, 5), (4, 5)], lower=(2, 5), upper=(4, 5)) == [(0.0, 0.0), (1.0, 0.0)]


def test_crowding_keeps_boundaries():
    distances = crowding_distances([(0, 4), (1, 3), (3, 1), (4, 0)])
    assert distances[0] == distances[3] == math.inf
    assert distances[1] == distances[2] == pytest.approx(3 / 4 + 3 / 4)


@given(point_sets(2), st.integers(1, 5))
def test_select_best_prefers_lower_fronts(points, count):
    chosen = select_best(points, count)
    ranks = non_dominated_ranks(points)
    assert len(chosen) == min(count, len(points))
    left_out = [ranks[i] for i in range(len(points)) if i not in chosen]
    assert not left_out or max(ranks[i] for i in chosen) <= min(left_out)
