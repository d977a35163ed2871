"""ResNet3D-18/34/50 for video classification, laid out as in the CSN paper's table (Tran et al.).

    x ─ conv 3x7x7, stride 1x2x2 (in→64) ─ BN ─ ReLU ─ maxpool 1x3x3, stride 1x2x2
      ─ conv2_x (64, stride 1) ─ conv3_x (128, stride 2) ─ conv4_x (256, stride 2) ─ conv5_x (512, stride 2)
      ─ global average pool ─ fc (+bias) ─► logits

    basic block (18, 34):       x ─ slot[conv 3x3x3 (stride) ─ BN ─ ReLU ─ conv 3x3x3] ─ BN ─ (+) ─ ReLU
    bottleneck block (50):      x ─ conv 1x1x1 ─ BN ─ ReLU ─ slot[conv 3x3x3 (stride)] ─ BN ─ ReLU
                                  ─ conv 1x1x1 (×4 channels) ─ BN ─ (+) ─ ReLU
    shortcut:                   identity, or conv 1x1x1 (stride) ─ BN where the shape changes

A basic block's pair of 3x3x3 convs is one slot with two convs (stride on the first), so PmSCn
with n > 1 replaces the pair jointly; a bottleneck's 3x3x3 conv is a single-conv slot. Stem,
1x1x1 convs and shortcut projections are fixed. Strides halve every axis from conv3_x on, which
any input size supports (every layer's output side is ceil(input side / stride)).

ResNet3D-34, all 3x3x3, 101 classes (the PSC paper's "64M") has 63,527,717 parameters:
63,258,624 in the 32 3x3x3 convs of the 16 basic blocks (27·C_in·C_out each), 28,224 in the stem
(3·64·3·7·7), 173,824 in the three shortcut projections (1x1x1 weights 172,032 + BN 1,792),
15,232 in the other BNs (weight and bias per channel) and 51,813 in the fc (512·101 + 101).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psc_nas.arch import ArchConfig, ConfigError, Slot
from psc_nas.costs import Cost, Spatial
from psc_nas.nets._layers import (
    Activation,
    BlueprintBackbone,
    Norm,
    NormActSequential,
    SlotFill,
    conv_norm_act,
    default_fill,
    fixed_conv,
    run_cost,
    scaled,
)
from psc_nas.nets.registry import register_backbone
from psc_nas.ops import Op
from psc_nas.ops._conv import conv_out_size

# depth -> (block kind, blocks per stage b1..b4)
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
BOTTLENECK_EXPANSION = 4
STEM_KERNEL, STEM_STRIDE = (3, 7, 7), (1, 2, 2)
POOL_KERNEL, POOL_STRIDE = (1, 3, 3), (1, 2, 2)


def pooled(spatial: Spatial) -> Spatial:
    """Output size of the stem's max pool, padded by kernel // 2 like a 'same' conv."""
    depth, height, width = (conv_out_size(s, k, st) for s, k, st in zip(spatial, POOL_KERNEL, POOL_STRIDE))
    return depth, height, width


class ResBlock(nn.Module):
    def __init__(self, *, body: nn.Module, shortcut: nn.Module | None, activation: Activation) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.activation(self.body(x) + identity)


