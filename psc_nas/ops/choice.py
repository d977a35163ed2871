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
from psc_nas.ops.fast import PLANS, FastStreamedConv, has_folding_conv

IMPLS = ("auto", "reference", *PLANS)
ENV_VAR = "PSC_NAS_OP_IMPL"


def choose_impl(spec: OpSpec) -> str:
    """The fastest MAC-exact implementation measured for this spec's family."""
    return "folded" if has_folding_conv(spec) else "channels_last"


def build_op(spec: OpSpec, impl: str | None = None) -> nn.Module:
    """Module for ``spec`` run by ``impl`` (default: ``$PSC_NAS_OP_IMPL``, else ``"auto"``)."""
    impl = impl or os.environ.get(ENV_VAR) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = choose_impl(spec)
    return StreamedConv(spec) if impl == "reference" else FastStreamedConv(spec, impl)
