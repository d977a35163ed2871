"""Argument domains of each op family inside a search space, read from the space YAML.

A domain lists the categorical *parameters* its family may ask for (name -> choices, every
choice a plain str/int/float so Optuna and NNI can store it), asks them define-by-run through
``decide(pick)`` (PmSCn asks ``m`` first, then the orientation subsets of that size), and
``resolve``s the abstract decision for one slot into an exact ``BlockChoice``:

    pmscn:  {m: [1, 2], n: [1, 2, 3], orientations: all, width: [0.5, 1.0]}
    cakes:  {shapes: [1D, 2D], step: 1/4}

Decisions are slot-independent (channel *fractions*, width *multipliers*) so one decision can be
shared by slots of different widths; resolution turns them into integer channel counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, cached_property
from itertools import combinations
from typing import Any, Callable, ClassVar, Mapping

from psc_nas.arch import BlockChoice, ConfigError
from psc_nas.nets.base import Slot
from psc_nas.ops import ORIENTATIONS, SHAPES, subspace_width, uniform_allocation
from psc_nas.ops.cakes import SHAPE_DIMS

Choice = str | int | float
Pick = Callable[[str], Any]

MAX_CAKES_QUANTA = 8  # 1/8 steps give C(14, 6) = 3003 allocations per decision; finer ones explode


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown argument; allowed: {list(allowed)}" if allowed else "takes no arguments")


def _list(raw: Any, path: str) -> list[Any]:
    """A YAML scalar or list as a non-empty list without duplicates."""
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise ConfigError(path, "must not be empty")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(path, f"has duplicates: {values}")
    return values


def _ints(raw: Any, path: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    values = _list(raw, path)
    for value in values:
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(path, f"values must be from {list(allowed)}, got {value!r}")
    return tuple(values)


def _widths(raw: Any, path: str) -> tuple[float, ...]:
    values = _list(raw, path)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(path, f"width multipliers must be positive numbers (1.0 = eq. 5 width), got {value!r}")
    widths = tuple(float(v) for v in values)
    if len(set(widths)) != len(widths):
        raise ConfigError(path, f"has duplicates: {values}")
    return widths


def _mid_channels(slot: Slot, streams: int, width: float) -> dict[str, int]:
    """``mid_channels`` for a width multiplier of the PSC eq. 5 width; 1.0 keeps the op's own default.

    The multiplied width is taken from the slot's first conv (in -> out) and rounded down to a
    multiple of the stream count, so two distinct values always build two distinct networks.
    """
    if width == 1.0:
        return {}
    per_stream = max(1, int(width * subspace_width(slot.in_channels, slot.out_channels)) // streams)
    return {"mid_channels": streams * per_stream}


class OpDomain:
    """Base of the per-family domains, itself the domain of a family searched without arguments.

    ``op`` is the family name used in configs and in parameter names.
    """

    op: ClassVar[str]

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return ()

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        return BlockChoice(self.op)


@dataclass(frozen=True)
class PlainDomain(OpDomain):
    """A family searched without arguments: conv3d (3x3x3), csn_ip, csn_ir."""

    family: str

    @property
    def op(self) -> str:  # type: ignore[override]
        return self.family

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> PlainDomain:
        _check_keys(raw, (), path)
        return cls(op)


@dataclass(frozen=True)
class P3dDomain(OpDomain):
    op = "p3d"
    orientations: tuple[str, ...] = ("1x3x3",)
    widths: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> P3dDomain:
        _check_keys(raw, ("orientation", "width"), path)
        orientations = tuple(_list(raw.get("orientation", "1x3x3"), f"{path}.orientation"))
        for orientation in orientations:
            if orientation not in ORIENTATIONS:
                raise ConfigError(f"{path}.orientation", f"values must be from {list(ORIENTATIONS)}, got {orientation!r}")
        return cls(orientations, _widths(raw.get("width", 1.0), f"{path}.width"))

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {"orientation": self.orientations, "width": self.widths}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return pick("orientation"), pick("width")

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        orientation, width = decision
        return BlockChoice(self.op, {"orientation": orientation, **_mid_channels(slot, 1, width)})


@dataclass(frozen=True)
class PmscnDomain(OpDomain):
    """``orientations`` maps each m to its allowed orientation subsets, written ``1x3x3+3x1x3``."""

    op = "pmscn"
    ms: tuple[int, ...]
    ns: tuple[int, ...]
    orientations: tuple[tuple[int, tuple[str, ...]], ...]
    widths: tuple[float, ...]

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> PmscnDomain:
        _check_keys(raw, ("m", "n", "orientations", "width"), path)
        ms = _ints(raw.get("m", [1, 2, 3]), f"{path}.m", (1, 2, 3))
        ns = _ints(raw.get("n", [1, 2, 3]), f"{path}.n", (1, 2, 3))
        subsets = _orientation_subsets(raw.get("orientations", "all"), f"{path}.orientations")
        by_m = []
        for m in ms:
            named = tuple("+".join(subset) for subset in subsets if len(subset) == m)
            if not named:
                raise ConfigError(f"{path}.orientations", f"no subset of size m={m}; list one or drop {m} from m")
            by_m.append((m, named))
        return cls(ms, ns, tuple(by_m), _widths(raw.get("width", 1.0), f"{path}.width"))

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        subsets = {f"m{m}.orientations": named for m, named in self.orientations}
        return {"m": self.ms, "n": self.ns, **subsets, "width": self.widths}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        m = pick("m")
        return m, pick("n"), pick(f"m{m}.orientations"), pick("width")

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        m, n, orientations, width = decision
        args = {"m": m, "n": n, "orientations": orientations.split("+"), **_mid_channels(slot, m, width)}
        return BlockChoice(self.op, args)


def _orientation_subsets(raw: Any, path: str) -> list[tuple[str, ...]]:
    """``all`` (every subset of every size) or a list of subsets, each in canonical order."""
    if raw == "all":
        return [subset for size in (1, 2, 3) for subset in combinations(ORIENTATIONS, size)]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, f"must be 'all' or a list of orientation lists such as [[1x3x3], [1x3x3, 3x1x3]], got {raw!r}")
    subsets = []
    for index, subset in enumerate(raw):
        names = subset if isinstance(subset, list) else [subset]
        if not names or len(set(names)) != len(names) or not all(name in ORIENTATIONS for name in names):
            raise ConfigError(f"{path}[{index}]", f"must list distinct orientations from {list(ORIENTATIONS)}, got {subset!r}")
        subsets.append(tuple(o for o in ORIENTATIONS if o in names))
    if len(set(subsets)) != len(subsets):
        raise ConfigError(path, "lists the same subset twice")
    return subsets


@dataclass(frozen=True)
class CakesDomain(OpDomain):
    """Allocations as channel fractions in steps of ``1/quanta`` over ``shapes`` (or ``uniform``).

    A fraction choice is written ``1x3x3=1/4,3x3x3=3/4``. For a slot of C output channels it
    becomes integer counts by largest remainder: each shape gets floor(f·C) channels, the
    channels left over go to the largest remainders (ties to the earlier shape in
    ``ops.cakes.SHAPES`` order), so counts sum to C exactly; shapes left with 0 are dropped.
    """

    op = "cakes"
    shapes: tuple[str, ...]
    quanta: int | None  # None: only the uniform allocation over ``shapes`` (the papers' manual CAKES)

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> CakesDomain:
        _check_keys(raw, ("shapes", "step"), path)
        shapes: list[str] = []
        for name in _list(raw.get("shapes", list(SHAPES)), f"{path}.shapes"):
            if name not in SHAPES and name not in SHAPE_DIMS:
                raise ConfigError(f"{path}.shapes", f"values must be 1D, 2D, 3D or shapes from {list(SHAPES)}, got {name!r}")
            shapes += SHAPE_DIMS.get(name, [name])
        if len(set(shapes)) != len(shapes):
            raise ConfigError(f"{path}.shapes", f"names a shape twice: {shapes}")
        ordered = tuple(shape for shape in SHAPES if shape in shapes)
        return cls(ordered, _quanta(raw.get("step", "1/4"), f"{path}.step"))

    @cached_property
    def allocations(self) -> tuple[str, ...]:
        if self.quanta is None:
            return ("uniform",)
        return tuple(
            ",".join(f"{shape}={count}/{self.quanta}" for shape, count in zip(self.shapes, counts) if count)
            for counts in _compositions(self.quanta, len(self.shapes))
        )

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {"allocation": self.allocations}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return (pick("allocation"),)

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        (allocation,) = decision
        if allocation == "uniform":
            return BlockChoice(self.op, {"allocation": uniform_allocation(slot.out_channels, self.shapes)})
        return BlockChoice(self.op, {"allocation": _channel_counts(allocation, slot.out_channels)})


@cache  # a space resolves each allocation once per distinct slot width, not once per slot
def _channel_counts(allocation: str, channels: int) -> dict[str, int]:
    fractions = {shape: Fraction(share) for shape, share in (part.split("=") for part in allocation.split(","))}
    return largest_remainder(fractions, channels)


def largest_remainder(fractions: Mapping[str, Fraction], total: int) -> dict[str, int]:
    """Integer counts proportional to ``fractions`` (summing to 1) that sum to ``total`` exactly."""
    exact = {shape: fraction * total for shape, fraction in fractions.items()}
    counts = {shape: int(value) for shape, value in exact.items()}
    order = sorted(exact, key=lambda shape: (-(exact[shape] - counts[shape]), SHAPES.index(shape)))
    for shape in order[: total - sum(counts.values())]:
        counts[shape] += 1
    return {shape: counts[shape] for shape in SHAPES if counts.get(shape)}


def _quanta(raw: Any, path: str) -> int | None:
    if raw == "uniform":
        return None
    match = re.fullmatch(r"\s*1\s*/\s*(\d+)\s*", raw) if isinstance(raw, str) else None
    if match:
        quanta = int(match.group(1))
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0:
        quanta = round(1 / raw)
        if abs(quanta * raw - 1) > 1e-6:
            raise ConfigError(path, f"must be 1/K for an integer K (e.g. 1/4 or 0.25), got {raw!r}")
    else:
        raise ConfigError(path, f"must be 'uniform' or a fraction 1/K such as 1/4 or 0.25, got {raw!r}")
    if not 1 <= quanta <= MAX_CAKES_QUANTA:
        raise ConfigError(path, f"K in 1/K must be between 1 and {MAX_CAKES_QUANTA}, got {quanta}")
    return quanta


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write ``total`` as an ordered sum of ``parts`` non-negative ints."""
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total, -1, -1) for rest in _compositions(total - first, parts - 1)]


DOMAINS: dict[str, Callable[[str, Mapping[str, Any], str], OpDomain]] = {
    "conv3d": PlainDomain.parse,
    "csn_ip": PlainDomain.parse,
    "csn_ir": PlainDomain.parse,
    "p3d": P3dDomain.parse,
    "pmscn": PmscnDomain.parse,
    "cakes": CakesDomain.parse,
}


def parse_domain(op: str, raw: Any, path: str) -> OpDomain:
    """The domain of family ``op`` from its YAML arguments (``null`` or ``{}`` for the defaults)."""
    if op not in DOMAINS:
        raise ConfigError(path, f"unknown op; allowed: {sorted(DOMAINS)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"arguments must be a mapping (or empty), got {raw!r}")
    return DOMAINS[op](op, raw, path)
