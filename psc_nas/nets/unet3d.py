"""3D U-Net (Çiçek et al. 2016) as Funke et al. use it to predict x/y/z affinities in EM volumes.

Every level is a VGG double conv (conv 3x3x3 ─ BN ─ ReLU, twice); each double conv is ONE slot with
two convs, so PmSCn with n > 1 replaces the pair jointly (the PSC paper's P2SC2 for UNet):

    x ─ enc0 (in→c0) ─────────────────────────────────────── concat ─ dec0 (2c0→c0) ─ conv 1x1x1 (+bias) ─► out
          └ maxpool f0 ─ enc1 (c0→c1) ───────────── concat ─ dec1 (2c1→c1) ─ upconv f0 (c1→c0) ┘
                             └ maxpool f1 ─ ... ─ enc_L (c_{L-1}→c_L) ─ upconv f_{L-1} ┘

    enc_l / dec_l (one slot):  conv 3x3x3 ─ BN ─ ReLU ─ conv 3x3x3 ─ BN ─ ReLU
    upconv f: transposed conv, kernel = stride = f, no bias (the next slot normalizes)

``c_l = base_channels · channel_factor**l`` (times ``width``). ``downsample`` lists the pooling
factor per level in (D, H, W) order, e.g. ``[[1, 2, 2], [1, 2, 2], [2, 2, 2]]`` for anisotropic
data; every input side must be divisible by the product of its factors, so skips and upsampled
maps align. The head returns logits: apply a sigmoid for affinities (``num_classes`` = 3, x/y/z).

Defaults (32 channels, factor 2, four 2x2x2 poolings) give the all-conv3d network 22,577,859
parameters, the scale of the PSC paper's 21M baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import nn

from psc_nas.arch import ArchConfig, ConfigError, Slot, Triple
from psc_nas.costs import Cost, Spatial
from psc_nas.device import CPU_LAYOUT
from psc_nas.nets._layers import (
    Activation,
    BlueprintBackbone,
    Norm,
    SlotFill,
    conv_norm_act,
    default_fill,
    run_cost,
    scaled,
)
from psc_nas.nets.registry import register_backbone
from psc_nas.ops import Op
from psc_nas.ops._conv import ConvSpec, triple
from psc_nas.ops.fast import tracing


@dataclass(frozen=True)
class UpConvSpec:
    """Transposed conv with kernel = stride = ``factor``: each voxel becomes a ``factor`` block.

    MACs as ``FlopCounterMode`` counts a transposed conv: weights × *input* voxels.
    """

    in_channels: int
    out_channels: int
    factor: Triple

    def cost(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        params = self.in_channels * self.out_channels * prod(self.factor)
        out = tuple(s * f for s, f in zip(spatial, self.factor))
        return Cost(params, params * prod(spatial)), out  # type: ignore[return-value]

    def build(self) -> nn.ConvTranspose3d:
        return UpConv(self.in_channels, self.out_channels, self.factor, stride=self.factor, bias=False)


class UpConv(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with kernel = stride (its windows neither overlap nor leave gaps), whose forward on a
    channels_last_3d float32 CPU input is one matrix product and one copy, outside tracing and export.

    Each input voxel's C_in values times the (C_in, f_a·f_b·f_c·C_out) weight give its output block of f_a × f_b × f_c
    voxels; the copy interleaves the blocks into the (N, D·f_a, H·f_b, W·f_c, C_out) output, channels_last_3d, and
    autograd's backward is the same two steps reversed. PyTorch ran these convs as oneDNN's deconvolution in a
    training step, and for one sample (the latency objective's forward) by its own kernel, which also copied the
    channels_last weight and returned NCDHW for the decoder to convert (docs/benchmarks/ops.md, fourteenth session).
    The same parameters and keys as ``nn.ConvTranspose3d``; values equal up to float rounding; ``FlopCounterMode``
    counts the product's MACs, the transposed conv's (weights × input voxels)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not self.as_product(x):
            return super().forward(x, output_size)
        n, cin, depth, height, width = x.shape
        fa, fb, fc = self.stride
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, cin)  # a view in channels_last_3d
        blocks = rows @ self.weight.permute(0, 2, 3, 4, 1).reshape(cin, -1)  # (N·D·H·W, f_a·f_b·f_c·C_out)
        y = blocks.view(n, depth, height, width, fa, fb, fc, self.out_channels).permute(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(n, depth * fa, height * fb, width * fc, self.out_channels)
        return y.permute(0, 4, 1, 2, 3)

    def as_product(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` computes ``x``'s output as the product (the class docstring's conditions)."""
        return (
            tuple(self.kernel_size) == tuple(self.stride)
            and self.bias is None
            and self.groups == 1
            and tuple(self.padding) == tuple(self.output_padding) == (0, 0, 0)
            and tuple(self.dilation) == (1, 1, 1)
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.dim() == 5
            and x.is_contiguous(memory_format=CPU_LAYOUT)
            and not tracing()
        )


def check_size(spatial: tuple[int, ...], factors: tuple[Triple, ...]) -> Spatial:
    total = tuple(prod(f[axis] for f in factors) for axis in range(3))
    if len(spatial) != 3 or any(s % t for s, t in zip(spatial, total)):
        raise ValueError(
            f"unet3d: every input side must be divisible by its total pooling factor {total} (D, H, W), got {spatial}"
        )
    return spatial  # type: ignore[return-value]


