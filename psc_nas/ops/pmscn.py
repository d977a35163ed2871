"""PmSCn: m parallel streams, each n 2D convs in one orientation then one 1D conv (Gonda et al.).

A stream's *orientation* names its 2D kernel in (D, H, W) order; its 1D conv runs along the axis
the 2D kernel leaves out. ``1x3x3`` is the classic (2+1)D factorization: 2D in H×W, then 1D in D.

    x ─┬─ 2D(1x3x3) ─ ReLU ─ [2D ─ ReLU] × (n-1) ─ 1D(3x1x1) ─┐
       ├─ 2D(3x1x3) ─ ...                        ─ 1D(1x3x1) ─┼─ concat ─► y
       └─ 2D(3x3x1) ─ ...                        ─ 1D(1x1x3) ─┘

The sub-space width M (the 2D convs' output channels) defaults to eq. 5 of the PSC paper,
``M = k_i·k_{i-1}·d³ / (k_{i-1}·d² + k_i·d)``, which matches a 3D conv's parameters for one
stream, and is divided evenly over the m streams. Output channels are split over the streams,
the first streams taking the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass

from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec, Stream, check_int, register

ORIENTATIONS = ("1x3x3", "3x1x3", "3x3x1")
KERNEL = 3


def subspace_width(in_channels: int, out_channels: int, d: int = KERNEL) -> int:
    """Eq. 5 of the PSC paper: the 2D width that gives one (2+1)D stream a 3D conv's parameters."""
    return max(1, (out_channels * in_channels * d**3) // (in_channels * d**2 + out_channels * d))


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@register
@dataclass(frozen=True)
class PmSCnSpec(OpSpec):
    family = "pmscn"
    relu_between = True

    m: int = 1
    n: int = 1
    orientations: tuple[str, ...] | None = None
    mid_channels: int | None = None

    def validate(self) -> None:
        family = self.family
        if self.m not in (1, 2, 3) or isinstance(self.m, bool):
            raise ValueError(f"{family}: m must be one of [1, 2, 3], got {self.m!r}")
        if self.n not in (1, 2, 3) or isinstance(self.n, bool):
            raise ValueError(f"{family}: n must be one of [1, 2, 3], got {self.n!r}")
        orientations = ORIENTATIONS[: self.m] if self.orientations is None else self.orientations
        if isinstance(orientations, str) or not all(o in ORIENTATIONS for o in orientations):
            raise ValueError(
                f"{family}: orientations must be a list of distinct values from {list(ORIENTATIONS)}, "
                f"got {self.orientations!r}"
            )
        orientations = tuple(orientations)
        if len(orientations) != self.m or len(set(orientations)) != self.m:
            raise ValueError(
                f"{family}: orientations must hold m={self.m} distinct values from {list(ORIENTATIONS)}, "
                f"got {list(orientations)}"
            )
        object.__setattr__(self, "orientations", orientations)
        if self.out_channels < self.m:
            raise ValueError(f"{family}: out_channels must be at least m={self.m}, got {self.out_channels}")
        if self.mid_channels is not None:
            check_int(family, "mid_channels", self.mid_channels, f"an int >= m={self.m} or null", minimum=self.m)

    @property
    def stream_width(self) -> int:
        total = self.mid_channels or subspace_width(self.in_channels, self.out_channels)
        return max(1, total // self.m)

    def streams(self) -> tuple[Stream, ...]:
        width = self.stream_width
        outs = split_evenly(self.out_channels, self.m)
        return tuple(
            _stream(self.in_channels, width, out, orientation, self.n, self.stride)
            for orientation, out in zip(self.orientations, outs)  # type: ignore[arg-type]
        )


def _stream(cin: int, width: int, cout: int, orientation: str, n: int, stride: tuple[int, int, int]) -> Stream:
    axis = ORIENTATIONS.index(orientation)  # the axis the 1D conv runs along
    plane_kernel = tuple(1 if a == axis else KERNEL for a in range(3))
    line_kernel = tuple(KERNEL if a == axis else 1 for a in range(3))
    plane_stride = tuple(1 if a == axis else s for a, s in enumerate(stride))
    line_stride = tuple(s if a == axis else 1 for a, s in enumerate(stride))
    planes = [ConvSpec(cin, width, plane_kernel, plane_stride)]  # type: ignore[arg-type]
    planes += [ConvSpec(width, width, plane_kernel) for _ in range(n - 1)]  # type: ignore[arg-type]
    return (*planes, ConvSpec(width, cout, line_kernel, line_stride))  # type: ignore[arg-type]


@register
@dataclass(frozen=True)
class P3DSpec(OpSpec):
    """(2+1)D / P3D: a 2D conv, ReLU, then a 1D conv, at the parameter-matching mid width.

    Exactly PmSCn with m=n=1; kept as a family of its own because it is the published baseline.
    """

    family = "p3d"
    relu_between = True

    orientation: str = "1x3x3"
    mid_channels: int | None = None

    def validate(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"p3d: orientation must be one of {list(ORIENTATIONS)}, got {self.orientation!r}")
        if self.mid_channels is not None:
            check_int(self.family, "mid_channels", self.mid_channels, "a positive int or null")

    def streams(self) -> tuple[Stream, ...]:
        as_pmscn = PmSCnSpec(
            self.in_channels, self.out_channels, self.stride,
            m=1, n=1, orientations=(self.orientation,), mid_channels=self.mid_channels,
        )
        return as_pmscn.streams()
