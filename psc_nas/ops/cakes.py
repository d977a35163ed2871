"""CAKES: every output channel gets its own sub-kernel of the 3x3x3 cube (Yu et al.).

An *allocation* says how many output channels use each shape; each non-empty group is a conv
from all input channels, and the groups are concatenated in the canonical shape order below.

    x ─┬─ conv 1x1x3 (a channels) ─┐
       ├─ conv 1x3x3 (b channels) ─┼─ concat ─► y     a + b + ... = out_channels
       └─ conv 3x3x3 (c channels) ─┘

In a search space an allocation is searched as channel *fractions* (``{shapes: [1D, 2D, 3D],
step: 1/4}``); ``fit_to_budget`` rescales counts in proportion. Besides the exact implementations,
CAKES offers two merges that execute more MACs than it costs: ``masked`` (every sub-kernel
zero-padded to 3x3x3, one conv) and ``planes`` (1x1x3 into 1x3x3, 1x3x1 into 3x3x1, 3x1x1 into
3x1x3: four convs instead of seven), 27/9 and 81/63 of the analytic MACs for a uniform allocation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, cached_property, partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from psc_nas.arch import BlockChoice, ConfigError, Slot
from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec
from psc_nas.ops.domain import Choice, OpDomain, Pick, as_list, check_keys
from psc_nas.ops.fast import CHANNELS_LAST, FastGraphConv, conv
from psc_nas.ops.graph import ConvGraph
from psc_nas.ops.registry import OpFamily, register_family

SHAPES = ("1x1x3", "1x3x1", "3x1x1", "1x3x3", "3x1x3", "3x3x1", "3x3x3")
SHAPE_DIMS = {"1D": SHAPES[:3], "2D": SHAPES[3:6], "3D": SHAPES[6:]}
MAX_CAKES_QUANTA = 8  # 1/8 steps give C(14, 6) = 3003 allocations per decision; finer ones explode


def shape_kernel(shape: str) -> tuple[int, int, int]:
    return tuple(int(k) for k in shape.split("x"))  # type: ignore[return-value]


def uniform_allocation(out_channels: int, shapes: tuple[str, ...] = SHAPES) -> dict[str, int]:
    """Spread ``out_channels`` as evenly as possible over ``shapes`` (earlier shapes take the rest)."""
    base, extra = divmod(out_channels, len(shapes))
    allocation = {shape: base + (1 if index < extra else 0) for index, shape in enumerate(shapes)}
    return {shape: count for shape, count in allocation.items() if count}


# ---------------------------------------------------------------------- the spec and its modules
class MergedCakesConv(FastGraphConv):
    """CAKES computed as one conv per group of shapes on zero-padded weights (``masked``, ``planes``)."""

    GROUPS: ClassVar[dict[str, tuple[tuple[str, ...], ...]]] = {
        "masked": (SHAPES,),
        "planes": (("1x1x3", "1x3x3"), ("1x3x1", "3x3x1"), ("3x1x1", "3x1x3"), ("3x3x3",)),
    }

    def __init__(self, spec: CakesSpec, impl: str) -> None:
        super().__init__(spec, "folded")
        self.impl = impl
        self.shape_groups = self.GROUPS[impl]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=CHANNELS_LAST)
        layers = dict(zip(self.spec.allocation, self.convs))
        pieces: dict[str, torch.Tensor] = {}
        for group in self.shape_groups:
            present = [shape for shape in group if shape in layers]
            if not present:
                continue
            kernel = bounding_kernel([layers[shape].kernel_size for shape in present])
            weight = torch.cat([pad_kernel(layers[shape].weight, kernel) for shape in present])
            bias = None if layers[present[0]].bias is None else torch.cat([layers[s].bias for s in present])
            padding = tuple(k // 2 for k in kernel)
            merged = conv(x, weight, bias, self.spec.stride, padding, 1, self.fold)
            for shape, chunk in zip(present, merged.split([layers[s].out_channels for s in present], dim=1)):
                pieces[shape] = chunk
        outputs = [pieces[shape] for shape in self.spec.allocation]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def bounding_kernel(kernels: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    return tuple(max(k[axis] for k in kernels) for axis in range(3))  # type: ignore[return-value]


def pad_kernel(weight: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Zero-pad a (centred, odd) conv weight to ``kernel``: same outputs under 'same' padding."""
    widths: list[int] = []
    for axis in (2, 1, 0):  # F.pad lists the last dimension first
        extra = (kernel[axis] - weight.shape[2 + axis]) // 2
        widths += [extra, extra]
    return F.pad(weight, widths)


