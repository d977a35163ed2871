"""Which implementation ``OpSpec.build()`` runs: one measured rule, in one place.

The rule comes from ``benchmarks/ops.py`` (forward+backward, CPU, 2 threads; table and method in
``docs/benchmarks/ops.md``). It only picks implementations that execute exactly ``spec.cost()``
MACs, so ``FlopCounterMode`` on a built network still equals its analytic cost; the CAKES merges
that execute more (``masked``, ``planes``) are available by name.

Set ``PSC_NAS_OP_IMPL=reference`` (or pass ``impl="reference"``) to run the plain ``nn.Conv3d``
reference everywhere, e.g. to debug a numerical difference.
"""

from __future__ import annotations

import os

from torch import nn

from psc_nas.ops.base import OpSpec, StreamedConv
from psc_nas.ops.fast import PLANS, FastStreamedConv

IMPLS = ("auto", "reference", *PLANS)
ENV_VAR = "PSC_NAS_OP_IMPL"


# Folding PmSCn's D-flat convs into 2D convs paid only from 64 channels (C=64: 8-11% faster than
# channels_last alone; C=16/32: between 26% slower and 9% faster, i.e. no reliable gain).
FOLD_PMSCN_FROM_CHANNELS = 64
# Families whose measured winner did not depend on width: channels_last beat NCDHW at every width
# (Conv3d 1.2-1.5x, depthwise csn_ir 1.6-2.4x, CAKES 1.3-1.6x); folding sped up csn_ip's 1x1x1
# conv (1.2-1.4x) but slowed CAKES' thin sub-kernels.
FAMILY_IMPL = {"conv3d": "channels_last", "csn_ir": "channels_last", "csn_ip": "folded", "cakes": "channels_last"}


def choose_impl(spec: OpSpec) -> str:
    """The fastest MAC-exact implementation measured for this spec (see ``docs/benchmarks/ops.md``)."""
    if spec.family in FAMILY_IMPL:
        return FAMILY_IMPL[spec.family]
    return "folded" if spec.in_channels >= FOLD_PMSCN_FROM_CHANNELS else "channels_last"


def build_op(spec: OpSpec, impl: str | None = None) -> nn.Module:
    """Module for ``spec`` run by ``impl`` (default: ``$PSC_NAS_OP_IMPL``, else ``"auto"``)."""
    impl = impl or os.environ.get(ENV_VAR) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = choose_impl(spec)
    return StreamedConv(spec) if impl == "reference" else FastStreamedConv(spec, impl)
