"""DenseNet3D for brain MRI segmentation, as the PSC paper reproduces Bui et al. (2017).

Five dense blocks of four pre-activation layers (BN ─ ReLU ─ conv 3x3x3, growth ``g`` channels,
each layer a searchable slot), with the paper's reproduction choices: basic layers (no 1x1x1
bottleneck) and no compression in the transitions. Every block's output is brought to full
resolution and the scales are fused by a 1x1x1 classifier:

    x ─ stem conv 3x3x3 (in→c0) ─► block 1 ─┬─ transition ─► block 2 ─┬─ ... ─► block 5 ─┐
                                            │                          │                   │
       block:  h ─┬─ BN─ReLU─slot(C→g) ─ concat ─┬─ ... (4 layers, C += g each)             │
                  └──────────────────────────────┘                                         │
       transition:  BN ─ ReLU ─ conv 1x1x1 (C→C) ─ avgpool 2x2x2   (run as pool, then conv) │
       side (per block):  BN ─ ReLU ─ conv 1x1x1 (C_b→s) ─ trilinear upsample to input size ┘
    concat(sides: blocks·s) ─ BN ─ ReLU ─ conv 1x1x1 + bias (→ num_classes) ─► logits

The upsampling is trilinear interpolation (the paper's "simple upsampling layers"), not a
transposed conv: it adds no parameters, cannot checkerboard, and runs after the side conv so that
conv stays at the coarse resolution. Interpolating to the input's exact size lets any patch with
every side >= 2**(blocks-1) through, divisible by the pooling factors or not.

A transition's 1x1x1 conv and its average pooling are both linear, so they commute: pooling first computes the same
function (up to float rounding) on an eighth of the voxels, and that is what runs and what the cost prices. At 32³ the
transitions' convs were 1.13 GMACs of the csn_ip preset's 1.86, and the first one's training pass a quarter of that
preset's step time (docs/benchmarks/ops.md). The parameters and their names are the paper order's.

Defaults (c0=40, g=28, s=24, width 1) give the all-conv3d network 5,164,524 parameters, the
paper's "5.2M" (its exact layer widths are not published); 91.5 GMACs on a 64³ patch (99.4 with the transitions'
convs at full resolution).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from psc_nas.arch import ArchConfig, Slot
from psc_nas.costs import Cost, Spatial
from psc_nas.nets._layers import (
    Activation,
    AvgPool2,
    BlueprintBackbone,
    Norm,
    NormActSequential,
    SlotFill,
    default_fill,
    fixed_conv,
    norm_cost,
    scaled,
    upsample_trilinear,
)
from psc_nas.nets.registry import register_backbone
from psc_nas.ops import Op
from psc_nas.ops import norm_act as fused
from psc_nas.ops._conv import ConvSpec


def preact(
    spec: Op | ConvSpec, *, norm: Norm, activation: Activation, op: nn.Module | None = None
) -> NormActSequential:
    """BN ─ ReLU ─ conv, the DenseNet layer order (``op``: the conv's module, default ``spec.build()``); BN ─ ReLU
    as one fused kernel where it applies."""
    return NormActSequential(norm(spec.in_channels), activation(), op if op is not None else spec.build())


def preact_cost(spec: Op, spatial: Spatial) -> tuple[Cost, Spatial]:
    layer, out = spec.cost_and_shape(spatial)
    return norm_cost(spec.in_channels) + layer, out


class DenseBlock(nn.Module):
    """Each layer reads the concatenation of the block's input and every earlier layer's output; so does what follows
    the block. Where the layers' BN ─ ReLU runs as the fused kernel, that concatenation is never built: the block
    returns its features as pieces, which the kernel reads where they are (``ops.norm_act``: the same values to the
    bit), and each piece's gradient is the sum of its readers'. Concatenated, a layer's input was copied again by
    every later layer: csn_ip's training step at 32³, batch 4, spent 53 ms of about 500 in ``torch.cat`` (the head's
    join of the side outputs, now read as pieces too, included), and its peak memory fell from 1.69 to 1.11 GB
    without the copies (docs/benchmarks/ops.md)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: fused.Features) -> fused.Features:
        features = fused.pieces(x)
        first = self.layers[0] if len(self.layers) else None
        if not (isinstance(first, NormActSequential) and first.fuse and fused.fusable(first[0], first[1], features)):
            h = fused.joined(features)  # PyTorch's ops (or a hooked, traced or reference network): concatenate
            for layer in self.layers:
                h = torch.cat([h, layer(h)], dim=1)
            return h
        for layer in self.layers:
            features.append(layer(features))
        return features


class Transition(NormActSequential):
    """BN ─ ReLU ─ conv 1x1x1 ─ avgpool 2x2x2, computed with the pooling before the conv (they commute; the conv then
    runs on an eighth of the voxels), and where the kernel applies the BN ─ ReLU and the pooling as one pass
    (``ops.norm_act.norm_act_pool``). The modules keep the paper order's indices, so state_dicts keep their keys."""

    def forward(self, x: fused.Features) -> torch.Tensor:
        norm, activation, conv, pool = self
        if not self.fuse:
            return conv(pool(activation(norm(fused.joined(x)))))
        return conv(fused.norm_act_pool(norm, activation, pool, x))


