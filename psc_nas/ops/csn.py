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
from psc_nas.ops.base import OpSpec
from psc_nas.ops.domain import OpDomain
from psc_nas.ops.graph import ConvGraph
from psc_nas.ops.registry import OpFamily, register_family

CUBE = (3, 3, 3)


@dataclass(frozen=True)
class CsnIpSpec(OpSpec):
    family = "csn_ip"

    def graph(self) -> ConvGraph:
        c = self.out_channels
        pointwise = ConvSpec(self.in_channels, c, (1, 1, 1))
        return ConvGraph.streams([[pointwise, ConvSpec(c, c, CUBE, self.stride, groups=c)]])

    def fast_impl(self) -> str:
        # Folding sped up the 1x1x1 conv (1.2-1.4x over channels_last alone); the depthwise conv's
        # backward runs psc-nas's kernel (docs/benchmarks/roofline.md; "folded" where it cannot build);
        # at stride 1 the pair runs fused, forward and backward (ops/pwdw.py: a training step 1.03-2.34x, ops.md).
        return "depthwise"


@dataclass(frozen=True)
class CsnIrSpec(OpSpec):
    family = "csn_ir"

    def graph(self) -> ConvGraph:
        groups = gcd(self.in_channels, self.out_channels)
        return ConvGraph.streams([[ConvSpec(self.in_channels, self.out_channels, CUBE, self.stride, groups=groups)]])

    def fast_impl(self) -> str:
        # channels_last beat NCDHW at every measured width (depthwise 1.6-2.4x; in NCDHW the
        # depthwise backward falls back to a gemm path); the depthwise backward of psc-nas's kernel
        # beat oneDNN's (docs/benchmarks/roofline.md). A grouped (in != out) conv stays oneDNN's.
        return "depthwise"


IP = register_family(OpFamily(spec=CsnIpSpec, domain=OpDomain, presets={"csn_ip": {}}))
IR = register_family(OpFamily(spec=CsnIrSpec, domain=OpDomain, presets={"csn_ir": {}}))
