"""What the backbones share: width scaling, hparam checks, and conv runs priced as they are built.

Each backbone turns a config into a *blueprint*: a frozen value holding the ops of every slot and
every fixed layer. The blueprint both builds the module and prices it, so the analytic cost
cannot drift from the network:

    ArchConfig ─► BlueprintBackbone.blueprint() ─► blueprint ─┬─ .build(norm=, activation=) ─► nn.Module
                                                              └─ .cost(spatial) ─► Cost (no forward pass)

Costs price the default normalization, ``nn.BatchNorm3d``: two trainable parameters per channel
(affine weight and bias; running statistics are buffers) and no MACs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from psc_nas.arch import ArchConfig, ConfigError, Triple
from psc_nas.costs import Cost, Spatial
from psc_nas.device import CPU_LAYOUT
from psc_nas.nets.base import Backbone
from psc_nas.ops import Op, OpSpec, PlainConv, realize
from psc_nas.ops import norm_act as fused
from psc_nas.ops.base import requested_impl
from psc_nas.ops.fast import tracing

Norm = Callable[[int], nn.Module]
Activation = Callable[[], nn.Module]
# What fills slot ``index`` given its ops and the backbone's own builder of them (``build(specs)``);
# a weight-sharing super-network passes one that returns a module switchable between choices.
SlotFill = Callable[[int, Sequence[Op], Callable[[Sequence[Op]], nn.Module]], nn.Module]


def default_fill(index: int, specs: Sequence[Op], build: Callable[[Sequence[Op]], nn.Module]) -> nn.Module:
    """The ordinary network: every slot is what the backbone builds from its choice's ops."""
    return build(specs)


# Room for any shipped family's arguments at any width (PmSCn's m <= 3 streams need a channel each).
MIN_CHANNELS = 3


def scaled(channels: int, width: float) -> int:
    """``channels`` at width multiplier ``width``, rounded, and never below ``MIN_CHANNELS``."""
    return max(MIN_CHANNELS, round(channels * width))


def fixed_conv(in_channels: int, out_channels: int, *, kernel: int | Triple = 1, stride: int | Triple = 1) -> Op:
    """A layer that is not searchable (stem, shortcut, transition): a plain bias-free conv."""
    return PlainConv(in_channels, out_channels, kernel, stride)  # type: ignore[arg-type]


class AvgPool2(nn.AvgPool3d):
    """``nn.AvgPool3d(2)`` (2x2x2 windows, stride 2, floor) that keeps a channels_last_3d CPU input in that layout.

    PyTorch's CPU ``avg_pool3d`` has no channels_last_3d kernel: it converts its input to NCDHW and returns NCDHW, so
    the conv after it and the backward into the conv before it convert again, a strided transpose each (a DenseNet3D
    transition at 152 channels, 32³, batch 4: 60 ms forward, 103 ms backward, plus the conversions around it). Here
    such an input is summed in pairs along D, H and W as views of (N, D, H, W, C) and scaled by 1/8: plain tensor ops
    (13 ms forward, 33 ms backward there; docs/benchmarks/ops.md), so autograd, tracing and export see ordinary ops.
    Equal to ``avg_pool3d`` up to float rounding (the sums run in another order); other inputs take ``avg_pool3d``.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_layout = x.dim() == 5 and x.device.type == "cpu" and x.is_contiguous(memory_format=CPU_LAYOUT)
        if not cpu_layout or min(x.shape[2:]) < 2:
            return super().forward(x)
        n, c, depth, height, width = x.shape
        d, h, w = depth // 2, height // 2, width // 2
        y = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), a view
        if (depth, height, width) != (2 * d, 2 * h, 2 * w):
            y = y[:, : 2 * d, : 2 * h, : 2 * w]  # floor, like avg_pool3d (sliced only here: its backward copies)
        y = y.reshape(n, d, 2, 2 * h, 2 * w, c).sum(2)
        y = y.reshape(n, d, h, 2, 2 * w, c).sum(3)
        y = y.reshape(n, d, h, w, 2 * c)  # the two columns of a pair side by side
        return ((y[..., :c] + y[..., c:]) * 0.125).permute(0, 4, 1, 2, 3)


def upsample_trilinear(x: torch.Tensor, size: Spatial) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=False)``; in a training step on a channels_last_3d CPU
    tensor, as three batched matrix products, one per axis, on views of (N, D, H, W, C).

    Trilinear interpolation is separable: along each axis every output is a fixed mix of two inputs, a small
    (out, in) matrix (``interpolation_matrix``). PyTorch's CPU backward of ``upsample_trilinear3d`` takes 8-27 ms per
    DenseNet3D side output at 32³ (it converts the gradient, a channel slice of the head's, out of channels_last);
    the products' backward is products again, 1.3-8 ms (docs/benchmarks/ops.md). A side already at ``size`` is
    returned as it is (interpolation to the same size is the identity). Without gradients (inference, and
    ``FlopCounterMode``, which would count the products as MACs the analytic cost leaves out, as it leaves out
    PyTorch's interpolation), under tracing or export, and on other devices, ``F.interpolate`` itself runs."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    training = torch.is_grad_enabled() and x.requires_grad
    if not training or x.device.type != "cpu" or not x.is_contiguous(memory_format=CPU_LAYOUT) or tracing():
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    n, c, depth, height, width = x.shape
    out_d, out_h, out_w = size
    y = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), a view
    y = _along(y.reshape(n * depth * height, width, c), interpolation_matrix(width, out_w, x.dtype))
    y = _along(y.reshape(n * depth, height, out_w * c), interpolation_matrix(height, out_h, x.dtype))
    y = _along(y.reshape(n, depth, out_h * out_w * c), interpolation_matrix(depth, out_d, x.dtype))
    return y.reshape(n, out_d, out_h, out_w, c).permute(0, 4, 1, 2, 3)


def _along(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix @ x[b]`` for every b of a (B, in, K) tensor: interpolation along its middle axis."""
    if matrix.shape[0] == matrix.shape[1]:
        return x  # the identity
    return torch.bmm(matrix.expand(x.shape[0], *matrix.shape), x)


