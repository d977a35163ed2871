"""One 3D convolution layer described by value: the atom every operator family is built from.

Cost and module are derived from the same ``ConvSpec``, so the analytic price of an operator
cannot drift from what it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from torch import nn

from psc_nas.arch import Triple
from psc_nas.costs import Cost, Spatial


def triple(value: int | tuple[int, ...], name: str) -> Triple:
    """Normalize an int or a 3-tuple of positive ints, raising ``ValueError`` naming ``name``."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or three positive ints (D, H, W), got {value!r}")
    return values  # type: ignore[return-value]


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a 'same'-padded (padding = kernel // 2) convolution."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


# oneDNN's CPU conv kernels compute a conv's output channels (per group) in blocks of this many: a conv of 18 output
# channels takes as long as one of 32 (docs/benchmarks/ops.md); its depthwise kernels vectorise over all channels.
ONEDNN_BLOCK = 16


@dataclass(frozen=True)
class ConvSpec:
    in_channels: int
    out_channels: int
    kernel: Triple
    stride: Triple = (1, 1, 1)
    groups: int = 1
    bias: bool = False

    @property
    def padding(self) -> Triple:
        return tuple(k // 2 for k in self.kernel)  # type: ignore[return-value]

    def out_spatial(self, spatial: Spatial) -> Spatial:
        sizes = (conv_out_size(i, k, s) for i, k, s in zip(spatial, self.kernel, self.stride))
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def params(self) -> int:
        weights = self.out_channels * (self.in_channels // self.groups) * prod(self.kernel)
        return weights + (self.out_channels if self.bias else 0)

    def cost(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        out = self.out_spatial(spatial)
        macs = self.out_channels * (self.in_channels // self.groups) * prod(self.kernel) * prod(out)
        return Cost(self.params, macs), out

    @property
    def blocked_share(self) -> float:
        """MACs oneDNN executes for this conv over its analytic MACs: output channels rounded up to whole blocks of
        ``ONEDNN_BLOCK``, per group (for a depthwise conv, over all channels)."""
        depthwise = self.groups == self.in_channels == self.out_channels
        channels = self.out_channels if depthwise else self.out_channels // self.groups
        return blocks(channels) / channels

    def build(self) -> nn.Conv3d:
        return nn.Conv3d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=self.bias,
        )


def blocks(channels: int) -> int:
    """``channels`` rounded up to whole blocks of ``ONEDNN_BLOCK``."""
    return -(-channels // ONEDNN_BLOCK) * ONEDNN_BLOCK
