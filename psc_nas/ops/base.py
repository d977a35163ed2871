"""What a backbone places in a network: ops that price themselves exactly and build their module.

An ``Op`` describes itself as a ``ConvGraph`` (``graph.py``) from which its exact cost and every
implementation of its module derive; an op may instead override ``cost_and_shape`` and ``build``
with any module, as long as its cost stays exact. Two kinds of ops:

- ``OpSpec``: a searchable family's frozen value, placement (channels, stride) plus the family's
  arguments; each family module subclasses it and registers an ``OpFamily`` record;
- ``PlainConv``: a layer that is not searchable (stem, shortcut, transition).

``op.build(impl=)`` picks only the forward's compute path, never the parameters: ``"auto"`` (the
op's measured ``fast_impl()``), ``"reference"``, ``"channels_last"``, ``"folded"`` (``fast.py``) or
an implementation the family offers itself (``impls``); default: the innermost ``implementation(...)``
block, else ``$PSC_NAS_OP_IMPL``, else ``"auto"``.

The rule may pick a path that executes more MACs than the op costs where that is faster (CAKES'
``masked`` and ``planes`` merges); the analytic cost stays what a search prices. ``FlopCounterMode``
counts the analytic cost on a network built under ``implementation("reference")`` (or on the meta
device, where every op runs its reference forward).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from psc_nas.arch import Triple
from psc_nas.costs import Cost, Spatial
from psc_nas.ops._conv import ConvSpec, triple
from psc_nas.ops.fast import EXACT_IMPLS, FastGraphConv
from psc_nas.ops.graph import ConvGraph, GraphConv
from psc_nas.ops.registry import families, get_family

ENV_VAR = "PSC_NAS_OP_IMPL"
_IMPL: ContextVar[str | None] = ContextVar("psc_nas_op_impl", default=None)


def requested_impl() -> str | None:
    """The implementation ``with implementation(...)`` (this thread) or ``PSC_NAS_OP_IMPL`` (the process) asks for."""
    return _IMPL.get() or os.environ.get(ENV_VAR)


@contextmanager
def implementation(impl: str) -> Iterator[None]:
    """Build every op inside the block with ``impl``; ``"reference"`` gives the MAC-exact convs, whose
    ``FlopCounterMode`` count is the analytic cost. Only the compute path changes, never the parameters."""
    if impl not in impl_names():
        raise ValueError(f"impl must be one of {list(impl_names())}, got {impl!r}")
    token = _IMPL.set(impl)
    try:
        yield
    finally:
        _IMPL.reset(token)


def check_int(family: str, name: str, value: Any, allowed: str, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{family}: {name} must be {allowed}, got {value!r}")


class Op:
    """Anything a backbone places; subclasses are frozen dataclasses with ``in_channels``,
    ``out_channels`` and ``stride`` fields and describe themselves by ``graph()``."""

    in_channels: int
    out_channels: int
    stride: Triple
    # Implementations only this kind of op offers, by name (they may execute more than cost() MACs).
    impls: ClassVar[Mapping[str, Callable[[Any], nn.Module]]] = {}

    def graph(self) -> ConvGraph:
        raise NotImplementedError(f"{type(self).__name__}: define graph(), or cost_and_shape() and build()")

    def cost_and_shape(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        """Exact params and MACs for one sample of ``spatial`` (D, H, W), and the output's size."""
        return self.graph().cost_and_shape(spatial)

    def cost(self, spatial: Spatial) -> Cost:
        return self.cost_and_shape(spatial)[0]

    def out_spatial(self, spatial: Spatial) -> Spatial:
        return self.cost_and_shape(spatial)[1]

    def fast_impl(self) -> str:
        """The implementation ``build()`` runs by default: the fastest MAC-exact one measured for this
        op (``benchmarks/ops.py``, ``docs/benchmarks/ops.md``); an unmeasured kind runs the reference."""
        return "reference"

    def segments(self) -> list[tuple[str, int]]:
        """How the dashboard draws the op: (sub-kernel path name, channels) per part of its output."""
        return self.graph().segments()

    def build(self, impl: str | None = None) -> nn.Module:
        """The module; ``impl`` changes only how its forward computes, never its parameters."""
        impl = impl or requested_impl() or "auto"
        if impl == "auto":
            impl = self.fast_impl()
        if impl in self.impls:
            return self.impls[impl](self)
        if impl == "reference":
            return GraphConv(self)
        if impl in EXACT_IMPLS:
            return FastGraphConv(self, impl)
        offering = sorted(family.name for family in families().values() if impl in family.spec.impls)
        if offering:
            raise ValueError(f"impl {impl!r} only applies to {', '.join(offering)}, not {self}")
        raise ValueError(f"impl must be one of {list(impl_names())}, got {impl!r}")


def impl_names() -> tuple[str, ...]:
    """Every implementation name ``build()`` accepts for some op."""
    own = sorted({name for family in families().values() for name in family.spec.impls})
    return ("auto", *EXACT_IMPLS, *own)


@dataclass(frozen=True)
class OpSpec(Op):
    """Base of every family's spec; subclasses set ``family`` and add their arguments as fields."""

    family: ClassVar[str]

    in_channels: int
    out_channels: int
    stride: Triple = (1, 1, 1)

    def __post_init__(self) -> None:
        check_int(self.family, "in_channels", self.in_channels, "a positive int")
        check_int(self.family, "out_channels", self.out_channels, "a positive int")
        try:
            object.__setattr__(self, "stride", triple(self.stride, "stride"))
        except ValueError as err:
            raise ValueError(f"{self.family}: {err}") from None
        self.validate()

    def validate(self) -> None:
        """Check the family's arguments; raise ``ValueError`` naming the field and allowed values."""

    def args(self) -> dict[str, Any]:
        """The family's arguments (everything but placement), JSON-friendly."""
        placement = {"in_channels", "out_channels", "stride"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in placement}

    def __str__(self) -> str:
        return f"{self.family}({self.in_channels}->{self.out_channels}, {self.args()})"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class PlainConv(Op):
    """A layer that is not searchable (stem, shortcut, transition): one bias-free 'same'-padded conv."""

    in_channels: int
    out_channels: int
    kernel: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", triple(self.kernel, "kernel"))
        object.__setattr__(self, "stride", triple(self.stride, "stride"))

    def graph(self) -> ConvGraph:
        return ConvGraph.streams([[ConvSpec(self.in_channels, self.out_channels, self.kernel, self.stride)]])

    def fast_impl(self) -> str:
        # A plain Conv3d, measured like the conv3d family: channels_last beat NCDHW at every width.
        return "channels_last"

    def __str__(self) -> str:
        return f"conv({self.in_channels}->{self.out_channels}, kernel={'x'.join(map(str, self.kernel))})"


def make_spec(op: str, in_channels: int, out_channels: int, *, stride: int | Triple = 1, **args: Any) -> OpSpec:
    """Validated spec of family ``op``; unknown families and arguments raise ``ValueError``."""
    cls = get_family(op).spec
    allowed = {f.name for f in fields(cls)} - {"in_channels", "out_channels", "stride"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{op}: unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(in_channels, out_channels, stride, **args)


def create_op(
    op: str, in_channels: int, out_channels: int, *, stride: int | Triple = 1, impl: str | None = None, **args: Any
) -> nn.Module:
    """Build the module for one searchable slot: ``create_op("pmscn", 32, 64, stride=2, m=2, n=1)``."""
    return make_spec(op, in_channels, out_channels, stride=stride, **args).build(impl)
