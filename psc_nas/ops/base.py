"""Operator specs, the reference module that runs them, and the registry of families.

An ``OpSpec`` is a frozen value: placement (channels, stride) plus the family's arguments. It
describes itself as parallel *streams* of ``ConvSpec`` layers whose outputs are concatenated on
channels; both the analytic cost and the module are derived from those streams.

    x ─┬─ stream 0: conv ─ (ReLU) ─ conv ... ─┐
       ├─ stream 1: ...                       ├─ concat(channels) ─► y
       └─ stream k: ...                      ─┘
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from psc_nas.costs import Cost, Spatial
from psc_nas.ops._conv import ConvSpec, Triple, triple

Stream = tuple[ConvSpec, ...]


def check_int(family: str, name: str, value: Any, allowed: str, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{family}: {name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class OpSpec:
    """Base of every operator family; subclasses add their arguments as dataclass fields."""

    family: ClassVar[str]
    relu_between: ClassVar[bool] = False

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

    def streams(self) -> tuple[Stream, ...]:
        raise NotImplementedError

    def args(self) -> dict[str, Any]:
        """The family's arguments (everything but placement), JSON-friendly."""
        placement = {"in_channels", "out_channels", "stride"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in placement}

    def cost(self, spatial: Spatial) -> Cost:
        return self.cost_and_shape(spatial)[0]

    def out_spatial(self, spatial: Spatial) -> Spatial:
        return self.cost_and_shape(spatial)[1]

    def cost_and_shape(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        total, out = Cost(), tuple(spatial)
        for stream in self.streams():
            shape = tuple(spatial)
            for conv in stream:
                layer, shape = conv.cost(shape)
                total += layer
            out = shape
        return total, out  # type: ignore[return-value]

    def build(self, impl: str | None = None) -> nn.Module:
        """The module for this spec. ``impl`` changes only how forward computes, never the parameters:
        ``"auto"`` (the measured rule in ``choice.py``), ``"reference"`` (``StreamedConv``), or a
        name from ``psc_nas.ops.fast``; default ``$PSC_NAS_OP_IMPL`` or ``"auto"``."""
        from psc_nas.ops.choice import build_op  # imported here: choice builds on this module

        return build_op(self, impl)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class StreamedConv(nn.Module):
    """Reference implementation of any ``OpSpec``: plain ``nn.Conv3d`` layers, one per ConvSpec."""

    def __init__(self, spec: OpSpec) -> None:
        super().__init__()
        self.spec = spec
        self.streams = nn.ModuleList(_sequential(stream, spec.relu_between) for stream in spec.streams())

    def cost(self, spatial: Spatial) -> Cost:
        return self.spec.cost(spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [stream(x) for stream in self.streams]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def extra_repr(self) -> str:
        return f"{self.spec.family}({self.spec.in_channels}->{self.spec.out_channels}, {self.spec.args()})"


def _sequential(stream: Stream, relu_between: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, conv in enumerate(stream):
        if index and relu_between:
            layers.append(nn.ReLU(inplace=True))
        layers.append(conv.build())
    return nn.Sequential(*layers)


OP_FAMILIES: dict[str, type[OpSpec]] = {}


def register(cls: type[OpSpec]) -> type[OpSpec]:
    OP_FAMILIES[cls.family] = cls
    return cls


def make_spec(op: str, in_channels: int, out_channels: int, *, stride: int | Triple = 1, **args: Any) -> OpSpec:
    """Validated spec of family ``op``; unknown families and arguments raise ``ValueError``."""
    if op not in OP_FAMILIES:
        raise ValueError(f"op must be one of {sorted(OP_FAMILIES)}, got {op!r}")
    cls = OP_FAMILIES[op]
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