class DenseNet3d(nn.Module):
    def __init__(
        self,
        *,
        stem: nn.Module,
        blocks: list[nn.Module],
        transitions: list[nn.Module],
        sides: list[nn.Module],
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.sides = nn.ModuleList(sides)
        self.head = head
        self.min_size = 2 ** len(transitions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = check_size(tuple(x.shape[2:]), self.min_size)
        h = self.blocks[0](self.stem(x))
        sides = [self.sides[0](h)]
        for transition, block, side in zip(self.transitions, self.blocks[1:], self.sides[1:]):
            h = block(transition(h))
            sides.append(side(h))
        upsampled = [upsample_trilinear(s, size) for s in sides]
        return self.head(upsampled)  # pieces: the head's BN ─ ReLU reads them where they are (or concatenates them)


def check_size(spatial: tuple[int, ...], min_size: int) -> Spatial:
    if len(spatial) != 3 or min(spatial) < min_size:
        raise ValueError(
            f"densenet3d: every side of the input must be at least {min_size} (one per pooling), got {spatial}"
        )
    return spatial  # type: ignore[return-value]


@dataclass(frozen=True)
class DenseNetBlueprint:
    stem: Op
    blocks: tuple[tuple[Op, ...], ...]
    transitions: tuple[Op, ...]
    sides: tuple[Op, ...]
    head: ConvSpec

    def cost(self, spatial: Spatial) -> Cost:
        total, shape = self.stem.cost_and_shape(check_size(spatial, 2 ** len(self.transitions)))
        for index, (layers, side) in enumerate(zip(self.blocks, self.sides)):
            if index:
                shape = tuple(s // 2 for s in shape)  # type: ignore[assignment]
                total += preact_cost(self.transitions[index - 1], shape)[0]  # pooled before its conv (Transition)
            for spec in layers:
                total += preact_cost(spec, shape)[0]
            total += preact_cost(side, shape)[0]
        return total + norm_cost(self.head.in_channels) + self.head.cost(spatial)[0]

    def build(self, *, norm: Norm, activation: Activation, fill: SlotFill = default_fill) -> nn.Module:
        def layer(spec: Op | ConvSpec) -> nn.Sequential:
            return preact(spec, norm=norm, activation=activation)

        def slot(index: int, spec: Op) -> nn.Sequential:
            return preact(
                spec, norm=norm, activation=activation, op=fill(index, [spec], lambda specs: specs[0].build())
            )

        starts = [sum(len(specs) for specs in self.blocks[:b]) for b in range(len(self.blocks))]
        return DenseNet3d(
            stem=self.stem.build(),
            blocks=[
                DenseBlock([slot(start + j, spec) for j, spec in enumerate(specs)])
                for start, specs in zip(starts, self.blocks)
            ],
            transitions=[Transition(*layer(spec), AvgPool2()) for spec in self.transitions],
            sides=[layer(spec) for spec in self.sides],
            head=layer(self.head),
        )


class DenseNet3dBackbone(BlueprintBackbone):
    """Slots ``block{b}.layer{j}``: one 3x3x3 conv each, ``C_b + j·g -> g`` channels, stride 1."""

    name = "densenet3d"
    defaults = {
        "in_channels": 1,
        "num_classes": 4,
        "init_channels": 40,
        "growth_rate": 28,
        "side_channels": 24,
        "num_blocks": 5,
        "layers_per_block": 4,
        "width": 1.0,
    }

    def widths(self, hparams: Mapping[str, Any]) -> tuple[int, int, int]:
        """(stem, growth, side) channels at the config's width."""
        stem, growth, side = (
            scaled(hparams[key], hparams["width"]) for key in ("init_channels", "growth_rate", "side_channels")
        )
        return stem, growth, side

    def slots(self, hparams: Mapping[str, Any]) -> list[Slot]:
        hparams = self.hparams(hparams)
        channels, growth, _ = self.widths(hparams)
        slots = []
        for block in range(1, hparams["num_blocks"] + 1):
            for layer in range(1, hparams["layers_per_block"] + 1):
                slots.append(Slot(f"block{block}.layer{layer}", channels, growth))
                channels += growth
        return slots

    def blueprint(self, config: ArchConfig) -> DenseNetBlueprint:
        hparams, specs = self.slot_specs(config)
        stem_channels, _, side_channels = self.widths(hparams)
        per_block = hparams["layers_per_block"]
        blocks = tuple(tuple(s[0] for s in specs[i : i + per_block]) for i in range(0, len(specs), per_block))
        block_out = [layers[-1].in_channels + layers[-1].out_channels for layers in blocks]
        return DenseNetBlueprint(
            stem=fixed_conv(hparams["in_channels"], stem_channels, kernel=3),
            blocks=blocks,
            transitions=tuple(fixed_conv(c, c) for c in block_out[:-1]),
            sides=tuple(fixed_conv(c, side_channels) for c in block_out),
            head=ConvSpec(len(blocks) * side_channels, hparams["num_classes"], (1, 1, 1), bias=True),
        )


register_backbone(DenseNet3dBackbone())
