"""CAKES: every output channel gets its own sub-kernel of the 3x3x3 cube (Yu et al.).

An *allocation* says how many output channels use each shape; each non-empty group is a conv
from all input channels, and the groups are concatenated in the canonical shape order below.

    x ─┬─ conv 1x1x3 (a channels) ─┐
       ├─ conv 1x3x3 (b channels) ─┼─ concat ─► y     a + b + ... = out_channels
       └─ conv 3x3x3 (c channels) ─┘
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec, Stream, register

SHAPES = ("1x1x3", "1x3x1", "3x1x1", "1x3x3", "3x1x3", "3x3x1", "3x3x3")
SHAPE_DIMS = {"1D": SHAPES[:3], "2D": SHAPES[3:6], "3D": SHAPES[6:]}


def shape_kernel(shape: str) -> tuple[int, int, int]:
    return tuple(int(k) for k in shape.split("x"))  # type: ignore[return-value]


def uniform_allocation(out_channels: int, shapes: tuple[str, ...] = SHAPES) -> dict[str, int]:
    """Spread ``out_channels`` as evenly as possible over ``shapes`` (earlier shapes take the rest)."""
    base, extra = divmod(out_channels, len(shapes))
    allocation = {shape: base + (1 if index < extra else 0) for index, shape in enumerate(shapes)}
    return {shape: count for shape, count in allocation.items() if count}


@register
@dataclass(frozen=True)
class CakesSpec(OpSpec):
    family = "cakes"

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

    def streams(self) -> tuple[Stream, ...]:
        return tuple(
            (ConvSpec(self.in_channels, count, shape_kernel(shape), self.stride),)
            for shape, count in self.allocation.items()
        )