@dataclass(frozen=True)
class ResBlockBlueprint:
    body: tuple[Op, ...]  # norm + activation between, norm after the last
    shortcut: Op | None
    slot: int = 0  # the searchable slot's index
    bottleneck: bool = False  # body = fixed 1x1x1, the slot's op, fixed 1x1x1 (else: the slot's ops)

    def cost(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        total, out = run_cost(self.body, spatial)
        if self.shortcut is not None:
            total += run_cost([self.shortcut], spatial)[0]
        return total, out

    def build(self, *, norm: Norm, activation: Activation, fill: SlotFill = default_fill) -> ResBlock:
        if self.bottleneck:  # the slot is the middle op; the fixed 1x1x1 convs around it are not searched

            def middle(position: int, spec: Op) -> nn.Module:
                return fill(self.slot, [spec], lambda specs: specs[0].build()) if position == 1 else spec.build()

            body = conv_norm_act(self.body, norm=norm, activation=activation, last_activation=False, build_op=middle)
        else:
            body = fill(
                self.slot,
                self.body,
                lambda specs: conv_norm_act(specs, norm=norm, activation=activation, last_activation=False),
            )
        shortcut = (
            None
            if self.shortcut is None
            else conv_norm_act([self.shortcut], norm=norm, activation=activation, last_activation=False)
        )
        return ResBlock(body=body, shortcut=shortcut, activation=activation)


@dataclass(frozen=True)
class ResNetBlueprint:
    stem: Op
    blocks: tuple[ResBlockBlueprint, ...]
    num_classes: int

    @property
    def features(self) -> int:
        return self.blocks[-1].body[-1].out_channels

    def cost(self, spatial: Spatial) -> Cost:
        total, shape = run_cost([self.stem], spatial)
        shape = pooled(shape)
        for block in self.blocks:
            layer, shape = block.cost(shape)
            total += layer
        fc = self.features * self.num_classes
        return total + Cost(params=fc + self.num_classes, macs=fc)

    def build(self, *, norm: Norm, activation: Activation, fill: SlotFill = default_fill) -> nn.Module:
        pool = nn.MaxPool3d(POOL_KERNEL, POOL_STRIDE, padding=tuple(k // 2 for k in POOL_KERNEL))
        return nn.Sequential(
            # the stem's modules and the pool in one NormActSequential, so its BN ─ ReLU runs fused; the keys are a
            # plain Sequential's (stem.0, .1, .2, .3)
            NormActSequential(*conv_norm_act([self.stem], norm=norm, activation=activation), pool),
            nn.Sequential(*(block.build(norm=norm, activation=activation, fill=fill) for block in self.blocks)),
            nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(self.features, self.num_classes)),
        )


class ResNet3dBackbone(BlueprintBackbone):
    """Slots ``conv{2..5}.block{i}``: a basic block's conv pair (convs=2) or a bottleneck's 3x3x3."""

    name = "resnet3d"
    defaults = {"in_channels": 3, "num_classes": 101, "depth": 34, "base_channels": 64, "width": 1.0}

    def check(self, hparams: Mapping[str, Any]) -> None:
        if hparams["depth"] not in LAYOUTS:
            raise ConfigError("hparams.depth", f"must be one of {sorted(LAYOUTS)}, got {hparams['depth']!r}")

    def slots(self, hparams: Mapping[str, Any]) -> list[Slot]:
        hparams = self.hparams(hparams)
        kind, counts = LAYOUTS[hparams["depth"]]
        expansion = BOTTLENECK_EXPANSION if kind == "bottleneck" else 1
        channels = scaled(hparams["base_channels"], hparams["width"])
        slots, in_channels = [], channels
        for stage, count in enumerate(counts):
            width = channels * 2**stage
            for index in range(count):
                stride = 2 if stage and not index else 1
                name = f"conv{stage + 2}.block{index}"
                if kind == "basic":
                    slots.append(Slot(name, in_channels, width, (stride,) * 3, convs=2))
                else:
                    slots.append(Slot(name, width, width, (stride,) * 3))
                in_channels = width * expansion
        return slots

    def blueprint(self, config: ArchConfig) -> ResNetBlueprint:
        hparams, specs = self.slot_specs(config)
        bottleneck = LAYOUTS[hparams["depth"]][0] == "bottleneck"
        stem_channels = scaled(hparams["base_channels"], hparams["width"])
        blocks, in_channels = [], stem_channels
        for index, slot_specs in enumerate(specs):
            first, last = slot_specs[0], slot_specs[-1]
            if bottleneck:
                out = last.out_channels * BOTTLENECK_EXPANSION
                body = (fixed_conv(in_channels, first.in_channels), *slot_specs, fixed_conv(last.out_channels, out))
            else:
                out, body = last.out_channels, tuple(slot_specs)
            reshaped = in_channels != out or first.stride != (1, 1, 1)
            shortcut = fixed_conv(in_channels, out, stride=first.stride) if reshaped else None
            blocks.append(ResBlockBlueprint(body, shortcut, index, bottleneck))
            in_channels = out
        stem = fixed_conv(hparams["in_channels"], stem_channels, kernel=STEM_KERNEL, stride=STEM_STRIDE)
        return ResNetBlueprint(stem, tuple(blocks), hparams["num_classes"])


register_backbone(ResNet3dBackbone())