@dataclass(frozen=True)
class CakesSpec(OpSpec):
    family = "cakes"
    impls: ClassVar = {impl: partial(MergedCakesConv, impl=impl) for impl in MergedCakesConv.GROUPS}

    allocation: dict[str, int] | None = None

    def validate(self) -> None:
        allocation = uniform_allocation(self.out_channels) if self.allocation is None else self.allocation
        if not isinstance(allocation, dict):
            raise ValueError(f"cakes: allocation must map shapes {list(SHAPES)} to channel counts, got {allocation!r}")
        unknown = sorted(set(allocation) - set(SHAPES))
        if unknown:
            raise ValueError(f"cakes: allocation has unknown shape(s) {unknown}; allowed: {list(SHAPES)}")
        for shape, count in allocation.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"cakes: allocation[{shape!r}] must be a non-negative int, got {count!r}")
        if sum(allocation.values()) != self.out_channels:
            raise ValueError(
                f"cakes: allocation counts must sum to out_channels={self.out_channels}, "
                f"got {sum(allocation.values())} from {allocation}"
            )
        canonical = {shape: allocation[shape] for shape in SHAPES if allocation.get(shape)}
        object.__setattr__(self, "allocation", canonical)

    def __hash__(self) -> int:
        return hash((self.in_channels, self.out_channels, self.stride, tuple(self.allocation.items())))

    def args(self) -> dict[str, Any]:
        return {"allocation": dict(self.allocation)}

    def graph(self) -> ConvGraph:
        cin, stride = self.in_channels, self.stride
        convs = [ConvSpec(cin, count, shape_kernel(shape), stride) for shape, count in self.allocation.items()]
        return ConvGraph.streams([[conv] for conv in convs])

    def fast_impl(self) -> str:
        # channels_last beat NCDHW at every measured width (1.3-1.6x); folding slowed the thin sub-kernels.
        return "channels_last"


# ---------------------------------------------------------------------- search-space domain
@dataclass(frozen=True)
class CakesDomain(OpDomain):
    """Allocations as channel fractions in steps of ``1/quanta`` over ``shapes`` (or ``uniform``).

    A fraction choice is written ``1x3x3=1/4,3x3x3=3/4``. For a slot of C output channels it
    becomes integer counts by largest remainder: each shape gets floor(f·C) channels, the
    channels left over go to the largest remainders (ties to the earlier shape in ``SHAPES``
    order), so counts sum to C exactly; shapes left with 0 are dropped.
    """

    shapes: tuple[str, ...]
    quanta: int | None  # None: only the uniform allocation over ``shapes`` (the papers' manual CAKES)

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> CakesDomain:
        check_keys(raw, ("shapes", "step"), path)
        shapes: list[str] = []
        for name in as_list(raw.get("shapes", list(SHAPES)), f"{path}.shapes"):
            if not isinstance(name, str) or (name not in SHAPES and name not in SHAPE_DIMS):
                allowed = f"1D, 2D, 3D or shapes from {list(SHAPES)}"
                raise ConfigError(f"{path}.shapes", f"values must be {allowed}, got {name!r}")
            shapes += SHAPE_DIMS.get(name, [name])
        if len(set(shapes)) != len(shapes):
            raise ConfigError(f"{path}.shapes", f"names a shape twice: {shapes}")
        ordered = tuple(shape for shape in SHAPES if shape in shapes)
        return cls(op, ordered, _quanta(raw.get("step", "1/4"), f"{path}.step"))

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


# ---------------------------------------------------------------------- fit_to_budget
def rescale(args: dict[str, Any], old: Slot, new: Slot) -> dict[str, Any]:
    """An explicit allocation is rescaled proportionally by highest averages (D'Hondt), keeping the
    sum equal to the slot's output channels; no shape loses channels when a slot grows, and an empty
    shape stays empty."""
    if args.get("allocation") is not None:
        args["allocation"] = highest_averages(args["allocation"], new.out_channels)
    return args


def highest_averages(weights: Mapping[str, int], seats: int) -> dict[str, int]:
    """Split ``seats`` in proportion to ``weights`` by D'Hondt: lower quotas, then the best averages."""
    total = sum(weights.values())
    shares = {key: weight * seats // total for key, weight in weights.items()}
    for _ in range(seats - sum(shares.values())):  # fewer than len(weights) left
        best = max(weights, key=lambda key: weights[key] / (shares[key] + 1))
        shares[best] += 1
    return shares


FAMILY = register_family(
    OpFamily(
        spec=CakesSpec,
        domain=CakesDomain,
        rescale=rescale,
        presets={"cakes_uniform": {}},  # allocation None: uniform over the seven shapes per slot
    )
)
