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

``taps`` runs psc-nas's tap-conv kernel (``tapconv.py``): one pass over the input executing exactly the analytic
MACs, vectorised over positions, so thin groups cost what their MACs cost. The rule (``CakesSpec.fast_impl``) picks
it at stride 1 where oneDNN would pad the groups' convs by more than 1.2x (it computes output channels 16 at a time:
DenseNet3D's 4-channel groups run as 16) and a merge would execute at least 1.2x the MACs; groups of (nearly) whole
blocks of 16 run as the exact per-shape convs (``channels_last``); otherwise, and where the kernel cannot build,
``merged_impl``'s pick runs. (Until 2026-12-05 ``taps`` was one GEMM over the cube's (D, H) lines, 1.79x the MACs
and slower than the seven convs; the kernel replaced it.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, cached_property, partial
from math import prod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from psc_nas.arch import BlockChoice, ConfigError, Slot
from psc_nas.device import CPU_LAYOUT
from psc_nas.ops import tapconv
from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec
from psc_nas.ops.domain import Choice, OpDomain, Pick, as_list, check_keys
from psc_nas.ops.fast import TAPS_MIN_POSITIONS, FastGraphConv, conv, tracing
from psc_nas.ops.graph import ConvGraph
from psc_nas.ops.registry import OpFamily, register_family

SHAPES = ("1x1x3", "1x3x1", "3x1x1", "1x3x3", "3x1x3", "3x3x1", "3x3x3")
SHAPE_DIMS = {"1D": SHAPES[:3], "2D": SHAPES[3:6], "3D": SHAPES[6:]}
# The implementation rule's bounds (``CakesSpec.fast_impl``): the executed/analytic MAC ratio up to which a
# merge is picked, and the output width from which `planes` replaces `masked`.
MASKED_MAX_RATIO = 3.5
PLANES_MAX_RATIO = 1.5
MERGE_WIDE_FROM = 64
# Below this executed/analytic ratio `masked` is nearly the allocation's own conv (a full cube, or one with a few 1D
# or 2D channels) and runs; from it the tap-conv kernel (stride 1) or the per-shape convs may (``CakesSpec.fast_impl``).
MASKED_NEAR_RATIO = 1.2
# oneDNN's convs compute output channels in blocks of 16 (``ONEDNN_BLOCK``): a group of 4 costs what 16 do. Where the
# per-shape convs' padded MACs are at most 1.2x the analytic ones, they run at oneDNN's full rate and are the
# fastest path (the kernel runs at ~0.85 of it).
EXACT_MAX_PADDING = 1.2
# ... and below 16³ input positions only for groups oneDNN would pad at least this much (groups of at most 5)
SMALL_TAPS_MIN_PADDING = 3.0
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

    def __init__(self, spec: CakesSpec, impl: str, shape_groups: tuple[tuple[str, ...], ...] | None = None) -> None:
        super().__init__(spec, "folded")
        self.impl = impl
        self.shape_groups = self.GROUPS[impl] if shape_groups is None else shape_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=CPU_LAYOUT)
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


class TapCakesConv(MergedCakesConv):
    """CAKES on psc-nas's tap-conv kernel (``taps``, ``tapconv.py``): one pass over the input that executes
    exactly the analytic MACs, each output channel over its own sub-kernel's taps. Stride 1, float32 on the CPU,
    outside tracing and export, where the kernel builds; anything else runs what the rule would pick without it
    (``CakesSpec.merged_impl``: ``masked``, ``planes`` or the exact per-shape convs), and where the kernel cannot
    build at all the module says so: its ``impl`` is that fallback's name."""

    def __init__(self, spec: CakesSpec) -> None:
        fallback = spec.merged_impl()  # a merge, or the exact convs: every shape its own group
        super().__init__(spec, fallback, self.GROUPS.get(fallback, tuple((shape,) for shape in SHAPES)))
        self.fold = fallback != "channels_last"  # the exact convs as the `channels_last` impl runs them
        self.kernel = tapconv.KERNEL.available()
        if self.kernel:
            self.impl = "taps"
        self.counts = list(spec.allocation.values())
        self.masks = [shape_mask(shape) for shape in spec.allocation]
        # Below 16³ positions (8³: DenseNet3D's deepest stage) the kernel's 64-position blocks are half padding:
        # there it ran 1.11-1.64x slower than the fastest other path for groups of 7-21 channels (padded ratio
        # 1.35-2.29), and 1.6x faster only for thin ones (a uniform 28: 4.0). docs/benchmarks/ops-cakes-rule.md.
        self.small_exact = spec.padded_ratio() < SMALL_TAPS_MIN_PADDING

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.convs[0].weight
        if not self.kernel or self.spec.stride != (1, 1, 1) or not tapconv.supports(x, weight) or tracing():
            return super().forward(x)
        if self.small_exact and x.shape[2:].numel() < TAPS_MIN_POSITIONS:
            x = x.contiguous(memory_format=CPU_LAYOUT)
            return torch.cat([conv(x, c.weight, c.bias, c.stride, c.padding, 1, False) for c in self.convs], dim=1)
        weight = torch.cat([pad_kernel(layer.weight, (3, 3, 3)) for layer in self.convs])
        y = tapconv.tap_conv3d(x, weight, self.counts, self.masks)
        if self.convs[0].bias is not None:
            y = y + torch.cat([layer.bias for layer in self.convs]).view(1, -1, 1, 1, 1)
        return y


