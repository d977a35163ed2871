"""Faster CPU forward paths for any ``OpSpec``, on exactly the reference module's parameters.

``FastStreamedConv`` subclasses ``StreamedConv`` and only overrides ``forward``, so its
``state_dict`` (names, shapes) is the reference's: checkpoints and exports are interchangeable
whichever implementation ran. Implementations, by name:

- ``channels_last``: every conv runs on a channels_last_3d tensor (oneDNN's fast layout here).
- ``folded``: channels_last, and every conv whose kernel and stride are 1 along D runs as a 2D
  conv over ``(N·D, C, H, W)``, which in channels_last_3d is a free view. oneDNN's 2D kernels
  beat its 3D ones for these shapes (1×3×3, 1×1×3, 1×3×1, 1×1×1).
- ``masked`` (CAKES only): all sub-kernels zero-padded to 3×3×3 and run as one conv.
- ``planes`` (CAKES only): sub-kernels merged into their plane (1×1×3 into 1×3×3, 1×3×1 into
  3×3×1, 3×1×1 into 3×1×3), four convs instead of seven.

The two CAKES merges execute more multiply-accumulates than ``spec.cost()`` (27/9 and 81/63 of it
for a uniform allocation), so ``FlopCounterMode`` sees more than the analytic cost; the automatic
choice (``choice.py``) never picks them.

Fast implementations return channels_last_3d tensors: converting back would cost a copy per op,
and every torch op downstream accepts either layout with identical values. The paths were
measured on CPU only; on other devices the reference forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psc_nas.ops.base import OpSpec, StreamedConv

CHANNELS_LAST = torch.channels_last_3d


@dataclass(frozen=True)
class Plan:
    """How a ``FastStreamedConv`` computes: all implementations here run in channels_last_3d."""

    fold: bool = False
    shape_groups: tuple[tuple[str, ...], ...] = ()  # CAKES shapes merged into one masked conv each


PLANS: dict[str, Plan] = {
    "channels_last": Plan(),
    "folded": Plan(fold=True),
    "masked": Plan(fold=True, shape_groups=(("1x1x3", "1x3x1", "3x1x1", "1x3x3", "3x1x3", "3x3x1", "3x3x3"),)),
    "planes": Plan(
        fold=True,
        shape_groups=(("1x1x3", "1x3x3"), ("1x3x1", "3x3x1"), ("3x1x1", "3x1x3"), ("3x3x3",)),
    ),
}
EXACT_IMPLS = ("reference", "channels_last", "folded")  # execute exactly spec.cost() MACs
CAKES_ONLY_IMPLS = ("masked", "planes")


class FastStreamedConv(StreamedConv):
    """``StreamedConv`` with its forward computed by a named implementation (see module doc)."""

    def __init__(self, spec: OpSpec, impl: str) -> None:
        if impl not in PLANS:
            raise ValueError(f"impl must be one of {sorted(PLANS)} here, got {impl!r}")
        if impl in CAKES_ONLY_IMPLS and spec.family != "cakes":
            raise ValueError(f"impl {impl!r} only applies to cakes, not {spec.family}")
        super().__init__(spec)
        self.impl = impl
        self.plan = PLANS[impl]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=CHANNELS_LAST)
        if self.plan.shape_groups:
            return self._merged_shapes(x)
        outputs = [self._stream(stream, x) for stream in self.streams]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _stream(self, stream: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for layer in stream:
            if isinstance(layer, nn.Conv3d):
                x = conv(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.groups, self.plan.fold)
            else:
                x = layer(x)
        return x

    def _merged_shapes(self, x: torch.Tensor) -> torch.Tensor:
        """CAKES: one conv per group of shapes on zero-padded weights, outputs back in spec order."""
        layers = {shape: stream[0] for shape, stream in zip(self.spec.allocation, self.streams)}
        pieces: dict[str, torch.Tensor] = {}
        for group in self.plan.shape_groups:
            present = [shape for shape in group if shape in layers]
            if not present:
                continue
            kernel = bounding_kernel([layers[shape].kernel_size for shape in present])
            weight = torch.cat([pad_kernel(layers[shape].weight, kernel) for shape in present])
            bias = None if layers[present[0]].bias is None else torch.cat([layers[s].bias for s in present])
            padding = tuple(k // 2 for k in kernel)
            merged = conv(x, weight, bias, self.spec.stride, padding, 1, self.plan.fold)
            for shape, chunk in zip(present, merged.split([layers[s].out_channels for s in present], dim=1)):
                pieces[shape] = chunk
        outputs = [pieces[shape] for shape in self.spec.allocation]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    groups: int,
    fold: bool,
) -> torch.Tensor:
    """3D conv of a channels_last_3d ``x``; with ``fold``, a D-flat kernel runs as a 2D conv."""
    if fold and folds(weight.shape[2], stride[0]):
        n, _, depth, height, width = x.shape
        planes = x.transpose(1, 2).reshape(n * depth, -1, height, width)  # a view in channels_last_3d
        y = F.conv2d(planes, weight.squeeze(2), bias, tuple(stride[1:]), tuple(padding[1:]), 1, groups)
        return y.reshape(n, depth, *y.shape[1:]).transpose(1, 2)
    return F.conv3d(x, weight, bias, tuple(stride), tuple(padding), 1, groups)


def folds(kernel_depth: int, stride_depth: int) -> bool:
    """Whether the ``folded`` implementation runs a conv of this depth kernel and stride as 2D."""
    return kernel_depth == 1 and stride_depth == 1


def has_folding_conv(spec: OpSpec) -> bool:
    return any(folds(c.kernel[0], c.stride[0]) for stream in spec.streams() for c in stream)


def bounding_kernel(kernels: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    return tuple(max(k[axis] for k in kernels) for axis in range(3))  # type: ignore[return-value]


def pad_kernel(weight: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Zero-pad a (centred, odd) conv weight to ``kernel``: same outputs under 'same' padding."""
    widths: list[int] = []
    for axis in (2, 1, 0):  # F.pad lists the last dimension first
        extra = (kernel[axis] - weight.shape[2 + axis]) // 2
        widths += [extra, extra]
    return F.pad(weight, widths)