@functools.lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation with ``align_corners=False``, PyTorch's rule: output ``o`` reads
    the source position max(0, (o + ½)·in/out − ½) between its two nearest inputs (the last input repeated at the
    edge). Each row sums to 1."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for out in range(size_out):
        source = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(source), size_in - 1)
        high = min(low + 1, size_in - 1)
        matrix[out, low] += 1.0 - (source - low)
        matrix[out, high] += source - low
    return matrix.to(dtype)


class NormActSequential(nn.Sequential):
    """``nn.Sequential`` whose ``BatchNorm3d`` ─ ``ReLU`` pairs run as one fused kernel where it applies
    (``ops.norm_act``: 1.3-2.2x faster than the two ops at DenseNet3D's 32³ shapes, docs/benchmarks/ops.md). The
    modules, their names and their state are the plain Sequential's; ``with implementation("reference")`` (or
    ``PSC_NAS_OP_IMPL=reference``) at build time keeps PyTorch's ops, as it does for the slots' convs."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        pairs = any(isinstance(a, nn.BatchNorm3d) and isinstance(b, nn.ReLU) for a, b in zip(modules, modules[1:]))
        # Build (once per machine) or load the kernel now, not inside the first timed forward.
        self.fuse = pairs and requested_impl() != "reference" and fused.KERNEL.available()

    def forward(self, x: fused.Features) -> torch.Tensor:
        """``x``: a tensor, or the pieces of its concatenation along the channels (a DenseNet block's features), which
        a leading fused BN ─ ReLU reads where they are; any other first module gets them concatenated."""
        if not self.fuse:
            return super().forward(fused.joined(x))
        modules = list(self)
        index = 0
        while index < len(modules):
            module = modules[index]
            if index + 1 < len(modules) and fused.fusable(module, modules[index + 1], x):
                x = fused.batch_norm_relu(x, module)  # type: ignore[arg-type]
                index += 2
            else:
                x = module(fused.joined(x))  # a tensor as it is; pieces concatenated
                index += 1
        return x


def norm_cost(channels: int) -> Cost:
    return Cost(params=2 * channels)


def run_cost(specs: Sequence[Op], spatial: Spatial) -> tuple[Cost, Spatial]:
    """Cost of :func:`conv_norm_act` over ``specs``: each op followed by a norm."""
    total = Cost()
    for spec in specs:
        layer, spatial = spec.cost_and_shape(spatial)
        total += layer + norm_cost(spec.out_channels)
    return total, spatial


def conv_norm_act(
    specs: Sequence[Op],
    *,
    norm: Norm,
    activation: Activation,
    last_activation: bool = True,
    build_op: Callable[[int, Op], nn.Module] | None = None,
) -> nn.Sequential:
    """op ─ norm ─ act ─ op ─ norm [─ act]: a slot's ops with the backbone's own norm/act between.

    ``build_op(position, spec)`` builds the op at ``position`` (default ``spec.build()``)."""
    layers: list[nn.Module] = []
    for index, spec in enumerate(specs):
        layers += [build_op(index, spec) if build_op else spec.build(), norm(spec.out_channels)]
        if last_activation or index < len(specs) - 1:
            layers.append(activation())
    return NormActSequential(*layers)


class Blueprint(Protocol):
    def cost(self, spatial: Spatial) -> Cost: ...

    def build(self, *, norm: Norm, activation: Activation, fill: SlotFill = default_fill) -> nn.Module: ...


class BlueprintBackbone(Backbone):
    """A backbone whose ``build`` and ``cost`` both come from one blueprint of the network.

    Integer and float hparams must be positive numbers of their default's type; subclasses add
    their own rules in ``check``.
    """

    def blueprint(self, config: ArchConfig) -> Blueprint:
        raise NotImplementedError

    def check(self, hparams: Mapping[str, Any]) -> None:
        """Backbone-specific hparam rules; raise ``ConfigError`` with the ``hparams.<key>`` path."""

    def hparams(self, given: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().hparams(given)
        for key, default in self.defaults.items():
            value = merged[key]
            if isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
                if not ok:
                    raise ConfigError(f"hparams.{key}", f"must be a positive finite number, got {value!r}")
            elif isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"hparams.{key}", f"must be a positive int, got {value!r}")
        self.check(merged)
        return merged

    def slot_specs(self, config: ArchConfig) -> tuple[dict[str, Any], list[list[OpSpec]]]:
        """The validated hparams and, per slot, the op specs its choice realizes."""
        self.validate(config)
        hparams = self.hparams(config.hparams)
        return hparams, [realize(slot, block) for slot, block in zip(self.slots(hparams), config.blocks)]

    def build(self, config: ArchConfig, *, fill: SlotFill | None = None) -> nn.Module:
        return self.blueprint(config).build(norm=nn.BatchNorm3d, activation=nn.ReLU, fill=fill or default_fill)

    def cost(self, config: ArchConfig, spatial: Spatial) -> Cost:
        return self.blueprint(config).cost(tuple(spatial))  # type: ignore[arg-type]