class UNet3d(nn.Module):
    def __init__(
        self,
        *,
        encoders: list[nn.Module],
        upconvs: list[nn.Module],
        decoders: list[nn.Module],
        head: nn.Module,
        factors: tuple[Triple, ...],
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.pools = nn.ModuleList(nn.MaxPool3d(f) for f in factors)
        self.upconvs = nn.ModuleList(upconvs)  # deepest first, like decoders
        self.decoders = nn.ModuleList(decoders)
        self.head = head
        self.factors = factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(tuple(x.shape[2:]), self.factors)
        skips = [self.encoders[0](x)]
        for pool, encoder in zip(self.pools, self.encoders[1:]):
            skips.append(encoder(pool(skips[-1])))
        h = skips.pop()
        for upconv, decoder in zip(self.upconvs, self.decoders):
            h = decoder(torch.cat([skips.pop(), upconv(h)], dim=1))
        return self.head(h)


@dataclass(frozen=True)
class UNetBlueprint:
    encoders: tuple[tuple[Op, ...], ...]
    upconvs: tuple[UpConvSpec, ...]  # deepest first
    decoders: tuple[tuple[Op, ...], ...]  # deepest first
    head: ConvSpec

    @property
    def factors(self) -> tuple[Triple, ...]:
        return tuple(up.factor for up in reversed(self.upconvs))

    def cost(self, spatial: Spatial) -> Cost:
        total, shape = run_cost(self.encoders[0], check_size(spatial, self.factors))
        for factor, encoder in zip(self.factors, self.encoders[1:]):
            layer, shape = run_cost(encoder, tuple(s // f for s, f in zip(shape, factor)))  # type: ignore[arg-type]
            total += layer
        for upconv, decoder in zip(self.upconvs, self.decoders):
            up, shape = upconv.cost(shape)
            layer, shape = run_cost(decoder, shape)
            total += up + layer
        return total + self.head.cost(shape)[0]

    def build(self, *, norm: Norm, activation: Activation, fill: SlotFill = default_fill) -> nn.Module:
        def double(index: int, specs: tuple[Op, ...]) -> nn.Module:
            return fill(index, specs, lambda ops: conv_norm_act(ops, norm=norm, activation=activation))

        levels = len(self.encoders)
        return UNet3d(
            encoders=[double(index, specs) for index, specs in enumerate(self.encoders)],
            upconvs=[up.build() for up in self.upconvs],
            decoders=[double(levels + index, specs) for index, specs in enumerate(self.decoders)],
            head=self.head.build(),
            factors=self.factors,
        )


class UNet3dBackbone(BlueprintBackbone):
    """Slots ``encoder{l}`` (l = 0..L, data-flow order) then ``decoder{l}`` (l = L-1..0), convs=2 each."""

    name = "unet3d"
    defaults = {
        "in_channels": 1,
        "num_classes": 3,
        "base_channels": 32,
        "channel_factor": 2,
        "downsample": ((2, 2, 2),) * 4,
        "width": 1.0,
    }

    def check(self, hparams: Mapping[str, Any]) -> None:
        self.factors(hparams)

    def factors(self, hparams: Mapping[str, Any]) -> tuple[Triple, ...]:
        downsample = hparams["downsample"]
        try:
            if isinstance(downsample, (str, int)) or not downsample:
                raise ValueError("must be a non-empty list with one pooling factor per level")
            return tuple(triple(f if isinstance(f, int) else tuple(f), "a pooling factor") for f in downsample)
        except (TypeError, ValueError) as err:
            raise ConfigError("hparams.downsample", f"{err}, e.g. [[1, 2, 2], [2, 2, 2]]; got {downsample!r}") from None

    def channels(self, hparams: Mapping[str, Any]) -> list[int]:
        levels = len(self.factors(hparams)) + 1
        base, factor, width = hparams["base_channels"], hparams["channel_factor"], hparams["width"]
        return [scaled(base * factor**level, width) for level in range(levels)]

    def slots(self, hparams: Mapping[str, Any]) -> list[Slot]:
        hparams = self.hparams(hparams)
        channels = self.channels(hparams)
        inputs = [hparams["in_channels"], *channels[:-1]]
        encoders = [
            Slot(f"encoder{level}", cin, cout, convs=2) for level, (cin, cout) in enumerate(zip(inputs, channels))
        ]
        decoders = [
            Slot(f"decoder{level}", 2 * channels[level], channels[level], convs=2)
            for level in reversed(range(len(channels) - 1))
        ]
        return encoders + decoders

    def blueprint(self, config: ArchConfig) -> UNetBlueprint:
        hparams, specs = self.slot_specs(config)
        factors, channels = self.factors(hparams), self.channels(hparams)
        levels = len(channels)
        deepest_first = list(reversed(range(levels - 1)))
        return UNetBlueprint(
            encoders=tuple(tuple(s) for s in specs[:levels]),
            upconvs=tuple(UpConvSpec(channels[level + 1], channels[level], factors[level]) for level in deepest_first),
            decoders=tuple(tuple(s) for s in specs[levels:]),
            head=ConvSpec(channels[0], hparams["num_classes"], (1, 1, 1), bias=True),
        )


register_backbone(UNet3dBackbone())
