"""Channel-separated convolutions (Tran et al., CSN).

ip-CSN keeps channel interaction in a 1x1x1 conv and moves spatio-temporal interaction into a
depthwise 3x3x3 conv; ir-CSN keeps only the channel-separated 3x3x3 conv.

    ip:  x ─ conv 1x1x1 (C_in→C_out) ─ depthwise 3x3x3 (groups=C_out, stride) ─► y
    ir:  x ─ grouped 3x3x3 (groups=gcd(C_in, C_out), stride) ─► y

ir-CSN is depthwise when C_in == C_out; for a change of width (a ResNet stage's first block) the
group count is gcd(C_in, C_out), the most channel-separated conv that maps C_in to C_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from psc_nas.ops._conv import ConvSpec
from psc_nas.ops.base import OpSpec, Stream, register

CUBE = (3, 3, 3)


@register
@dataclass(frozen=True)
class CsnIpSpec(OpSpec):
    family = "csn_ip"

    def streams(self) -> tuple[Stream, ...]:
        c = self.out_channels
        return ((ConvSpec(self.in_channels, c, (1, 1, 1)), ConvSpec(c, c, CUBE, self.stride, groups=c)),)


@register
@dataclass(frozen=True)
class CsnIrSpec(OpSpec):
    family = "csn_ir"

    def streams(self) -> tuple[Stream, ...]:
        groups = gcd(self.in_channels, self.out_channels)
        return ((ConvSpec(self.in_channels, self.out_channels, CUBE, self.stride, groups=groups),),)