def shape_mask(shape: str) -> int:
    """The taps of a sub-kernel centred in the 3x3x3 cube, as bits ``a·9 + b·3 + c``."""
    depth, height, width = shape_kernel(shape)
    return sum(
        1 << (a * 9 + b * 3 + c)
        for a in range(3)
        for b in range(3)
        for c in range(3)
        if abs(a - 1) <= depth // 2 and abs(b - 1) <= height // 2 and abs(c - 1) <= width // 2
    )


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
    impls: ClassVar = {
        **{impl: partial(MergedCakesConv, impl=impl) for impl in MergedCakesConv.GROUPS},
        "taps": TapCakesConv,
    }

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

    def executed_ratio(self, impl: str) -> float:
        """MACs a merge (``masked``, ``planes``) executes over the analytic cost: each shape runs its group's
        bounding kernel (over the shapes present), e.g. 27/9 = 3.0 for ``masked`` on a uniform allocation."""
        taps = {shape: prod(shape_kernel(shape)) for shape in self.allocation}
        executed = 0
        for group in MergedCakesConv.GROUPS[impl]:
            present = [shape for shape in group if shape in self.allocation]
            if present:
                bound = prod(bounding_kernel([shape_kernel(shape) for shape in present]))
                executed += bound * sum(self.allocation[shape] for shape in present)
        return executed / sum(count * taps[shape] for shape, count in self.allocation.items())

    def padded_ratio(self) -> float:
        """MACs oneDNN's per-shape convs execute over the analytic cost: each group's output channels rounded up to
        whole blocks of ``ONEDNN_BLOCK`` (a uniform allocation of 28: 16/4 = 4.0; groups of 32 and 16: 1.0). Every
        shape's conv has the op's stride, so one output position stands for any input size."""
        return self.graph().blocked_ratio((1, 1, 1))

    def fast_impl(self) -> str:
        # psc-nas's tap-conv kernel executes the analytic MACs at 120-200 GF/s here, about 0.85 of oneDNN's dense
        # rate, whatever the groups' widths; oneDNN pads thin groups to blocks of 16 channels. Measured
        # (docs/benchmarks/ops.md, 2026-12-05, AMD EPYC, training pass): uniform allocations (C/7 channels a shape)
        # 1.2-2.3x faster than the best merge at C = 16-124, 8³-64³; three 2D shapes of 21-22 channels 1.26x faster
        # than the per-shape convs; groups of 24 + 24 or 40 + 24 1.03-1.06x; but where the groups are whole blocks
        # (16 + 16, 32 + 32, 48 + 16, four of 16, seven of 16) or 14 + 14 channels the per-shape convs were as fast
        # or up to 1.14x faster than the kernel (merged_impl), and a nearly full cube runs `masked`.
        if (
            self.stride == (1, 1, 1)
            and self.executed_ratio("masked") >= MASKED_NEAR_RATIO
            and self.padded_ratio() > EXACT_MAX_PADDING
        ):
            return "taps"
        return self.merged_impl()

    def merged_impl(self) -> str:
        """The rule without the tap-conv kernel (other strides, groups of whole blocks, a machine where it cannot
        build)."""
        # Groups of (nearly) whole blocks of 16 channels: the per-shape convs at oneDNN's full rate, 1.2-2.1x faster
        # than the old rule's `masked` / `planes` at stride 1 and 2 (32 = 16 + 16 and 64 = 32 + 32 in 2D, 1D and
        # mixed shapes, ops.md 2026-12-05); unless `masked` executes under 1.2x (a nearly full cube: one conv).
        if self.executed_ratio("masked") >= MASKED_NEAR_RATIO and self.padded_ratio() <= EXACT_MAX_PADDING:
            return "channels_last"
        # Seven (or fewer) thin convs of C/7 output channels each run far below oneDNN's speed, so a merge
        # that executes more MACs as fewer, wider convs is faster (docs/benchmarks/ops.md, uniform allocation,
        # fwd+bwd vs the tuned Conv3d, both CPUs measured): below 64 output channels `masked` (3.0x the
        # MACs) beat the seven convs 1.2-1.9x on the Intel Xeon and 2.0-2.5x on the AMD EPYC; from 64,
        # `planes` (1.29x) beat them 1.7x on the EPYC and lost 1.2x to them on the Xeon, so `planes` has the
        # smaller worst case. An allocation whose merge executes more than the measured regime's share
        # (small kernels: 1D-heavy) keeps the exact convs; one close to a full cube runs `masked` at any width.
        masked, planes = self.executed_ratio("masked"), self.executed_ratio("planes")
        if masked <= MASKED_MAX_RATIO and (self.out_channels < MERGE_WIDE_FROM or masked <= PLANES_MAX_RATIO):
            return "masked"
        if planes <= PLANES_MAX_RATIO:
            return "planes"
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
