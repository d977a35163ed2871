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

``taps`` (stride 1 only; other strides run ``channels_last``) computes CAKES as one GEMM: the
zero-padded channels_last input as (positions, 3·C_in) rows (each position beside its two W
neighbours) times every (D, H) line of the cube's weights side by side, over only the output
channels whose sub-kernel touches that line; each line's block of the product is then added to the
output shifted by the line's row offset. It executes ``taps_macs_ratio`` of the analytic MACs
(uniform: 1.79x at 32³, against ``masked``'s 3x) and measured slower than the seven convs
(docs/benchmarks/ops.md), so no rule picks it.
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
from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec
from psc_nas.ops.domain import Choice, OpDomain, Pick, as_list, check_keys
from psc_nas.ops.fast import FastGraphConv, conv
from psc_nas.ops.graph import ConvGraph
from psc_nas.ops.registry import OpFamily, register_family

SHAPES = ("1x1x3", "1x3x1", "3x1x1", "1x3x3", "3x1x3", "3x3x1", "3x3x3")
SHAPE_DIMS = {"1D": SHAPES[:3], "2D": SHAPES[3:6], "3D": SHAPES[6:]}
# The implementation rule's bounds (``CakesSpec.fast_impl``): the executed/analytic MAC ratio up to which a
# merge is picked, and the output width from which `planes` replaces `masked`.
MASKED_MAX_RATIO = 3.5
PLANES_MAX_RATIO = 1.5
MERGE_WIDE_FROM = 64
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


class TapCakesConv(FastGraphConv):
    """CAKES as one GEMM over every (D, H) kernel line of a padded channels_last input (``taps``)."""

    def __init__(self, spec: CakesSpec) -> None:
        super().__init__(spec, "channels_last")
        self.impl = "taps"
        self.plan = line_plan(spec.allocation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.spec.stride != (1, 1, 1) or x.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        weight = torch.cat([pad_kernel(layer.weight, (3, 3, 3)) for layer in self.convs])
        y = LineGemm.apply(x, weight, self.plan)
        if self.convs[0].bias is not None:
            y = y + torch.cat([layer.bias for layer in self.convs]).view(1, -1, 1, 1, 1)
        return y


@dataclass(frozen=True)
class LinePlan:
    """Per (D, H) line of the cube that some sub-kernel touches: its ``kd``, ``kh`` and the runs
    ``(first, stop)`` of output channels (canonical order) whose sub-kernel touches it."""

    lines: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...]

    @property
    def width(self) -> int:
        """Columns of the one GEMM: every line's output channels side by side."""
        return sum(stop - first for _, _, runs in self.lines for first, stop in runs)


def line_plan(allocation: Mapping[str, int]) -> LinePlan:
    bounds, start = [], 0
    for shape, count in allocation.items():
        bounds.append((shape, start, start + count))
        start += count
    lines = []
    for kd in range(3):
        for kh in range(3):
            runs: list[list[int]] = []
            for shape, first, stop in bounds:
                if _covers(shape, kd, kh):
                    if runs and runs[-1][1] == first:
                        runs[-1][1] = stop
                    else:
                        runs.append([first, stop])
            if runs:
                lines.append((kd, kh, tuple((first, stop) for first, stop in runs)))
    return LinePlan(tuple(lines))


def _covers(shape: str, kd: int, kh: int) -> bool:
    depth, height, _ = shape_kernel(shape)
    return abs(kd - 1) <= depth // 2 and abs(kh - 1) <= height // 2


def line_rows(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """For an (N, C, D, H, W) input: the padded-grid rows ``[first, stop)`` of the output, and the
    row offsets of one step along D and along H in the padded (N·(D+2)·(H+2)·(W+2), C) matrix."""
    n, _, depth, height, width = shape
    row = width + 2
    plane = (height + 2) * row
    first = plane + row + 1  # padded position (n=0, 1, 1, 1)
    stop = ((n - 1) * (depth + 2) + depth) * plane + height * row + width + 1  # (n-1, D, H, W) + 1
    return first, stop, plane, row


def taps_macs_ratio(allocation: Mapping[str, int], spatial: Sequence[int], batch: int = 1) -> float:
    """MACs ``taps`` executes over the analytic MACs: its GEMM runs on the padded grid's rows from the first
    interior position less one D and one H step to the last plus one, and on all three W taps of
    every (D, H) line a sub-kernel touches."""
    first, stop, plane, row = line_rows((batch, 1, *spatial))
    rows = (stop - first + 2 * (plane + row)) / (batch * spatial[0] * spatial[1] * spatial[2])
    executed = 3 * line_plan(allocation).width
    analytic = sum(count * prod(shape_kernel(s)) for s, count in allocation.items())
    return rows * executed / analytic


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> zero-padded channels_last matrix (N·(D+2)·(H+2)·(W+2), C), contiguous."""
    n, c, depth, height, width = x.shape
    padded = x.new_zeros((n, depth + 2, height + 2, width + 2, c))
    padded[:, 1:-1, 1:-1, 1:-1] = x.permute(0, 2, 3, 4, 1)
    return padded.view(-1, c)


def _interior(rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``_padded_rows``: (N, C, D, H, W) channels_last_3d from padded-grid rows."""
    n, _, depth, height, width = shape
    grid = rows.view(n, depth + 2, height + 2, width + 2, -1)[:, 1:-1, 1:-1, 1:-1]
    return grid.permute(0, 4, 1, 2, 3).contiguous(memory_format=CPU_LAYOUT)


class LineGemm(torch.autograd.Function):
    """y = CAKES conv of x by a zero-padded 3x3x3 ``weight`` (C_out, C_in, 3, 3, 3).

    x becomes padded rows (positions × C_in), then ``wide`` rows (positions × 3·C_in: each row beside
    its two W neighbours, one copy). One GEMM multiplies ``wide`` by every touched (D, H) line's
    (3·C_in × its output channels) weights side by side, giving Z; the output adds, per line and run,
    Z's block shifted by the line's row offset. Gradients: the same GEMM transposed, on a gradient
    of Z that is those blocks of the output gradient put back at their offsets."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, plan: LinePlan) -> torch.Tensor:
        first, stop, plane, row = line_rows(x.shape)
        xrows = _padded_rows(x)
        lo, hi = first - plane - row, stop + plane + row  # the rows any line reads
        wide = torch.cat([xrows[lo - 1 : hi - 1], xrows[lo:hi], xrows[lo + 1 : hi + 1]], dim=1)
        taps = weight.permute(2, 3, 4, 1, 0)  # (kd, kh, kw, C_in, C_out)
        blocks = [taps[kd, kh, :, :, a:b].flatten(0, 1) for kd, kh, runs in plan.lines for a, b in runs]
        z = torch.mm(wide, torch.cat(blocks, dim=1))
        yrows = xrows.new_zeros((xrows.shape[0], weight.shape[0]))
        out, column = yrows[first:stop], 0
        for kd, kh, runs in plan.lines:
            shift = first + (kd - 1) * plane + (kh - 1) * row - lo
            for a, b in runs:
                out[:, a:b] += z[shift : shift + stop - first, column : column + b - a]
                column += b - a
        ctx.save_for_backward(wide, weight)
        ctx.plan, ctx.shape = plan, x.shape
        return _interior(yrows, x.shape)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        wide, weight = ctx.saved_tensors
        plan = ctx.plan
        first, stop, plane, row = line_rows(ctx.shape)
        lo = first - plane - row
        grad_rows = _padded_rows(grad_y)[first:stop]  # zero on the padding: no gradient there
        grad_z = wide.new_zeros((wide.shape[0], plan.width))
        column = 0
        for kd, kh, runs in plan.lines:
            shift = first + (kd - 1) * plane + (kh - 1) * row - lo
            for a, b in runs:
                grad_z[shift : shift + stop - first, column : column + b - a] = grad_rows[:, a:b]
                column += b - a
        taps = weight.permute(2, 3, 4, 1, 0)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            blocks = [taps[kd, kh, :, :, a:b].flatten(0, 1) for kd, kh, runs in plan.lines for a, b in runs]
            grad_wide = torch.mm(grad_z, torch.cat(blocks, dim=1).t())
            c_in = weight.shape[1]
            n, _, depth, height, width = ctx.shape
            grad_xrows = wide.new_zeros((n * (depth + 2) * (height + 2) * (width + 2), c_in))
            span = grad_wide.shape[0]
            for kw in range(3):  # wide row r holds x rows lo + r - 1 + kw
                grad_xrows[lo - 1 + kw : lo - 1 + kw + span] += grad_wide[:, kw * c_in : (kw + 1) * c_in]
            grad_x = _interior(grad_xrows, ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_blocks = torch.mm(wide.t(), grad_z)  # (3·C_in, width)
            grad_taps = weight.new_zeros(taps.shape)
            column = 0
            for kd, kh, runs in plan.lines:
                for a, b in runs:
                    grad_taps[kd, kh, :, :, a:b] = grad_blocks[:, column : column + b - a].view(3, -1, b - a)
                    column += b - a
            grad_weight = grad_taps.permute(4, 3, 0, 1, 2)
        return grad_x, grad_weight, None


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

    def fast_impl(self) -> str:
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
