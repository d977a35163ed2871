"""Operator families that can fill a 3D conv slot, with exact analytic cost.

>>> from psc_nas.ops import create_op, make_spec
>>> make_spec("pmscn", 32, 64, m=2, n=1).cost((16, 16, 16))  # doctest: +SKIP
"""

from psc_nas.ops import cakes, conv3d, csn, pmscn  # noqa: F401  (registers the families)
from psc_nas.ops.base import OP_FAMILIES, OpSpec, StreamedConv, create_op, make_spec
from psc_nas.ops.cakes import SHAPES, uniform_allocation
from psc_nas.ops.choice import IMPLS
from psc_nas.ops.fast import FastStreamedConv
from psc_nas.ops.pmscn import ORIENTATIONS, subspace_width

__all__ = [
    "IMPLS",
    "OP_FAMILIES",
    "ORIENTATIONS",
    "SHAPES",
    "FastStreamedConv",
    "OpSpec",
    "StreamedConv",
    "create_op",
    "make_spec",
    "subspace_width",
    "uniform_allocation",
]
