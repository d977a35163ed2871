"""Pareto fronts for multi-objective search: non-dominated sorting, hypervolume, knee point.

Everything here works on *minimization* points: a list of equal-length tuples of floats. Turn a
study's values into that form with :func:`to_minimization` (maximized objectives are negated), so
one convention serves the search's promotion rule, the front, the benchmark and the dashboard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]
# Far above float rounding of a normalized sum (~1e-16 per objective), far below any real difference
# between knee scores of distinct points.
KNEE_TIE = 1e-9


def to_minimization(values: Sequence[Point], maximize: Sequence[bool]) -> list[tuple[float, ...]]:
    """Negate the objectives flagged in ``maximize`` so that smaller is better everywhere."""
    return [tuple(-v if flip else v for v, flip in zip(point, maximize)) for point in values]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (minimization)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_ranks(points: Sequence[Point]) -> list[int]:
    """Front index of every point: 0 for the Pareto front, 1 for the front once 0 is removed, ...

    The O(n² m) sort of Deb et al. (NSGA-II); searches here hold hundreds of trials, not millions.
    """
    n = len(points)
    dominated_by_count = [0] * n
    dominates_list: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominates_list[i].append(j)
                dominated_by_count[j] += 1
            elif dominates(points[j], points[i]):
                dominates_list[j].append(i)
                dominated_by_count[i] += 1
    ranks = [0] * n
    current = [i for i in range(n) if dominated_by_count[i] == 0]
    rank = 0
    while current:
        following = []
        for i in current:
            ranks[i] = rank
            for j in dominates_list[i]:
                dominated_by_count[j] -= 1
                if dominated_by_count[j] == 0:
                    following.append(j)
        current, rank = following, rank + 1
    return ranks


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Two objectives take an O(n log n) sweep: pricing a search space merges fronts of thousands of
    (params, MACs) points, where the general O(n²) sort would dominate the run time.
    """
    if points and len(points[0]) == 2:
        return _front_2d(points)
    return [i for i, rank in enumerate(non_dominated_ranks(points)) if rank == 0]


def _front_2d(points: Sequence[Point]) -> list[int]:
    # Sorted by (first, second), a point is non-dominated iff its second objective beats every
    # earlier one, or it equals the last kept point (duplicates do not dominate each other).
    kept: list[int] = []
    best: tuple[float, float] | None = None
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1])):
        point = (points[i][0], points[i][1])
        if best is None or point[1] < best[1] or point == best:
            kept.append(i)
            best = point
    return sorted(kept)


def crowding_distances(points: Sequence[Point]) -> list[float]:
    """NSGA-II crowding distance within one front: boundary points get ``inf`` so they survive."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        low, high = points[order[0]][k], points[order[-1]][k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for before, here, after in zip(order, order[1:], order[2:]):
            distance[here] += (points[after][k] - points[before][k]) / (high - low)
    return distance


def select_best(points: Sequence[Point], count: int) -> list[int]:
    """``count`` indices chosen as NSGA-II survives: lower front first, then larger crowding distance."""
    ranks = non_dominated_ranks(points)
    crowding = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for i, d in zip(members, crowding_distances([points[i] for i in members])):
            crowding[i] = d
    return sorted(range(len(points)), key=lambda i: (ranks[i], -crowding[i], i))[:count]


def normalize(points: Sequence[Point], lower: Point, upper: Point) -> list[tuple[float, ...]]:
    """Affine map sending ``lower`` to 0 and ``upper`` to 1 per objective (a zero range maps to 0)."""
    return [
        tuple((v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(point, lower, upper)) for point in points
    ]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (minimization), exactly.

    Two objectives take a sweep; more are sliced along the last objective (HSO: each slab between
    consecutive last coordinates holds the (m-1)-dimensional hypervolume of the points below it),
    which is O(n^(m-1) log n): exact and fast enough for the hundreds of trials of a search. Points
    that do not strictly dominate the reference in every objective add nothing and are dropped first.
    """
    inside = [tuple(p) for p in points if all(v < r for v, r in zip(p, reference))]
    if not inside:
        return 0.0
    return _hypervolume(inside, tuple(reference))


def _hypervolume(points: list[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in points)
    if len(reference) == 2:
        return _hypervolume_2d(points, reference)
    points = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(points):
        top = points[i + 1][-1] if i + 1 < len(points) else reference[-1]
        if top > point[-1]:  # points sharing a last coordinate are measured together, in the last slab
            volume += (top - point[-1]) * _hypervolume([p[:-1] for p in points[: i + 1]], reference[:-1])
    return volume


def _hypervolume_2d(points: list[tuple[float, ...]], reference: Point) -> float:
    # Sorted by the first objective, each point that improves the best second objective seen so
    # far adds the strip between its first objective and the reference.
    volume, best_second = 0.0, reference[1]
    for first, second in sorted(points):
        if second < best_second:
            volume += (reference[0] - first) * (best_second - second)
            best_second = second
    return volume


def knee_point(points: Sequence[Point]) -> int:
    """Index of the knee of the non-dominated points: the best trade-off between the extremes.

    The front is min-max normalized to [0, 1] per objective; the knee is the front point with the
    smallest sum of normalized coordinates. With two objectives the extremes sit at (0, 1) and
    (1, 0), so this is exactly the point farthest from the line joining the extremes (on the good
    side); with more it is the point farthest below the hyperplane through the unit points.
    Invariant to positive rescaling and shifting of any objective, ties included: sums within
    ``KNEE_TIE`` of the smallest count as equal (collinear fronts tie exactly in real numbers, but
    rescaling moves their sums by a few ulps), and the earliest index among them wins.
    """
    if not points:
        raise ValueError("the knee of an empty set of points is undefined")
    front = pareto_front(points)
    members = [points[i] for i in front]
    lower = [min(p[k] for p in members) for k in range(len(members[0]))]
    upper = [max(p[k] for p in members) for k in range(len(members[0]))]
    scores = [sum(p) for p in normalize(members, lower, upper)]
    lowest = min(scores)
    return next(index for index, score in zip(front, scores) if score <= lowest + KNEE_TIE * len(lower))
