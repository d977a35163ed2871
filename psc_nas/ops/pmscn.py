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

With n > 1 in a slot of several consecutive convs (a UNet double conv, a ResNet basic pair) one
PmSCn replaces the whole run (the paper's P2SC2); P3D, the published (2+1)D baseline, is exactly
PmSCn with m = n = 1 and has its own family here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from psc_nas.arch import BlockChoice, ConfigError, Slot
from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec, check_int
from psc_nas.ops.domain import Choice, OpDomain, Pick, check_keys, int_choices, multipliers, str_choices
from psc_nas.ops.graph import ConvGraph
from psc_nas.ops.registry import OpFamily, register_family

ORIENTATIONS = ("1x3x3", "3x1x3", "3x3x1")
KERNEL = 3
# channels_last, never "folded" (D-flat convs as 2D convs): on the AMD EPYC of earlier runs folding paid
# only from 64 channels and only at 64³ (8-20% faster fwd+bwd; tied or slower at 32³, the tasks' patch), but
# on the Intel Xeon (AVX-512) measured idle on 2026-12-03 the folded 1x3x3 conv's backward made p3d 1.5-2.5x
# slower at every width and PmSCn 5-25% slower, folding winning nowhere by more than 3%
# (docs/benchmarks/ops-idle-cl-kept.md). One rule for both: the one whose worst case is 20%, not 2.5x.


def subspace_width(in_channels: int, out_channels: int, d: int = KERNEL) -> int:
    """Eq. 5 of the PSC paper: the 2D width that gives one (2+1)D stream a 3D conv's parameters."""
    return max(1, (out_channels * in_channels * d**3) // (in_channels * d**2 + out_channels * d))


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


# ---------------------------------------------------------------------- specs
@dataclass(frozen=True)
class PmSCnSpec(OpSpec):
    family = "pmscn"

    m: int = 1
    n: int = 1
    orientations: tuple[str, ...] | None = None
    mid_channels: int | None = None

    def validate(self) -> None:
        family = self.family
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m not in (1, 2, 3):  # not 1.0
            raise ValueError(f"{family}: m must be one of [1, 2, 3], got {self.m!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n not in (1, 2, 3):  # not 1.0
            raise ValueError(f"{family}: n must be one of [1, 2, 3], got {self.n!r}")
        orientations = ORIENTATIONS[: self.m] if self.orientations is None else self.orientations
        if not isinstance(orientations, (list, tuple)) or not all(o in ORIENTATIONS for o in orientations):
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

    def graph(self) -> ConvGraph:
        width = self.stream_width
        outs = split_evenly(self.out_channels, self.m)
        streams = [
            _stream(self.in_channels, width, out, orientation, self.n, self.stride)
            for orientation, out in zip(self.orientations, outs)  # type: ignore[arg-type]
        ]
        return ConvGraph.streams(streams, relu_between=True)

    def fast_impl(self) -> str:
        return "channels_last"


def _stream(cin: int, width: int, cout: int, orientation: str, n: int, stride: tuple[int, int, int]) -> list[ConvSpec]:
    axis = ORIENTATIONS.index(orientation)  # the axis the 1D conv runs along
    plane_kernel = tuple(1 if a == axis else KERNEL for a in range(3))
    line_kernel = tuple(KERNEL if a == axis else 1 for a in range(3))
    plane_stride = tuple(1 if a == axis else s for a, s in enumerate(stride))
    line_stride = tuple(s if a == axis else 1 for a, s in enumerate(stride))
    planes = [ConvSpec(cin, width, plane_kernel, plane_stride)]  # type: ignore[arg-type]
    planes += [ConvSpec(width, width, plane_kernel) for _ in range(n - 1)]  # type: ignore[arg-type]
    return [*planes, ConvSpec(width, cout, line_kernel, line_stride)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class P3DSpec(OpSpec):
    """(2+1)D / P3D: a 2D conv, ReLU, then a 1D conv, at the parameter-matching mid width."""

    family = "p3d"

    orientation: str = "1x3x3"
    mid_channels: int | None = None

    def validate(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"p3d: orientation must be one of {list(ORIENTATIONS)}, got {self.orientation!r}")
        if self.mid_channels is not None:
            check_int(self.family, "mid_channels", self.mid_channels, "a positive int or null")

    def graph(self) -> ConvGraph:
        as_pmscn = PmSCnSpec(
            self.in_channels,
            self.out_channels,
            self.stride,
            m=1,
            n=1,
            orientations=(self.orientation,),
            mid_channels=self.mid_channels,
        )
        return as_pmscn.graph()

    fast_impl = PmSCnSpec.fast_impl  # the same convs, the same measured rule


# ---------------------------------------------------------------------- search-space domains
WIDTH_RULE = "width multipliers must be positive numbers (1.0 = eq. 5 width)"


def mid_channels(slot: Slot, streams: int, width: float) -> dict[str, int]:
    """``mid_channels`` for a width multiplier of the PSC eq. 5 width; 1.0 keeps the op's own default.

    The multiplied width is taken from the slot's first conv (in -> out) and rounded down to a
    multiple of the stream count, so two distinct values always build two distinct networks.
    """
    if width == 1.0:
        return {}
    per_stream = max(1, int(width * subspace_width(slot.in_channels, slot.out_channels)) // streams)
    return {"mid_channels": streams * per_stream}


@dataclass(frozen=True)
class PmscnDomain(OpDomain):
    """``orientations`` maps each m to its allowed orientation subsets, written ``1x3x3+3x1x3``."""

    ms: tuple[int, ...]
    ns: tuple[int, ...]
    orientations: tuple[tuple[int, tuple[str, ...]], ...]
    widths: tuple[float, ...]

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> PmscnDomain:
        check_keys(raw, ("m", "n", "orientations", "width"), path)
        ms = int_choices(raw.get("m", [1, 2, 3]), f"{path}.m", (1, 2, 3))
        ns = int_choices(raw.get("n", [1, 2, 3]), f"{path}.n", (1, 2, 3))
        subsets = _orientation_subsets(raw.get("orientations", "all"), f"{path}.orientations")
        by_m = []
        for m in ms:
            named = tuple("+".join(subset) for subset in subsets if len(subset) == m)
            if not named:
                raise ConfigError(f"{path}.orientations", f"no subset of size m={m}; list one or drop {m} from m")
            by_m.append((m, named))
        return cls(op, ms, ns, tuple(by_m), multipliers(raw.get("width", 1.0), f"{path}.width", WIDTH_RULE))

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        subsets = {f"m{m}.orientations": named for m, named in self.orientations}
        return {"m": self.ms, "n": self.ns, **subsets, "width": self.widths}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        m = pick("m")
        return m, pick("n"), pick(f"m{m}.orientations"), pick("width")

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        m, n, orientations, width = decision
        args = {"m": m, "n": n, "orientations": orientations.split("+"), **mid_channels(slot, m, width)}
        return BlockChoice(self.op, args)


def _orientation_subsets(raw: Any, path: str) -> list[tuple[str, ...]]:
    """``all`` (every subset of every size) or a list of subsets, each in canonical order."""
    if raw == "all":
        return [subset for size in (1, 2, 3) for subset in combinations(ORIENTATIONS, size)]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            path, f"must be 'all' or a list of orientation lists such as [[1x3x3], [1x3x3, 3x1x3]], got {raw!r}"
        )
    subsets = []
    for index, subset in enumerate(raw):
        names = subset if isinstance(subset, list) else [subset]
        if not names or len(set(names)) != len(names) or not all(name in ORIENTATIONS for name in names):
            raise ConfigError(
                f"{path}[{index}]", f"must list distinct orientations from {list(ORIENTATIONS)}, got {subset!r}"
            )
        subsets.append(tuple(o for o in ORIENTATIONS if o in names))
    if len(set(subsets)) != len(subsets):
        raise ConfigError(path, "lists the same subset twice")
    return subsets


@dataclass(frozen=True)
class P3dDomain(OpDomain):
    orientations: tuple[str, ...] = ("1x3x3",)
    widths: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, op: str, raw: Mapping[str, Any], path: str) -> P3dDomain:
        check_keys(raw, ("orientation", "width"), path)
        orientations = str_choices(raw.get("orientation", "1x3x3"), f"{path}.orientation", ORIENTATIONS)
        return cls(op, orientations, multipliers(raw.get("width", 1.0), f"{path}.width", WIDTH_RULE))

    @property
    def params(self) -> dict[str, tuple[Choice, ...]]:
        return {"orientation": self.orientations, "width": self.widths}

    def decide(self, pick: Pick) -> tuple[Any, ...]:
        return pick("orientation"), pick("width")

    def resolve(self, decision: tuple[Any, ...], slot: Slot) -> BlockChoice:
        orientation, width = decision
        return BlockChoice(self.op, {"orientation": orientation, **mid_channels(slot, 1, width)})


# ---------------------------------------------------------------------- networks
def replaces_run_jointly(args: Mapping[str, Any], slot: Slot) -> bool:
    """n > 1 stacks the 2D convs of a run: one PmSCn for a slot's consecutive convs (P2SC2)."""
    return args.get("n", 1) > 1


def rescale(args: dict[str, Any], old: Slot, new: Slot) -> dict[str, Any]:
    """An explicit ``mid_channels`` scales with the slot's output channels (at least m)."""
    if args.get("mid_channels") is not None:
        args["mid_channels"] = max(args.get("m", 1), round(args["mid_channels"] * new.out_channels / old.out_channels))
    return args


PMSCN = register_family(
    OpFamily(
        spec=PmSCnSpec,
        domain=PmscnDomain,
        label_args=("m", "n"),
        joint=replaces_run_jointly,
        rescale=rescale,
        # Orientations are written out so a preset equals the config a space resolves for the same choice.
        presets={
            "p1sc1": {"m": 1, "n": 1, "orientations": ["1x3x3"]},  # (2+1)D: 2D over H×W, then 1D over D
            "p2sc2": {"m": 2, "n": 2, "orientations": ["1x3x3", "3x1x3"]},
            "p2sc3": {"m": 2, "n": 3, "orientations": ["1x3x3", "3x1x3"]},
        },
    )
)
P3D = register_family(OpFamily(spec=P3DSpec, domain=P3dDomain, label_args=("orientation",), rescale=rescale))
